"""The Colab and Kaggle notebooks, executed top to bottom on CPU with the tiny model (SMOKE=True), and train.sh."""

import json
import os
import subprocess

import nbformat
import pytest

from tests.conftest import REPO

nbclient = pytest.importorskip("nbclient")
NOTEBOOKS = ["colab_qmd_unsloth.ipynb", "kaggle_qmd_unsloth.ipynb"]


def test_notebooks_are_generated_and_cleared():
    for name in NOTEBOOKS:
        nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
        assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and "SMOKE = False" in params[0].source
        # markdown before each step
        kinds = [c.cell_type for c in nb.cells]
        assert all(kinds[i - 1] == "markdown" for i, k in enumerate(kinds) if k == "code")
    kaggle = nbformat.read(REPO / "notebooks" / NOTEBOOKS[1], as_version=4)
    first_code = next(c.source for c in kaggle.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
    assert first_code.index("CUDA_VISIBLE_DEVICES") < first_code.index("import subprocess")
    assert "/kaggle/tmp" in first_code


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_in_smoke_mode(name, tmp_path):
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = "SMOKE = True\nHF_REPO = ''\nREPO_URL = ''"
    env_before = dict(os.environ)
    os.environ["PYTHONPATH"] = str(REPO)
    try:
        client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
        client.execute()  # raises CellExecutionError on any failing cell
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "| mean score |" in text and "GGUF:" in text


def test_train_sh_smoke_runs_every_stage_and_resumes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    work = tmp_path / "w"
    r = subprocess.run(["bash", "scripts/train.sh", "--smoke", "--workdir", str(work)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    for stage in ("prepare", "sft", "grpo", "export", "eval"):
        assert f"== {stage}\n" in r.stdout
    assert (work / "gguf" / "qmd-query-expansion-q4_k_m.gguf").is_file()
    assert json.loads((work / "eval" / "report.json").read_text())["queries"] >= 60
    assert "== sft" in (work / "train.log").read_text()
    again = subprocess.run(["bash", "scripts/train.sh", "--smoke", "--workdir", str(work)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") == 5


def test_train_sh_without_a_gpu_or_with_too_little_vram(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    r = subprocess.run(["bash", "scripts/train.sh", "--workdir", str(tmp_path / "w")], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: no NVIDIA GPU found (nvidia-smi is missing); use --smoke for a CPU run"
    # a stand-in nvidia-smi (no GPU can exist on this machine) reporting an 8 GB card
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\ncase "$*" in *memory.total*) echo 8192;; *) echo "RTX 3070";; esac\n')
    (fake / "nvidia-smi").chmod(0o755)
    r = subprocess.run(["bash", "scripts/train.sh", "--workdir", str(tmp_path / "w")], cwd=REPO,
                       env={**env, "PATH": f"{fake}:/usr/bin:/bin"}, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: too little VRAM: RTX 3070 has 8 GB, qmd_unsloth needs at least 12 GB"
    r = subprocess.run(["bash", "scripts/train.sh", "--bogus"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
