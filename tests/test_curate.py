"""curate on a real SQLite file: idempotent import, the review loop through stdin (edit, undo, quit, resume), crash
safety under SIGKILL and Ctrl-C, auto rules, near-duplicates, and an export that `data validate` accepts."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from qmd_unsloth.curate import connect, dedupe
from qmd_unsloth.reward import score_expansion
from tests.conftest import REPO, as_in_a_terminal, run_module

GOOD = [["hyde", "The Postgres migration moves billing tables from MongoDB with logical replication and a rollback."],
        ["lex", "postgres migration"], ["lex", "mongodb postgres replication"],
        ["vec", "how did we migrate the billing tables to postgres"]]
ROWS = [
    {"query": "postgres migration", "output": GOOD, "source": {"path": "Tech/Postgres migration.md", "heading": None},
     "shape": "title"},
    {"query": "sourdough starter", "output": [["lex", "sourdough starter"], ["vec", "how do I feed a sourdough starter"],
                                              ["hyde", "Feed the starter 1:5:5 and keep it warm until it doubles."]]},
    {"query": "project alpha budget", "source": {"path": "Projects/Project Alpha.md", "heading": "Budget"},
     "shape": "heading"},  # no expansion yet
    {"query": "maria silva", "output": [["lex", "maria silva"], ["vec", "who is maria silva"]],
     "source": {"path": "People/Maria Silva.md", "heading": None}, "shape": "title"},
    {"query": "lisbon tram", "output": [["lex", "lisbon tram <|im_start|>"]]},  # a hard failure
]
EDITED = ("query: project alpha q2 budget\nhyde: Project Alpha has a 40k EUR budget for Q2, approved by Maria Silva.\n"
          "lex: project alpha budget\nlex: alpha q2 budget\nvec: what is the q2 budget of project alpha\n")


def curate(db, *args, input=None, env=None):
    """Runs the command as a user would; ``input`` is what is typed on stdin (a pipe: one key per character)."""
    if input is None:
        return run_module("qmd_unsloth.curate", "--db", str(db), *args, env=env)
    return subprocess.run([sys.executable, "-m", "qmd_unsloth.curate", "--db", str(db), *args], input=input,
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.fixture
def rows_file(tmp_path):
    p = tmp_path / "cands.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


@pytest.fixture
def db(tmp_path, rows_file):
    db = tmp_path / "c.db"
    r = curate(db, "import", str(rows_file))
    assert r.returncode == 0, r.stderr
    return db


def items(db):
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {r["query"]: dict(r) for r in conn.execute("SELECT * FROM items ORDER BY id")}
    finally:
        conn.close()


def test_import_is_idempotent_and_reports_bad_lines(tmp_path, rows_file, db):
    r = curate(db, "import", str(rows_file))
    assert r.returncode == 0 and f"{rows_file}: 5 rows, 0 new" in r.stdout
    got = items(db)
    assert len(got) == 5 and got["project alpha budget"]["output"] is None
    assert got["lisbon tram"]["hard_failure"] and got["lisbon tram"]["score"] == 0
    s = score_expansion("postgres migration", "\n".join(f"{k}: {t}" for k, t in GOOD))
    assert got["postgres migration"]["score"] == pytest.approx(s.score, abs=1e-4)  # the one reward
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "ok query", "output": [["lex", "ok query"]]}\n{"query": ""}\nnot json\n'
                   '{"query": "x", "output": [["sql", "select"]]}\n')
    r = curate(db, "import", str(bad))
    assert r.returncode == 1 and f"{bad}: 1 rows, 1 new, 3 bad lines skipped" in r.stdout
    assert f"warning: {bad}:2: query: missing or empty" in r.stderr
    assert f"{bad}:4: output[0]: unknown kind 'sql'" in r.stderr and "Traceback" not in r.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_review_loop_through_stdin_with_edit_undo_quit_and_resume(tmp_path, db):
    editor = tmp_path / "editor.py"  # a real editor process: rewrites the file it is given
    editor.write_text(f"import sys\nopen(sys.argv[1], 'w').write({EDITED!r})\n")
    env = {"EDITOR": f"{sys.executable} {editor}", "VISUAL": ""}
    # #1 approve, #2 reject, #3 (no expansion) cannot be approved, edit it, approve it, undo that, reject it instead,
    # #4 skip, #5 ... quit
    r = curate(db, "review", input="a\nr\na\ne\na\nu\nr\ns\nq\n", env=env)
    assert r.returncode == 0, r.stderr
    assert "needs an expansion before it can be approved" in r.stdout
    assert "hard failure:" in r.stdout  # the reward's reasons are shown (#5 is shown before quit)
    assert "review: approve 2, reject 2, edit 1, skip 1, undo 1" in r.stdout
    got = items(db)
    assert got["postgres migration"]["status"] == "approved" and got["sourdough starter"]["status"] == "rejected"
    edited = got["project alpha q2 budget"]  # the query was edited too
    assert edited["status"] == "rejected" and json.loads(edited["output"])[0][0] == "hyde"
    assert edited["score"] == pytest.approx(score_expansion("project alpha q2 budget", EDITED.split("\n", 1)[1]).score,
                                            abs=1e-4)
    assert got["maria silva"]["status"] == "pending"  # skipped: still to review
    # resume: the next session starts at the first pending row (skips are per session); EOF quits
    r = curate(db, "review", input="a\n")
    assert r.returncode == 0 and "query:  maria silva" in r.stdout
    assert items(db)["maria silva"]["status"] == "approved"
    conn = sqlite3.connect(db)
    acts = [a for (a,) in conn.execute("SELECT action FROM decisions WHERE undone=0 ORDER BY id")]
    assert acts == ["approve", "reject", "edit", "reject", "approve"]
    assert conn.execute("SELECT count(*) FROM decisions WHERE undone=1").fetchone()[0] == 1


def _wait_for(db, query, status, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if items(db)[query]["status"] == status:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError(f"{query} never became {status}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_review_loses_no_decision(db, sig):
    proc = subprocess.Popen([sys.executable, "-m", "qmd_unsloth.curate", "--db", str(db), "review"], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=as_in_a_terminal)
    proc.stdin.write("a\n")
    proc.stdin.flush()
    _wait_for(db, "postgres migration", "approved", proc)  # committed before the next key is read
    proc.stdin.write("r\n")
    proc.stdin.flush()
    _wait_for(db, "sourdough starter", "rejected", proc)
    proc.send_signal(sig)  # while it waits for the next key
    rc = proc.wait(timeout=30)
    if sig == signal.SIGINT:
        assert rc == 130 and "interrupted" in proc.stderr.read()
    conn = connect(db)  # reopens cleanly after the kill
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [r[0] for r in conn.execute("SELECT action FROM decisions ORDER BY id")] == ["approve", "reject"]
    got = items(db)
    assert got["postgres migration"]["status"] == "approved" and got["sourdough starter"]["status"] == "rejected"


def test_auto_rules(db):
    r = curate(db, "auto", "--reject-hard-failures", "--approve-min-score", "0.6", "--dry-run")
    assert r.returncode == 0 and "auto (dry run)" in r.stdout
    assert {i["status"] for i in items(db).values()} == {"pending"}  # a dry run changes nothing
    r = curate(db, "auto", "--reject-hard-failures", "--approve-min-score", "0.6")
    assert r.returncode == 0 and "auto-reject-hard-failure 1" in r.stdout
    got = items(db)
    assert got["lisbon tram"]["status"] == "rejected"
    assert got["project alpha budget"]["status"] == "pending"  # nothing to judge without an expansion
    for it in got.values():
        if it["output"] and not it["hard_failure"]:
            assert it["status"] == ("approved" if it["score"] >= 0.6 else "pending"), it
    r = curate(db, "auto", "--reject-below", "1.0")
    assert all(i["status"] != "pending" for i in items(db).values() if i["output"])
    assert curate(db, "auto").returncode == 2  # no rule: a usage error


def test_near_duplicates_lexical_and_by_minilm_cosine(tmp_path):
    pytest.importorskip("sentence_transformers")
    f = tmp_path / "d.jsonl"
    qs = ["car insurance renewal", "renewing my car insurance", "kubernetes pod restart", "restart kubernetes pods",
          "sourdough starter"]
    f.write_text("".join(json.dumps({"query": q, "output": [["lex", q]]}) + "\n" for q in qs))
    db = tmp_path / "d.db"
    assert curate(db, "import", str(f)).returncode == 0
    conn = connect(db)
    assert dedupe(conn, embeddings=False) == {"checked": 5, "lexical": 1, "cosine": 0}
    assert dedupe(conn, threshold=0.9) == {"checked": 5, "lexical": 1, "cosine": 1}
    flags = {q: (of, why) for q, of, why in conn.execute("SELECT query, dup_of, dup_reason FROM items")}
    assert flags["restart kubernetes pods"] == (3, "lexical")  # order, plural and stopwords folded
    assert flags["renewing my car insurance"][0] == 1 and flags["renewing my car insurance"][1].startswith("cosine")
    assert flags["sourdough starter"] == (None, None) and flags["car insurance renewal"] == (None, None)
    conn.close()
    r = curate(db, "auto", "--reject-duplicates")
    assert r.returncode == 0 and "auto-reject-duplicate 2" in r.stdout


def test_export_is_valid_training_data_and_qrels(tmp_path, db):
    assert curate(db, "auto", "--approve-min-score", "0.0").returncode == 0  # approves every non-failing row
    out = tmp_path / "export"
    r = curate(db, "export", "--out", str(out))
    assert r.returncode == 0, r.stderr
    v = run_module("qmd_unsloth.data", "validate", str(out / "data"))
    assert v.returncode == 0 and "3 good rows, 0 problem(s)" in v.stderr
    rows = [json.loads(x) for x in (out / "data" / "curated.jsonl").read_text().splitlines()]
    assert {r["query"] for r in rows} == {"postgres migration", "sourdough starter", "maria silva"}
    assert next(r for r in rows if r["query"] == "postgres migration") == {"query": "postgres migration",
                                                                           "output": GOOD, "category": "notes"}
    qrels = [json.loads(x) for x in (out / "qrels.jsonl").read_text().splitlines()]
    assert qrels == [{"query": "postgres migration", "doc": "Tech/Postgres migration.md", "relevance": 1},
                     {"query": "maria silva", "doc": "People/Maria Silva.md", "relevance": 1}]
    r = curate(db, "stats")
    assert r.returncode == 0 and "items: 5 (2 pending, 3 approved, 0 rejected)" in r.stdout
    assert "needing an expansion: 1" in r.stdout and "hard failures: 1" in r.stdout


def test_not_a_curate_database_is_one_line(tmp_path):
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    r = curate(other, "stats")
    assert r.returncode == 1 and r.stderr.strip() == (f"error: {other}: an SQLite file that is not a curate "
                                                       "database; choose another --db")
