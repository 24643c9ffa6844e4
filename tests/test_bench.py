"""The retrieval benchmark: a small collection built here, and Cranfield from ../shared/ir when it is there."""

import json
from pathlib import Path

import pytest

from qmd_unsloth.retrieval import load_collection, rrf
from tests.conftest import REPO, run_module

pytest.importorskip("sentence_transformers")
CRANFIELD = REPO.parent / "shared" / "ir" / "cranfield"

DOCS = {
    "d1": ("pod restart loop", "A container that keeps crashing makes the kubelet back off and restart it again."),
    "d2": ("tram timetable", "The number 28 tram climbs through Alfama and Graca every twelve minutes."),
    "d3": ("sourdough", "A dense crumb usually means an underproofed dough or a weak starter."),
    "d4": ("volumes", "Named volumes keep data after the container is removed."),
    "d5": ("ingress", "An ingress controller routes external HTTP traffic to services."),
    "d6": ("backoff", "CrashLoopBackOff is the status shown while the kubelet waits before the next restart."),
}


def make_collection(root: Path) -> Path:
    root.mkdir()
    (root / "tiny.all.xml").write_text("".join(
        f"<doc>\n<docno>{d}</docno>\n<title>{t}</title>\n<text>{x}</text>\n</doc>\n" for d, (t, x) in DOCS.items()))
    # <num> ids are gappy; the judgments number queries by position (as Cranfield does)
    (root / "tiny.qry.xml").write_text("<xml>\n<top>\n<num> 7</num>\n<title>\nk8s pod crashing over and over .\n</title>\n"
                                       "</top>\n<top>\n<num> 9</num>\n<title>\nlisbon tram\n</title>\n</top>\n</xml>\n")
    (root / "tinyqrel.txt").write_text("1 0 d6 1\n1 0 d1 1\n2 0 d2 1\n")
    return root


def test_loads_trec_xml_and_maps_judged_ids_by_position(tmp_path):
    col = load_collection(make_collection(tmp_path / "c"))
    assert col.doc_ids == list(DOCS) and col.queries == {"1": "k8s pod crashing over and over", "2": "lisbon tram"}
    assert col.qrels["1"] == {"d6": 1, "d1": 1}


def test_rrf_weights_raw_lists_double_and_adds_qmds_top_rank_bonus():
    # without QMD's bonus 2 would lead (2/62 + 1/62 > 2/61); with it, first places in any list (+0.05) win
    assert rrf([([1, 2], 2.0), ([3, 2], 1.0)]) == [1, 2, 3]
    assert rrf([([1, 2], 2.0), ([3], 1.0)]) == [1, 3, 2]  # a first place in an expansion list counts too


def test_expansions_change_the_ranking(tmp_path):
    col = make_collection(tmp_path / "c")
    exp = tmp_path / "exp.jsonl"
    exp.write_text(json.dumps({"id": "1", "query": "k8s pod crashing over and over", "completion":
                               "hyde: CrashLoopBackOff means the kubelet waits before restarting a crashing container.\n"
                               "lex: CrashLoopBackOff kubelet\nlex: pod restart\nvec: why does my kubernetes pod "
                               "keep restarting"}) + "\n" +
                   json.dumps({"id": "2", "query": "lisbon tram", "completion": "lex: 28 tram\nvec: tram 28 timetable"})
                   + "\n")
    r = run_module("qmd_unsloth.bench", "retrieval", "--collection", str(col), "--expansions", str(exp), "--out",
                   str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "out" / "retrieval.json").read_text())["metrics"]
    assert set(m) == {"bm25", "dense", "hybrid", "bm25+lex", "dense+vec/hyde", "hybrid+expansions"}
    # "k8s pod crashing over and over" shares no stemmed term with d6; the lex line CrashLoopBackOff finds it
    assert m["bm25+lex"]["recall@100"] > m["bm25"]["recall@100"]
    assert "| hybrid+expansions |" in r.stdout


def test_bad_collection_is_a_one_line_error(tmp_path):
    r = run_module("qmd_unsloth.bench", "retrieval", "--collection", str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "need *.all*.xml" in r.stderr


@pytest.mark.skipif(not CRANFIELD.is_dir(), reason="../shared/ir/cranfield is not here")
def test_cranfield_raw_figures_are_qmds(tmp_path):
    r = run_module("qmd_unsloth.bench", "retrieval", "--collection", str(CRANFIELD), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "retrieval.json").read_text())["metrics"]
    # QMD ANDs every term of the raw query in FTS5: Cranfield's queries are whole sentences, so its FTS list is
    # almost always empty (shared/ir/README.md's BM25 0.388 ranks with any term; that is not what QMD does).
    assert m["bm25"]["ndcg@10"] < 0.05
    # MiniLM over QMD's embedding texts ("task: search result | query: ..."), 20 deep (measured 2026-12-07: 0.394)
    assert m["dense"]["ndcg@10"] == pytest.approx(0.394, abs=0.01)
    assert m["hybrid"]["ndcg@10"] >= m["dense"]["ndcg@10"]


VAULT = REPO / "tests" / "fixtures" / "vault"
VAULT_QRELS = REPO / "tests" / "fixtures" / "vault_qrels.jsonl"


def test_a_notes_folder_is_a_collection_judged_by_qrels(tmp_path):
    col = load_collection(VAULT, VAULT_QRELS)  # the notes reader: ids are relative posix paths
    assert "Projects/Project Alpha.md" in col.doc_ids and "Recipes/Sourdough.txt" in col.doc_ids
    assert not any(".obsidian" in d or ".trash" in d or "latin1" in d for d in col.doc_ids)
    assert col.paths == col.doc_ids
    alpha = col.docs[col.doc_ids.index("Projects/Project Alpha.md")]
    # each document is the note's file as QMD reads it: front matter and all
    assert alpha == (VAULT / "Projects" / "Project Alpha.md").read_text(encoding="utf-8")
    assert col.queries["billing database decision"] == "billing database decision"
    assert col.qrels["billing database decision"] == {"Projects/Project Alpha.md": 1, "Tech/Postgres migration.md": 1}
    r = run_module("qmd_unsloth.bench", "retrieval", "--collection", str(VAULT), "--qrels", str(VAULT_QRELS),
                   "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert res["queries"] == 5 and res["documents"] == len(col.docs)
    assert res["metrics"]["hybrid"]["recall@100"] == 1.0  # six notes: everything judged is retrieved
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "x", "doc": "Nowhere.md", "relevance": 1}) + "\n")
    r = run_module("qmd_unsloth.bench", "retrieval", "--collection", str(VAULT), "--qrels", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"error: {bad}: judged document 'Nowhere.md' is not a note of {VAULT}" in r.stderr
    r = run_module("qmd_unsloth.bench", "retrieval", "--collection", str(VAULT))
    assert r.returncode == 1 and "a notes folder needs --qrels FILE" in r.stderr


def test_an_optional_reranker_is_blended_by_rrf_position_as_qmd_does(tmp_path):
    from qmd_unsloth import qmd_contract as C
    from qmd_unsloth.retrieval import Retriever

    col = load_collection(make_collection(tmp_path / "c"))
    seen = []

    def scorer(query, texts):  # stands in for a cross-encoder: scores in [0, 1]
        seen.extend(texts)
        return [1.0 if "CrashLoopBackOff" in t else 0.0 for t in texts]

    ret = Retriever(col, dense=False, reranker=scorer)
    plain = ret.rank("kubelet restart", rerank=False).ids
    assert len(plain) == 2  # d1 and d6 hold both words
    got = ret.rank("kubelet restart").fused
    assert got == C.rerank_blend(plain, scorer("kubelet restart", [col.docs[d] for d in plain]))
    assert seen[0] == col.docs[plain[0]]  # short notes: the best chunk is the whole note
