"""Model card rendering and the eval gate, offline.

The hub cannot be reached from here, so FakeHub below stands in for huggingface_hub.HfApi (the only fake in the test
suite): it keeps uploaded files in memory and serves them back like hf_hub_download.
"""

import json

import pytest
from huggingface_hub.utils import EntryNotFoundError

from qmd_unsloth.hub import HubError, push, render_card
from tests.conftest import run_module


class FakeHub:
    """Stand-in for HfApi: in-memory repos (the real hub is unreachable in tests)."""

    def __init__(self, tmp_path):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.tmp = tmp_path

    def hf_hub_download(self, repo_id, filename):
        if filename not in self.repos.get(repo_id, {}):
            raise EntryNotFoundError(f"{repo_id}/{filename}")
        p = self.tmp / f"dl-{repo_id.replace('/', '_')}-{filename}"
        p.write_bytes(self.repos[repo_id][filename])
        return str(p)

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.repos.setdefault(repo_id, {})

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, commit_message=""):
        from fnmatch import fnmatch
        from pathlib import Path

        for p in Path(folder_path).iterdir():
            if any(fnmatch(p.name, pat) for pat in ignore_patterns or []):
                continue
            if p.is_file() and (allow_patterns is None or any(fnmatch(p.name, pat) for pat in allow_patterns)):
                self.repos[repo_id][p.name] = p.read_bytes()

    def upload_file(self, repo_id, path_or_fileobj, path_in_repo, commit_message=""):
        self.repos[repo_id][path_in_repo] = path_or_fileobj


def make_run(tmp_path, score):
    run = tmp_path / f"run-{score}"
    run.mkdir()
    (run / "config.yaml").write_text("sft_model: runs/sft/latest/merged\nlora_r: 4\nbeta: 0.04\n")
    (run / "qmd-query-expansion-q4_k_m.gguf").write_bytes(b"GGUF fake weights")
    (run / "Modelfile").write_text("FROM ./qmd-query-expansion-q4_k_m.gguf\n")
    (run / "notes.txt").write_text("not uploaded")
    report = {"model": "m.gguf", "mean_score": score, "format_valid": 1.0, "completions": 62,
              "ratings": {"Excellent": 50, "Good": 12, "Acceptable": 0, "Poor": 0, "Failed": 0},
              "seconds_per_query": 0.5, "tokens_per_query": 60.0, "categories": {"devops": score}}
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_card_holds_the_eval_table_the_config_and_a_machine_readable_score(tmp_path):
    run = make_run(tmp_path, 0.9)
    card = render_card(run, "me/qmd-expand", "gguf", json.loads((run / "report.json").read_text()))
    assert card.startswith("---\nlicense: apache-2.0\nbase_model: Qwen/Qwen3-1.7B\nlibrary_name: gguf\n")
    assert "| mean score | 0.900 |" in card and "| Excellent | 50 |" in card
    assert "```yaml\nsft_model: runs/sft/latest/merged\nlora_r: 4\nbeta: 0.04\n```" in card
    assert "<!-- qmd_unsloth:eval_mean_score=0.9000 -->" in card


def test_push_uploads_and_the_gate_refuses_a_worse_model(tmp_path):
    hub = FakeHub(tmp_path)
    r = push(make_run(tmp_path, 0.9), "me/qmd-expand", api=hub)
    assert r["previous_score"] is None and r["score"] == 0.9
    files = hub.repos["me/qmd-expand"]
    assert set(files) == {"qmd-query-expansion-q4_k_m.gguf", "Modelfile", "README.md"}  # notes.txt not uploaded
    worse = make_run(tmp_path, 0.8)
    with pytest.raises(HubError, match=r"new eval score \(0.8000\) is below the current card's 0.9000"):
        push(worse, "me/qmd-expand", api=hub)
    assert b"eval_mean_score=0.9000" in hub.repos["me/qmd-expand"]["README.md"]  # unchanged
    r = push(worse, "me/qmd-expand", force=True, api=hub)
    assert r["previous_score"] == 0.9 and b"eval_mean_score=0.8000" in hub.repos["me/qmd-expand"]["README.md"]
    better = push(make_run(tmp_path, 0.95), "me/qmd-expand", api=hub)
    assert better["previous_score"] == 0.8


def test_cli_without_a_token_is_a_one_line_error_and_card_prints(tmp_path):
    run = make_run(tmp_path, 0.9)
    r = run_module("qmd_unsloth.hub", "push", "--run", str(run), "--repo", "me/x",
                   env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: no Hugging Face token: set HF_TOKEN or run `hf auth login`"
    r = run_module("qmd_unsloth.hub", "card", "--run", str(run))
    assert r.returncode == 0 and "| mean score | 0.900 |" in r.stdout


def test_token_never_appears_in_errors(tmp_path):
    run = make_run(tmp_path, 0.9)
    secret = "hf_SECRETtoken1234567890"
    r = run_module("qmd_unsloth.hub", "push", "--run", str(run), "--repo", "me/x",
                   env={"HF_TOKEN": secret, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 1 and secret not in r.stdout + r.stderr
    assert r.stderr.startswith("error: me/x: ") and "Traceback" not in r.stderr
    assert not any(secret in p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file())


def test_card_for_an_export_folder_takes_the_config_of_the_run_it_came_from(tmp_path):
    run = tmp_path / "grpo" / "main"
    (run / "merged").mkdir(parents=True)
    (run / "config.yaml").write_text("beta: 0.04\n")
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "export.json").write_text(json.dumps({"source": str(run / "merged")}))
    assert "```yaml\nbeta: 0.04\n```" in render_card(gguf, "me/x", "gguf", None)
