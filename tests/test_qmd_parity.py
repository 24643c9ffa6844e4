"""The Python retriever (qmd_unsloth.retrieval) against the real QMD 2.8.3 on tests/fixtures/qmd_vault.

Both sides index the same files: QMD through `qmd collection add` and `qmd embed` (all-MiniLM-L6-v2 as an f16 GGUF,
llama.cpp), ours in SQLite FTS5 and sentence-transformers (the same model in fp32).  QMD runs `qmd query --no-rerank
--format json --explain`; its expansion step is scripted (qmd_node/hook.mjs answers QMD's expansion prompt with a
fixed response, so QMD's own parsing, drop rule, fallback, filter and caching run on a known text), and typed
documents (`lex: ...` lines) give single lists.

Exact where the rules are exact: indexed files and titles, every FTS list (documents and scores), which lists are
searched (the plan), RRF of the same lists.  Tolerant only where numerics differ (llama.cpp f16 against torch fp32):
vector scores within VEC_TOL and vector/fused orders equal up to near ties (see same_up_to_near_ties).

Each rule test also takes the rule out of our side (monkeypatch on qmd_contract, where the rules live) and checks that
the comparison then fails: the test catches the rule's removal.
"""

import json
import subprocess
from pathlib import Path

import pytest

from qmd_unsloth import qmd_contract as C
from tests.conftest import REPO

pytest.importorskip("sentence_transformers")

VAULT = REPO / "tests" / "fixtures" / "qmd_vault"
NAME = "notes"
VEC_TOL = 0.002  # |cosine(llama.cpp f16) - cosine(torch fp32)| seen here: <= 0.0006


@pytest.fixture(scope="module")
def qmd_index(tmp_path_factory):
    from qmd_unsloth import qmd_real
    from qmd_unsloth.bench import write_files
    from qmd_unsloth.llamacpp import ToolsMissing
    from qmd_unsloth.retrieval import read_notes

    try:
        qmd = qmd_real.find()
    except qmd_real.QMDMissing as e:
        pytest.skip(str(e))
    try:
        gguf = qmd_real.embed_gguf()
    except ToolsMissing as e:
        pytest.skip(f"no MiniLM GGUF for QMD: {e}")
    tmp = tmp_path_factory.mktemp("qmd")
    write_files(read_notes(VAULT), tmp / "files")  # as bench --engine qmd hands a collection to QMD
    # QMD loads its generation model before prompting; every expansion here is scripted, so any GGUF will do
    index = qmd_real.QMDIndex(qmd, tmp / "home", embed=gguf, generate=gguf, threads=1)
    index.add_collection(tmp / "files", NAME, mask="**/*")
    index.embed()
    return index


@pytest.fixture(scope="module")
def ret(tmp_path_factory):
    from qmd_unsloth.retrieval import Retriever, read_notes

    return Retriever(read_notes(VAULT), cache_dir=tmp_path_factory.mktemp("emb"))


def qmd_query(index, query: str, response: str | None = None, capture: Path | None = None):
    """(lists, fused rows) of `qmd query` with every list complete (-n/-C above the collection's size)."""
    from qmd_unsloth.qmd_real import explain_lists

    if response is not None:
        index.clear_expansion(query)  # QMD caches each expansion: an earlier test's would be replayed
    rows = index.query(query, n=200, candidates=200, script=None if response is None else {query: response},
                       capture=capture)
    return explain_lists(rows, NAME), rows


def typed(index, kind: str, texts: list[str]) -> dict[str, list[tuple[str, float]]]:
    """One list per typed search (QMD's structuredSearch), keyed by its text."""
    lists, _ = qmd_query(index, "\n".join(f"{kind}: {t}" for t in texts))
    return {l["query"]: [tuple(d) for d in l["docs"]] for l in lists}


def ours(ret, query: str, response: str | None = None):
    from qmd_unsloth.retrieval import searches_for

    rk = ret.rank(query, searches_for(query, response) if response is not None else None)
    path = ret.col.paths
    return rk, [{"source": b, "queryType": t, "query": q, "weight": C.list_weight(t),
                 "docs": [(path[d], s) for d, s in found]} for b, t, q, found in rk.lists]


def plan(lists) -> list[tuple]:
    return [(l["source"], l["queryType"], l["query"], l["weight"]) for l in lists]


def same_up_to_near_ties(mine: list[tuple[str, float]], theirs: list[tuple[str, float]], tol: float) -> bool:
    """Same documents in the same order, except pairs (or a cut-off boundary) whose scores on QMD's side differ by
    less than ``tol``; every shared document's scores within ``tol``."""
    score = dict(theirs)
    cut = theirs[-1][1] if theirs else 0.0
    if set(p for p, _ in mine) ^ set(score):
        if any(abs(score.get(p, s) - cut) >= tol for p, s in mine if p not in score):
            return False
        if any(abs(s - cut) >= tol for p, s in theirs if p not in dict(mine)):
            return False
    mine_s = dict(mine)
    if any(abs(mine_s[p] - score[p]) >= tol for p in mine_s if p in score):
        return False
    order = [p for p, _ in mine if p in score]
    return all(abs(score[a] - score[b]) < tol for i, a in enumerate(order) for b in order[i + 1:]
               if [p for p, _ in theirs].index(a) > [p for p, _ in theirs].index(b))


def fts_agrees(ret, text: str, theirs: list[tuple[str, float]]) -> bool:
    """Our FTS list for ``text`` is QMD's: the same scores in the same order (both are SQLite FTS5's bm25, equal to
    1e-12) and the same documents at each score.  Documents with exactly the same bm25 come in the order QMD's file
    scan listed them (fast-glob returns files in arbitrary order: CI saw the ties of 'weekly' in another order), so
    each run of equal scores is compared as a set; where the list is cut at its depth inside such a run, each side's
    documents in that run must be among the documents that have that score (read from our list without the cut)."""
    path = ret.col.paths
    mine = [(path[d], s) for d, s in ret.fts(text)]
    if len(mine) != len(theirs) or any(abs(x - y) >= 1e-12 for (_, x), (_, y) in zip(mine, theirs)):
        return False
    starts = [i for i in range(len(mine)) if i == 0 or abs(mine[i][1] - mine[i - 1][1]) >= 1e-12]
    runs = [(a, b) for a, b in zip(starts, starts[1:] + [len(mine)])]  # positions of each run of equal scores
    cut = runs.pop() if len(mine) == C.LIST_DEPTH else None
    if any({p for p, _ in mine[a:b]} != {p for p, _ in theirs[a:b]} for a, b in runs):
        return False
    if cut is None:
        return True
    with pytest.MonkeyPatch.context() as m:  # the whole list (cached under its own depth): who ties at the cut
        m.setattr(C, "LIST_DEPTH", 100_000)
        tied = {path[d] for d, s in ret.fts(text) if abs(s - mine[cut[0]][1]) < 1e-12}
    return all(p in tied for p, _ in mine[cut[0]:] + theirs[cut[0]:])


def rebuild(tmp_path):
    from qmd_unsloth.retrieval import Retriever, read_notes

    return Retriever(read_notes(VAULT), cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------------------ index
def test_qmd_indexes_the_same_files_with_the_same_titles(qmd_index, ret, monkeypatch, tmp_path):
    import sqlite3

    with sqlite3.connect(qmd_index.db_path) as db:
        theirs = sorted(db.execute("SELECT path, title FROM documents WHERE active = 1").fetchall())

    def mine(r):
        return sorted((r.col.paths[i], r.titles[i]) for i in r.live)

    assert mine(ret) == theirs  # build/ skipped, '## ' and missing headings, .txt titled by file name
    assert "build/generated.md" in ret.col.paths and ("build/generated.md", "Generated file") not in theirs
    monkeypatch.setattr(C, "indexed", lambda path: True)  # rule removed: build folders indexed
    assert mine(rebuild(tmp_path)) != theirs
    monkeypatch.undo()
    monkeypatch.setattr(C, "extract_title", lambda content, path: path.rsplit("/", 1)[-1][:-3])
    assert mine(rebuild(tmp_path)) != theirs


# ------------------------------------------------------------------------------------------------------------ FTS
LEX = ["weekly", "postgres replication", "write-ahead log", '"sourdough starter"', "dough -sourdough", "v2.8.3",
       "multi-agent", "zephyrometer calibration", "calib", "tram", "billing database", "lisbon"]


def test_fts_lists_equal_qmds_exactly(qmd_index, ret, monkeypatch):
    theirs = typed(qmd_index, "lex", LEX)
    assert set(theirs) == set(LEX)  # every one found something

    def agree(r) -> list[str]:
        r._fts.clear()
        return [q for q in LEX if not fts_agrees(r, q, theirs[q])]

    assert agree(ret) == []
    assert len(theirs["weekly"]) == C.LIST_DEPTH < sum("weekly" in d.lower() for d in ret.col.docs)
    original = C.fts_query
    ablations = {
        "column weights": lambda: monkeypatch.setattr(C, "FTS_WEIGHTS", (1.0, 1.0, 1.0)),
        "prefix terms": lambda: monkeypatch.setattr(C, "fts_query", lambda q: (original(q) or "").replace("*", "")
                                                    or None),
        "AND": lambda: monkeypatch.setattr(C, "fts_query", lambda q: (original(q) or "").replace(" AND ", " OR ")
                                           or None),
        "NOT": lambda: monkeypatch.setattr(C, "fts_query", lambda q: original(q.replace(" -", " "))),
        "list depth": lambda: monkeypatch.setattr(C, "LIST_DEPTH", 100),
        "score": lambda: monkeypatch.setattr(C, "fts_score", lambda b: -b),
    }
    for name, remove in ablations.items():
        remove()
        assert agree(ret), f"removing {name} went unnoticed"
        monkeypatch.undo()
    assert agree(ret) == []


# ------------------------------------------------------------------------------------------------------------ vectors
VEC = ["fado concert in Alfama", "how do I fix a crashing pod", "The replica lags behind the primary database",
       "bread baking at home"]


def test_vector_lists_match_within_tolerance(qmd_index, ret, monkeypatch, tmp_path):
    theirs = typed(qmd_index, "vec", VEC)

    def agree(r) -> list[str]:
        r._vec.clear()
        return [q for q in VEC if not same_up_to_near_ties([(r.col.paths[d], s) for d, s in r.vec([q])[0]],
                                                           theirs[q], VEC_TOL)]

    assert agree(ret) == []
    # the fado passage sits in the long journal's second chunk: only chunking finds it first
    assert theirs["fado concert in Alfama"][0][0] == "Travel/Lisbon trip journal.md"
    monkeypatch.setattr(C, "format_query_for_embedding", lambda q, model="": q)
    assert agree(ret), "QMD's query text for embedding went unnoticed"
    monkeypatch.undo()
    for name, attr, fake in (("document text", "format_doc_for_embedding", lambda t, title=None, model="": t),
                             ("chunking", "chunk_by_tokens", lambda content, *a, **k: [(content, 0)])):
        monkeypatch.setattr(C, attr, fake)
        assert agree(rebuild(tmp_path)), f"removing {name} went unnoticed"
        monkeypatch.undo()


# ------------------------------------------------------------------------------------------------------------ fusion
def test_fusion_of_qmds_own_lists_is_exact(qmd_index, monkeypatch):
    q = "music evening lisbon"
    lists, rows = qmd_query(qmd_index, q, "lex: lisbon trams\nvec: where to hear music in lisbon\n"
                                          "hyde: An evening of fado music in a small Lisbon tavern.\n")
    assert len(lists) == 5

    def fused():
        return C.rrf([[p for p, _ in l["docs"]] for l in lists], [C.list_weight(l["queryType"]) for l in lists])

    from qmd_unsloth.qmd_real import result_path

    theirs = [(result_path(r, NAME), r["explain"]["rrf"]["totalScore"]) for r in rows]
    assert fused() == theirs  # same order, same floats
    for name, attr, value in (("top-rank bonus", "TOP_RANK_BONUS", {}), ("k", "RRF_K", 61),
                              ("raw weight", "ORIGINAL_WEIGHT", 1.0), ("expansion weight", "EXPANSION_WEIGHT", 2.0)):
        monkeypatch.setattr(C, attr, value)
        assert fused() != theirs, f"removing the {name} went unnoticed"
        monkeypatch.undo()


def test_rerank_blend_is_qmds_position_aware_formula():
    # hybridQuery: w * 1/rank + (1 - w) * rerank, w 0.75 (ranks 1-3), 0.60 (4-10), 0.40 (below); ties by rerank order
    cands = list("abcdefghijkl")
    scores = [0.1] * 11 + [1.0]
    got = dict(C.rerank_blend(cands, scores))
    assert got["a"] == pytest.approx(0.75 + 0.25 * 0.1) and got["d"] == pytest.approx(0.6 / 4 + 0.4 * 0.1)
    assert got["l"] == pytest.approx(0.4 / 12 + 0.6 * 1.0)
    assert [k for k, _ in C.rerank_blend(cands, scores)][:2] == ["a", "l"]


# ------------------------------------------------------------------------------------------------------------ plan
def check_plan(qmd_index, ret, monkeypatch, query, response, ablations, capture=None):
    """QMD's lists for a scripted response equal ours (plan exact; FTS exact; vectors within tolerance), and each
    ablation (a rule taken out of our side) changes our plan."""
    theirs, _ = qmd_query(qmd_index, query, response, capture=capture)
    _, mine = ours(ret, query, response)
    assert plan(mine) == plan(theirs)
    for m, t in zip(mine, theirs):
        if m["source"] == "fts":
            assert fts_agrees(ret, m["query"], t["docs"]), m["query"]
        else:
            assert same_up_to_near_ties(m["docs"], t["docs"], VEC_TOL), m["query"]
    for name, (attr, value) in ablations.items():
        monkeypatch.setattr(C, attr, value)
        assert plan(ours(ret, query, response)[1]) != plan(theirs), f"removing {name} went unnoticed"
        monkeypatch.undo()
    return theirs


def test_strong_signal_skips_expansion(qmd_index, ret, monkeypatch, tmp_path):
    q = "zephyrometer calibration"  # one note holds both words, its title too: top score 0.92, nothing second
    cap = tmp_path / "capture.jsonl"
    theirs = check_plan(qmd_index, ret, monkeypatch, q, "lex: zephyrometer gusts\nvec: calibration of the wind gauge\n",
                        {"the strong-signal skip": ("STRONG_SIGNAL_MIN_SCORE", 1.1)}, capture=cap)
    assert plan(theirs) == [("fts", "original", q, 2.0), ("vec", "original", q, 2.0)]
    assert not cap.exists() or not cap.read_text().strip()  # QMD never prompted the model
    assert C.strong_signal([s for _, s in ret.fts(q)])


def test_drop_rule(qmd_index, ret, monkeypatch):
    q = "music evening lisbon"  # no strong signal: QMD prompts the model
    check_plan(qmd_index, ret, monkeypatch, q,
               "lex: fado alfama\nvec: where to hear music in lisbon\nhyde: Fado nights in a small tavern.\n",
               {"the drop rule": ("keeps", lambda text, terms: True)})


def test_lines_equal_to_the_query_are_dropped(qmd_index, ret, monkeypatch):
    q = "sourdough bread crumb"
    check_plan(qmd_index, ret, monkeypatch, q,
               f"lex: {q}\nvec: {q}\nlex: sourdough crumb\nvec: why is my sourdough crumb dense\n",
               {"the equal-to-query filter": ("expanded_searches", lambda query, response:
                                              C.kept_lines(query, response))})


def test_fallback_leaves_only_the_hyde_line(qmd_index, ret, monkeypatch):
    q = "how often to water tomatoes"  # no line holds how/often/to/water/tomatoes
    theirs = check_plan(qmd_index, ret, monkeypatch, q, "lex: garden hose\nvec: plant irrigation schedule\n",
                        {"the fallback": ("fallback", lambda query: [])})
    assert ("vec", "hyde", f"Information about {q}", 1.0) in plan(theirs)


def test_every_line_is_its_own_list_without_cap_or_dedup(qmd_index, ret, monkeypatch):
    q = "replication"
    lines = ["lex: postgres replication", "lex: postgres replication", "lex: replication lag", "lex: postgres wal",
             "vec: what happens when postgres replication lags", "vec: what happens when postgres replication lags"]
    theirs = check_plan(qmd_index, ret, monkeypatch, q, "\n".join(lines) + "\n",
                        {"no de-duplication": ("expanded_searches", lambda query, response:
                                               list(dict.fromkeys(C.kept_lines(query, response))))})
    assert [p[:3] for p in plan(theirs)].count(("fts", "lex", "postgres replication")) == 2


def test_lex_goes_to_fts_and_vec_hyde_to_vectors(qmd_index, ret, monkeypatch):
    q = "dashboard design"
    original = C.search_plan
    check_plan(qmd_index, ret, monkeypatch, q,
               "lex: dashboard navigation\nvec: who designs the dashboard\n"
               "hyde: The dashboard design is owned by Ana.\n",
               {"routing": ("search_plan", lambda query, searches, vectors=True:
                            original(query, [("vec", t) for _, t in searches], vectors)
                            + [("fts", k, t) for k, t in searches if k != "lex"])})


# -------------------------------------------------------------------------------------------------------- end to end
QUERIES = {  # query -> scripted model response (None: no expansion asked, the raw query alone)
    "music evening lisbon": "lex: lisbon trams\nvec: where to hear music in lisbon\n"
                            "hyde: An evening of fado music in a small Lisbon tavern.\n",
    "replication": "lex: postgres replication\nlex: replication lag\n"
                   "vec: what happens when postgres replication lags\n",
    "zephyrometer calibration": "lex: zephyrometer gusts\nvec: calibration of the wind gauge\n",  # strong signal
    "who approved the budget": "lex: budget approved\nvec: who signed off the Q2 budget\n"
                               "hyde: Maria Silva approved the Q2 budget for the billing team.\n",
    "bread": None,
}


def test_fused_top10_agrees_with_qmd(qmd_index, ret):
    from qmd_unsloth.qmd_real import result_path

    for q, response in QUERIES.items():
        if response is None:
            qmd_index.seed_expansion(q, None)
        _, rows = qmd_query(qmd_index, q, response)
        theirs = [(result_path(r, NAME), r["explain"]["rrf"]["totalScore"]) for r in rows][:10]
        rk, _ = ours(ret, q, response)
        mine = [(ret.col.paths[d], s) for d, s in rk.fused][:10]
        # a near tie between two vector scores moves a document one rank in one list: 2/61 - 2/62 ~ 0.0005
        assert same_up_to_near_ties(mine, theirs, 0.001), (q, mine, theirs)


# ------------------------------------------------------------------------------------------------------------ chunking
def test_chunking_equals_qmds_chunk_document(qmd_index):
    texts = [(VAULT / "Travel" / "Lisbon trip journal.md").read_text(),
             "# T\n\n" + "word " * 900 + "\n```\ncode " * 40 + "\n```\n## Next\n" + "more text. " * 300,
             "- item\n" * 800, "x" * 5000]
    for max_chars, overlap, window in ((2700, 405, 600), (3600, 540, 800), (1000, 150, 200)):
        script = ("import { chunkDocument } from " + json.dumps((qmd_index.qmd.package / "dist" / "store.js").as_uri())
                  + "; const texts = JSON.parse(require_stdin()); console.log(JSON.stringify(texts.map(t => "
                  f"chunkDocument(t, {max_chars}, {overlap}, {window}).map(c => [c.text, c.pos]))));")
        script = script.replace("require_stdin()", "(await import('node:fs')).readFileSync(0, 'utf-8')")
        r = subprocess.run([str(qmd_index.qmd.node), "--input-type=module", "-e", script], input=json.dumps(texts),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        theirs = json.loads(r.stdout)
        assert [[list(c) for c in C.chunk_document(t, max_chars, overlap, window)] for t in texts] == theirs


# ------------------------------------------------------------------------------------------------------------ bench
NOTES = REPO / "tests" / "fixtures" / "vault"
NOTES_QRELS = REPO / "tests" / "fixtures" / "vault_qrels.jsonl"


def test_bench_engine_qmd_scores_the_real_qmd_beside_the_mirror(qmd_index, tmp_path):
    from tests.conftest import run_module

    exp = tmp_path / "exp.jsonl"
    exp.write_text("".join(json.dumps({"id": q, "completion": c}) + "\n" for q, c in (
        ("billing database decision", "lex: billing database\nvec: which database did we choose for billing\n"),
        ("replication lag rollback", "lex: replication lag\nhyde: Switch DNS back if replication lag is too high.\n"),
        ("who approved the q2 budget", "lex: q2 budget\nvec: who approved the budget\n"))))
    args = ["qmd_unsloth.bench", "retrieval", "--collection", str(NOTES), "--qrels", str(NOTES_QRELS),
            "--expansions", str(exp)]
    r = run_module(*args, "--engine", "qmd", "--out", str(tmp_path / "qmd"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "qmd" / "retrieval.json").read_text())
    assert res["engine"] == "qmd" and set(res["metrics"]) == {"hybrid", "hybrid+expansions"}
    assert res["top10_agreement"] == {"hybrid": 1.0, "hybrid+expansions": 1.0}  # six notes, no near ties
    assert res["metrics"] == res["python_metrics"]
    searched = [json.loads(l) for l in (tmp_path / "qmd" / "qmd_searches.jsonl").read_text().splitlines()]
    assert {"id": "billing database decision", "query": "billing database decision",
            "searches": [["lex", "billing database"], ["vec", "which database did we choose for billing"]]} in searched
    # the Python engine on the same expansions gives the same figures
    r = run_module(*args, "--out", str(tmp_path / "py"))
    assert r.returncode == 0, r.stderr[-3000:]
    py = json.loads((tmp_path / "py" / "retrieval.json").read_text())["metrics"]
    assert {k: py[k] for k in res["metrics"]} == res["metrics"]
    assert "| hybrid+expansions |" in r.stdout


def test_bench_engine_qmd_lets_qmd_expand_with_the_model(qmd_index, tiny_gguf, tmp_path):
    from tests.conftest import run_module

    r = run_module("qmd_unsloth.bench", "retrieval", "--engine", "qmd", "--collection", str(NOTES), "--qrels",
                   str(NOTES_QRELS), "--model", str(tiny_gguf), "--limit", "2", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "retrieval.json").read_text())
    assert res["queries"] == 2 and set(res["python_metrics"]) == {"hybrid", "hybrid+expansions"}
    searched = [json.loads(l) for l in (tmp_path / "qmd_searches.jsonl").read_text().splitlines()]
    assert len(searched) == 2  # what QMD searched for each query (random weights: often its fallback)
    r = run_module("qmd_unsloth.bench", "retrieval", "--engine", "qmd", "--collection", str(NOTES), "--qrels",
                   str(NOTES_QRELS), "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "model file not found" in r.stderr
