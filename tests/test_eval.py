"""Eval of the tiny model's GGUF (llama.cpp, QMD sampling + grammar) and HF folder; the eval gate."""

import json

import pytest

from qmd_unsloth.eval import read_queries
from qmd_unsloth.qmd_contract import GRAMMAR
from tests.conftest import REPO, run_module


def test_eval_queries_file_has_categories():
    pairs = read_queries(REPO / "data" / "eval_queries.txt")
    cats = {c for c, _ in pairs}
    assert len(pairs) >= 100 and len(cats) == 25 and len([c for c in cats if c.startswith("multilingual_")]) == 8
    assert ("misspellings", "kubernets ingress") in pairs


@pytest.mark.parametrize("category, query, lang", [
    ("multilingual_ja", "採用会議 議事録", "ja"),  # kanji only: the header decides, detection would say zh
    ("multilingual_de", "Rezept Zwiebelkuchen", "de"),
    ("devops", "docker volumes", "en"),
    ("(none)", "容器 网络", "zh"),  # no header: detected by script
    ("multilingual_mixed", "настройка nginx", "ru"),  # not a language code: detected
])
def test_query_language(category, query, lang):
    from qmd_unsloth.eval import query_language

    assert query_language(category, query) == lang


def test_grammar_admits_only_prefixed_lines():
    llama_cpp = pytest.importorskip("llama_cpp")
    llama_cpp.LlamaGrammar.from_string(GRAMMAR, verbose=False)  # parses
    assert '"lex" | "vec" | "hyde"' in GRAMMAR and 'line ::= type ": " content "\\n"' in GRAMMAR


@pytest.fixture
def few_queries(tmp_path):
    p = tmp_path / "q.txt"
    p.write_text("# category: devops\ndocker volumes\nnginx reload\n\n# category: science\nhalf-life\n\n"
                 "# category: multilingual_zh\n容器 网络\n", encoding="utf-8")
    return p


def test_gguf_eval_with_samples_and_compare(tiny_gguf, tiny_model, few_queries, tmp_path):
    r = run_module("qmd_unsloth.eval", "--model", str(tiny_gguf), "--queries", str(few_queries), "--out",
                   str(tmp_path / "ev"), "--samples", "2", "--max-new-tokens", "24", "--compare", str(tiny_model))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    gguf, hf = report["models"]
    assert gguf["kind"] == "gguf" and hf["kind"] == "hf"
    assert gguf["decoding"] == {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "min_p": 0.0, "presence_penalty": 0.0,
                                "grammar": True, "max_tokens": 24}
    for row in gguf["rows"]:  # stopped by itself, or cut at the cap
        assert row["stopped"] or row["tokens"] == 24
    assert gguf["stopped_by_itself"] == round(sum(r["stopped"] for r in gguf["rows"]) / 8, 4)
    assert gguf["completions"] == 8 and gguf["samples_per_query"] == 2
    assert set(gguf["categories"]) == {"devops", "science", "multilingual_zh"}
    assert sum(gguf["ratings"].values()) == 8 and 0 <= gguf["mean_score"] <= 1
    # per language: the header names zh, the rest is English; the share of lines comes from the reward's rule
    assert list(gguf["languages"]) == ["en", "zh"]
    zh = gguf["languages"]["zh"]
    assert zh["queries"] == 1 and zh["completions"] == 2
    zh_rows = [r for r in gguf["rows"] if r["lang"] == "zh"]
    lines = sum(r["lines"] for r in zh_rows)
    assert zh["lines_in_language"] == (round(sum(r["lines_in_language"] for r in zh_rows) / lines, 4) if lines else None)
    assert zh["mean_score"] == round(sum(r["score"] for r in zh_rows) / 2, 4)
    assert all(row["tokens"] <= 24 for row in gguf["rows"])
    # the grammar keeps every finished line prefixed (only the last one may be cut by the token cap)
    for row in gguf["rows"]:
        finished = row["completion"].split("\n")[:-1]
        assert all(line.startswith(("lex: ", "vec: ", "hyde: ")) for line in finished), row["completion"]
    md = (tmp_path / "ev" / "report.md").read_text()
    assert f"| metric | {tiny_gguf.name} | {tiny_model.name} |" in md
    assert "| language zh (1 queries) |" in md and "| language en (3 queries) |" in md
    assert (tmp_path / "ev" / "report.png").stat().st_size > 1000


def test_min_score_gate_and_bad_model(tiny_gguf, few_queries, tmp_path):
    r = run_module("qmd_unsloth.eval", "--model", str(tiny_gguf), "--queries", str(few_queries), "--out",
                   str(tmp_path / "ev"), "--greedy", "--max-new-tokens", "16", "--min-score", "0.99")
    assert r.returncode == 1 and "is below --min-score 0.99" in r.stderr
    r = run_module("qmd_unsloth.eval", "--model", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "ev2"))
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'nope.gguf'}: GGUF file not found"
