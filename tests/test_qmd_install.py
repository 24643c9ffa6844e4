"""Installing a GGUF into QMD: the one-key edit of index.yml, the placed file, the env line, and rollback."""

import json

import pytest
import yaml

from qmd_unsloth.qmd_install import InstallError, set_generate
from tests.conftest import run_module

QMD_README_INDEX = """# ~/.config/qmd/index.yml

# Context applied to every collection (system-message style). Optional.
global_context: "Knowledge base for my projects"

# Override the default GGUF models per role. Optional.
models:
  embed: "hf:ggml-org/embeddinggemma-300M-GGUF/embeddinggemma-300M-Q8_0.gguf"
  rerank: "hf:ggml-org/Qwen3-Reranker-0.6B-Q8_0-GGUF/qwen3-reranker-0.6b-q8_0.gguf"
  generate: "hf:tobil/qmd-query-expansion-1.7B-gguf/qmd-query-expansion-1.7B-q4_k_m.gguf"

# One entry per collection. The key is the collection name.
collections:
  notes:
    path: /Users/me/notes        # absolute path to index (required)
    pattern: "**/*.md"
"""
NEW = "/home/me/.cache/qmd/models/qmd-query-expansion-q4_k_m-0123456789ab.gguf"


def test_only_the_generate_line_changes_and_comments_stay():
    text, kept = set_generate(QMD_README_INDEX, NEW)
    assert kept
    changed = [(a, b) for a, b in zip(QMD_README_INDEX.splitlines(), text.splitlines()) if a != b]
    assert changed == [('  generate: "hf:tobil/qmd-query-expansion-1.7B-gguf/qmd-query-expansion-1.7B-q4_k_m.gguf"',
                        f'  generate: "{NEW}"')]
    assert set_generate(text, None)[0].count("generate") == 0  # removing the key (rollback to QMD's default)


@pytest.mark.parametrize("text", [
    "collections:\n  notes:\n    path: /n\n",                                  # no models block
    "models:\n    embed: e   # four-space indent\ncollections: {}\n",            # block without generate
    "# top\nmodels:\n  generate: old\n  rerank: r\n",                           # generate first
    "models: {embed: e, generate: old}\ncollections: {}\n",                     # flow style: PyYAML fallback
    "",                                                                         # empty file
])
def test_generate_is_set_and_everything_else_is_kept(text):
    new, kept = set_generate(text, NEW)
    before, after = yaml.safe_load(text) or {}, yaml.safe_load(new)
    assert after["models"]["generate"] == NEW
    assert {k: v for k, v in after.items() if k != "models"} == {k: v for k, v in before.items() if k != "models"}
    assert {k: v for k, v in after["models"].items() if k != "generate"} == {
        k: v for k, v in (before.get("models") or {}).items() if k != "generate"}
    assert kept == ("models: {" not in text)
    if kept and text:
        assert all(line in new.splitlines() for line in text.splitlines() if "generate" not in line)


def test_bad_yaml_is_refused():
    with pytest.raises(InstallError, match="not valid YAML"):
        set_generate("models: [unclosed\n", NEW)


@pytest.fixture
def qmd_home(tmp_path):
    conf = tmp_path / "config"
    conf.mkdir()
    (conf / "index.yml").write_text(QMD_README_INDEX)
    return tmp_path, {"XDG_CACHE_HOME": str(tmp_path / "cache"), "QMD_CONFIG_DIR": str(conf)}


def test_install_then_rollback_restores_qmd_exactly(tiny_gguf, qmd_home):
    home, env = qmd_home
    index, models = home / "config" / "index.yml", home / "cache" / "qmd" / "models"
    r = run_module("qmd_unsloth.qmd_install", "--model", str(tiny_gguf), env=env)
    assert r.returncode == 0, r.stderr
    placed = list(models.glob("qmd-query-expansion-q4_k_m-*.gguf"))
    assert len(placed) == 1 and placed[0].read_bytes() == tiny_gguf.read_bytes()
    assert yaml.safe_load(index.read_text())["models"]["generate"] == str(placed[0])
    assert "# Override the default GGUF models per role. Optional." in index.read_text()
    backups = list(index.parent.glob("index.yml.qmd_unsloth-*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == QMD_README_INDEX
    assert f"models.generate = {placed[0]}" in r.stdout and "was hf:tobil/" in r.stdout
    manifest = json.loads((models / "qmd_unsloth-installs.json").read_text())
    assert [i["model"] for i in manifest["installs"]] == [str(placed[0])]
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no temporaries

    r = run_module("qmd_unsloth.qmd_install", "--rollback", env=env)
    assert r.returncode == 0, r.stderr
    assert index.read_text() == QMD_README_INDEX and not placed[0].exists()
    assert json.loads((models / "qmd_unsloth-installs.json").read_text())["installs"] == []
    r = run_module("qmd_unsloth.qmd_install", "--rollback", env=env)
    assert r.returncode == 1 and r.stderr.strip().endswith("no install to roll back")


def test_rollback_after_the_user_edited_index_yml_only_resets_the_model(tiny_gguf, qmd_home):
    from qmd_unsloth.qmd_install import install, rollback

    home, env = qmd_home
    index, models = home / "config" / "index.yml", home / "models"
    install(tiny_gguf, models, index, verify=False)
    index.write_text(index.read_text() + "  wiki:\n    path: /w\n")  # e.g. `qmd collection add` since
    record = rollback(models)
    assert "only models.generate was set back" in record["restored"]
    data = yaml.safe_load(index.read_text())
    assert data["models"]["generate"].startswith("hf:tobil/") and data["collections"]["wiki"] == {"path": "/w"}


def test_without_index_yml_the_environment_line_is_printed(tiny_gguf, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "QMD_CONFIG_DIR": str(tmp_path / "none"),
           "QMD_GENERATE_MODEL": ""}
    r = run_module("qmd_unsloth.qmd_install", "--model", str(tiny_gguf), "--no-verify", env=env)
    assert r.returncode == 0, r.stderr
    placed = next((tmp_path / "cache" / "qmd" / "models").glob("*.gguf"))
    assert r.stdout.strip().splitlines()[-1] == f"export QMD_GENERATE_MODEL={placed}"
    r = run_module("qmd_unsloth.qmd_install", "--rollback", env=env)
    assert r.returncode == 0 and "unset QMD_GENERATE_MODEL" in r.stdout and not placed.exists()


def test_a_bad_gguf_is_not_installed(tmp_path, qmd_home):
    home, env = qmd_home
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    r = run_module("qmd_unsloth.qmd_install", "--model", str(bad), env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "truncated or corrupt" in r.stderr
    assert (home / "config" / "index.yml").read_text() == QMD_README_INDEX
    assert not (home / "cache").exists()
    r = run_module("qmd_unsloth.qmd_install", "--model", str(bad), "--index", str(tmp_path / "no.yml"), env=env)
    assert r.returncode == 1 and "no such file (omit --index" in r.stderr
