"""Curate: a SQLite store of candidate training rows with human review, batch rules, de-duplication and export.

    python -m qmd_unsloth.curate --db FILE import FILE... [--approve]
    python -m qmd_unsloth.curate --db FILE review
    python -m qmd_unsloth.curate --db FILE auto [--reject-hard-failures] [--approve-min-score X] [--reject-below X]
        [--reject-duplicates] [--dry-run]
    python -m qmd_unsloth.curate --db FILE dedupe [--threshold 0.9] [--lexical-only]
    python -m qmd_unsloth.curate --db FILE stats
    python -m qmd_unsloth.curate --db FILE export --out DIR

``import`` reads candidates files (``notes extract``), generate output and ``data/*.jsonl`` rows; a row's identity is
a hash of its query, expansion and source, so importing a file twice adds nothing.  ``review`` shows each pending
row with its expansion and the reward's reasons and reads single keys: a approve, r reject, e edit (in $EDITOR),
s skip, u undo, q quit.  Every decision is its own transaction (WAL, synchronous=FULL): Ctrl-C or a crash loses
nothing.  ``export`` writes approved rows as ``DIR/data/curated.jsonl`` (the data schema; ``python -m
qmd_unsloth.data validate DIR/data`` accepts it) and ``DIR/qrels.jsonl`` (``{"query", "doc", "relevance"}`` lines
for the retrieval reward and ``bench retrieval --qrels``).  Standard-library sqlite3; no torch import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shlex
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from .atomic import atomic_write_text
from .cli import UserError, command

SCHEMA_VERSION = 1
DEFAULT_THRESHOLD = 0.9
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,            -- sha256 of query + output + source: importing twice adds nothing
    query TEXT NOT NULL,
    output TEXT,                         -- JSON [[kind, text], ...] or NULL (needs an expansion)
    source_path TEXT,                    -- note path relative to its vault (the qrels doc id)
    source_heading TEXT,
    shape TEXT,
    category TEXT,
    intent TEXT,
    origin TEXT NOT NULL,                -- the file it was imported from
    score REAL, rating TEXT, hard_failure TEXT, reasons TEXT,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected')),
    dup_of INTEGER REFERENCES items(id), dup_reason TEXT,
    added_at TEXT NOT NULL, decided_at TEXT
);
CREATE INDEX IF NOT EXISTS items_status ON items(status, id);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    action TEXT NOT NULL,                -- approve, reject, edit, import-approve, auto-*
    by TEXT NOT NULL,                    -- review, auto, import
    old_status TEXT, new_status TEXT, old_query TEXT, new_query TEXT, old_output TEXT, new_output TEXT,
    at TEXT NOT NULL,
    undone INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS imports (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT NOT NULL, rows INTEGER, added INTEGER, at TEXT NOT NULL
);
"""
KEYS_HELP = "[a]pprove  [r]eject  [e]dit  [s]kip  [u]ndo  [q]uit"


class CurateError(UserError, ValueError):
    """A user-facing problem with the store, an input file or the flags (one line)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -------------------------------------------------------------------------------------------------------------- store

def connect(path: str | os.PathLike) -> sqlite3.Connection:
    """Opens (or creates) the store: WAL, synchronous=FULL, schema checked by PRAGMA user_version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as e:
        raise CurateError(f"{path}: not a curate database ({e}); choose another --db") from e
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise CurateError(f"{path}: made by a newer qmd_unsloth (schema {version}, this one reads {SCHEMA_VERSION})")
    if version == 0:
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        if tables:
            raise CurateError(f"{path}: an SQLite file that is not a curate database; choose another --db")
        with transaction(conn):
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT; rolled back on any error (including Ctrl-C)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def item_key(query: str, output, source_path: str | None, source_heading: str | None) -> str:
    canon = {"query": " ".join(query.split()), "output": output, "path": source_path, "heading": source_heading}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _score_fields(query: str, pairs) -> dict:
    if not pairs:
        return {"score": None, "rating": None, "hard_failure": None, "reasons": None}
    from .prompt import format_target
    from .reward import score_expansion

    s = score_expansion(query, format_target(pairs))
    return {"score": round(s.score, 4), "rating": s.rating, "hard_failure": s.hard_failure,
            "reasons": json.dumps(s.reasons, ensure_ascii=False)}


def parse_row(row) -> dict:
    """A candidates/generate/data row as item fields; ValueError with a one-line reason naming the field."""
    from .data import _check_row
    from .prompt import parse_completion

    if not isinstance(row, dict):
        raise ValueError(f"not a JSON object (got {type(row).__name__})")
    query = row.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query: missing or empty")
    output = row.get("output")
    if output is None and isinstance(row.get("completion"), str):
        output = [list(p) for p in parse_completion(row["completion"])] or None
    pairs = None
    if output is not None:
        ex = _check_row({"query": query, "output": output, "category": row.get("category"),
                         "intent": row.get("intent")})
        pairs = [list(p) for p in ex.pairs]
    source = row.get("source") or {}
    if not isinstance(source, dict):
        raise ValueError("source: must be an object with path and heading")
    path, heading = source.get("path"), source.get("heading")
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise ValueError("source.path: must be a non-empty string")
    if heading is not None and not isinstance(heading, str):
        raise ValueError("source.heading: must be a string or null")
    for name in ("shape", "category", "intent"):
        if row.get(name) is not None and not isinstance(row[name], str):
            raise ValueError(f"{name}: must be a string")
    query = " ".join(query.split())
    return {"key": item_key(query, pairs, path, heading), "query": query,
            "output": json.dumps(pairs, ensure_ascii=False) if pairs else None, "source_path": path,
            "source_heading": heading, "shape": row.get("shape"), "category": row.get("category"),
            "intent": row.get("intent"), **_score_fields(query, pairs)}


def import_file(conn: sqlite3.Connection, path: Path, approve: bool = False) -> tuple[int, int, list[str]]:
    """(rows read, rows added, problems as PATH:LINE: reason); one transaction per file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CurateError(f"{path}: file not found") from None
    problems, parsed = [], []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            parsed.append(parse_row(json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError:
            problems.append(f"{path}:{lineno}: not UTF-8")
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{lineno}: bad JSON: {e.msg} at column {e.colno}")
        except ValueError as e:
            problems.append(f"{path}:{lineno}: {e}")
    added = 0
    now = _now()
    with transaction(conn):
        for item in parsed:
            cur = conn.execute(
                "INSERT OR IGNORE INTO items (key, query, output, source_path, source_heading, shape, category, intent,"
                " origin, score, rating, hard_failure, reasons, added_at) VALUES (:key, :query, :output, :source_path,"
                " :source_heading, :shape, :category, :intent, :origin, :score, :rating, :hard_failure, :reasons,"
                " :added_at)", {**item, "origin": path.name, "added_at": now})
            if cur.rowcount:
                added += 1
                item_id = cur.lastrowid
                if approve and item["output"]:
                    _record(conn, item_id, "import-approve", "import", "pending", "approved")
                    conn.execute("UPDATE items SET status='approved', decided_at=? WHERE id=?", (now, item_id))
        conn.execute("INSERT INTO imports (path, sha256, rows, added, at) VALUES (?, ?, ?, ?, ?)",
                     (str(path), hashlib.sha256(raw).hexdigest(), len(parsed), added, now))
    return len(parsed), added, problems


def _record(conn, item_id: int, action: str, by: str, old_status, new_status, old_query=None, new_query=None,
            old_output=None, new_output=None) -> None:
    conn.execute("INSERT INTO decisions (item_id, action, by, old_status, new_status, old_query, new_query, old_output,"
                 " new_output, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (item_id, action, by, old_status, new_status, old_query, new_query, old_output, new_output, _now()))


def decide(conn: sqlite3.Connection, item_id: int, action: str, status: str | None = None, by: str = "review",
           query: str | None = None, output: str | None = None) -> None:
    """One decision in one transaction: the item's new status (and edited query/output, rescored) plus its log row."""
    with transaction(conn):
        it = conn.execute("SELECT * FROM items WHERE id=?", (item_id,)).fetchone()
        new_status = status or it["status"]
        new_query = query if query is not None else it["query"]
        new_output = output if output is not None else it["output"]
        fields = {}
        if (new_query, new_output) != (it["query"], it["output"]):
            fields = _score_fields(new_query, json.loads(new_output) if new_output else None)
        conn.execute("UPDATE items SET status=:status, query=:query, output=:output, decided_at=:at"
                     + "".join(f", {k}=:{k}" for k in fields) + " WHERE id=:id",
                     {"status": new_status, "query": new_query, "output": new_output, "at": _now(), "id": item_id,
                      **fields})
        _record(conn, item_id, action, by, it["status"], new_status, it["query"], new_query, it["output"], new_output)


def undo_last(conn: sqlite3.Connection, by: str = "review") -> int | None:
    """Reverts the newest decision made by ``by`` that is not undone yet; returns its item id (None: nothing)."""
    with transaction(conn):
        d = conn.execute("SELECT * FROM decisions WHERE undone=0 AND by=? ORDER BY id DESC LIMIT 1", (by,)).fetchone()
        if d is None:
            return None
        fields = _score_fields(d["old_query"], json.loads(d["old_output"]) if d["old_output"] else None)
        conn.execute("UPDATE items SET status=:status, query=:query, output=:output, decided_at=NULL, score=:score,"
                     " rating=:rating, hard_failure=:hard_failure, reasons=:reasons WHERE id=:id",
                     {"status": d["old_status"], "query": d["old_query"], "output": d["old_output"],
                      "id": d["item_id"], **fields})
        conn.execute("UPDATE decisions SET undone=1 WHERE id=?", (d["id"],))
        return d["item_id"]


# ------------------------------------------------------------------------------------------------------------- review

class Keys:
    """Single keystrokes: raw from a terminal, or one non-blank character at a time from a pipe."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = stream.isatty()

    def read(self) -> str:
        if self.tty:
            import termios
            import tty

            fd = self.stream.fileno()
            old = termios.tcgetattr(fd)
            try:
                tty.setcbreak(fd)
                ch = os.read(fd, 1).decode(errors="replace")
            finally:
                termios.tcsetattr(fd, termios.TCSADRAIN, old)
            if ch in ("\x03", "\x04"):  # Ctrl-C / Ctrl-D in cbreak mode
                raise KeyboardInterrupt if ch == "\x03" else EOFError
            return ch.lower()
        while True:
            ch = self.stream.read(1)
            if not ch:
                raise EOFError
            if not ch.isspace():
                return ch.lower()


def _counts(conn) -> dict[str, int]:
    out = {"pending": 0, "approved": 0, "rejected": 0}
    out.update({r[0]: r[1] for r in conn.execute("SELECT status, count(*) FROM items GROUP BY status")})
    return out


def show(conn, it, out: TextIO) -> None:
    c = _counts(conn)
    print(f"\n[#{it['id']}] {c['pending']} pending, {c['approved']} approved, {c['rejected']} rejected", file=out)
    print(f"query:  {it['query']}", file=out)
    if it["source_path"]:
        where = it["source_path"] + (f" > {it['source_heading']}" if it["source_heading"] else "")
        print(f"source: {where}", file=out)
    print(f"shape:  {it['shape'] or '-'}   from: {it['origin']}", file=out)
    if it["output"]:
        print("expansion:", file=out)
        from .prompt import format_target

        for line in format_target(json.loads(it["output"])).splitlines():
            print(f"  {line}", file=out)
        print(f"score:  {it['score']:.2f} {it['rating']}", file=out)
        for reason in json.loads(it["reasons"] or "[]"):
            print(f"  - {reason}", file=out)
    else:
        print("expansion: (none yet: needs an expansion; press e to write one)", file=out)
    if it["dup_of"]:
        other = conn.execute("SELECT query FROM items WHERE id=?", (it["dup_of"],)).fetchone()
        print(f"near-duplicate of #{it['dup_of']} {other['query']!r} ({it['dup_reason']})", file=out)
    print(KEYS_HELP + " > ", end="", file=out, flush=True)


EDIT_HEADER = ("# Edit the query and the expansion (lines 'lex: ', 'vec: ', 'hyde: '). Lines starting with '#' are\n"
               "# ignored. Save and close to keep; leave it unchanged (or empty) to cancel.\n")


def edit(it, out: TextIO) -> tuple[str, str] | None:
    """Opens $VISUAL/$EDITOR on the row; returns (query, output JSON), or None when cancelled or invalid."""
    from .data import _check_row
    from .prompt import format_target

    pairs = json.loads(it["output"]) if it["output"] else []
    before = EDIT_HEADER + f"query: {it['query']}\n" + (format_target(pairs) + "\n" if pairs else "hyde: \nlex: \nvec: \n")
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.TemporaryDirectory(prefix="qmd-curate-") as tmp:
        path = Path(tmp) / f"item-{it['id']}.txt"
        path.write_text(before, encoding="utf-8")
        try:
            rc = subprocess.run(shlex.split(editor) + [str(path)]).returncode
        except FileNotFoundError:
            print(f"\neditor {editor!r} not found; set $EDITOR (nothing changed)", file=out)
            return None
        after = path.read_text(encoding="utf-8", errors="replace")
    if rc != 0 or after == before:
        print("\nedit cancelled (nothing changed)", file=out)
        return None
    query, lines = it["query"], []
    for n, line in enumerate(after.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        kind, sep, text = line.partition(":")
        kind = kind.strip()
        if not sep or kind not in ("query", "lex", "vec", "hyde"):
            print(f"\nline {n}: {line[:60]!r} is not 'query:', 'lex:', 'vec:' or 'hyde:'; not saved", file=out)
            return None
        if kind == "query":
            query = " ".join(text.split())
        elif text.strip():
            lines.append([kind, " ".join(text.split())])
    if not lines:
        print("\nno expansion lines left; not saved", file=out)
        return None
    try:
        ex = _check_row({"query": query, "output": lines})
    except ValueError as e:
        print(f"\n{e}; not saved", file=out)
        return None
    return ex.query, json.dumps([list(p) for p in ex.pairs], ensure_ascii=False)


def review(conn: sqlite3.Connection, keys: Keys, out: TextIO = sys.stdout) -> dict[str, int]:
    """The review loop over pending rows; returns counts of what was done this session."""
    done = {"approve": 0, "reject": 0, "edit": 0, "skip": 0, "undo": 0}
    skipped: set[int] = set()
    current: int | None = None
    while True:
        if current is None:
            marks = ",".join("?" * len(skipped))
            row = conn.execute("SELECT id FROM items WHERE status='pending'"
                               + (f" AND id NOT IN ({marks})" if skipped else "") + " ORDER BY id LIMIT 1",
                               tuple(skipped)).fetchone()
            if row is None:
                print("\nnothing left to review" + (f" ({len(skipped)} skipped this session)" if skipped else ""),
                      file=out)
                return done
            current = row["id"]
        it = conn.execute("SELECT * FROM items WHERE id=?", (current,)).fetchone()
        show(conn, it, out)
        try:
            key = keys.read()
        except EOFError:
            key = "q"
        print(key, file=out)
        if key == "q":
            return done
        if key == "a":
            if not it["output"]:
                print("needs an expansion before it can be approved: press e to write one", file=out)
                continue
            decide(conn, current, "approve", "approved")
        elif key == "r":
            decide(conn, current, "reject", "rejected")
        elif key == "e":
            edited = edit(it, out)
            if edited:
                decide(conn, current, "edit", query=edited[0], output=edited[1])
                done["edit"] += 1
            continue  # shown again with its new score
        elif key == "s":
            skipped.add(current)
        elif key == "u":
            back = undo_last(conn)
            if back is None:
                print("nothing to undo", file=out)
                continue
            skipped.discard(back)
            done["undo"] += 1
            current = back
            continue
        else:
            print(f"unknown key {key!r}: {KEYS_HELP}", file=out)
            continue
        done[{"a": "approve", "r": "reject", "s": "skip"}[key]] += 1
        current = None


# ------------------------------------------------------------------------------------------------- auto and dedupe

def auto(conn, reject_hard_failures=False, approve_min_score=None, reject_below=None, reject_duplicates=False,
         dry_run=False) -> dict[str, int]:
    """Batch rules on pending rows with an expansion; every change is logged (by 'auto'), all in one transaction."""
    rules = []
    if reject_hard_failures:
        rules.append(("auto-reject-hard-failure", "rejected", "hard_failure IS NOT NULL"))
    if reject_duplicates:
        rules.append(("auto-reject-duplicate", "rejected", "dup_of IS NOT NULL"))
    if reject_below is not None:
        rules.append(("auto-reject-below", "rejected", f"score < {float(reject_below)!r}"))
    if approve_min_score is not None:
        rules.append(("auto-approve", "approved", f"score >= {float(approve_min_score)!r} AND hard_failure IS NULL"
                                                  " AND dup_of IS NULL"))
    counts = {}
    with transaction(conn):
        for action, status, where in rules:
            ids = [r[0] for r in conn.execute(
                f"SELECT id FROM items WHERE status='pending' AND output IS NOT NULL AND {where} ORDER BY id")]
            counts[action] = len(ids)
            if dry_run:
                continue
            now = _now()
            for i in ids:
                _record(conn, i, action, "auto", "pending", status)
                conn.execute("UPDATE items SET status=?, decided_at=? WHERE id=?", (status, now, i))
    return counts


def dedupe(conn, threshold: float = DEFAULT_THRESHOLD, embeddings: bool = True,
           model: str | None = None) -> dict[str, int]:
    """Flags near-duplicate queries (dup_of): same lexical key (data.near_duplicate_key), or MiniLM cosine >= threshold.

    Approved rows are kept first, then the rest by id; rejected rows are ignored.  Recomputes every flag.
    """
    from .data import near_duplicate_key

    rows = conn.execute("SELECT id, query FROM items WHERE status != 'rejected' "
                        "ORDER BY status != 'approved', id").fetchall()
    flags: dict[int, tuple[int, str]] = {}
    kept, kept_keys = [], {}
    for r in rows:
        k = near_duplicate_key(r["query"])
        if k in kept_keys:
            flags[r["id"]] = (kept_keys[k], "lexical")
        else:
            kept_keys[k] = r["id"]
            kept.append(r)
    if embeddings and len(kept) > 1:
        from sentence_transformers import SentenceTransformer

        from .retrieval import minilm_path

        enc = SentenceTransformer(model or minilm_path(), device="cpu")
        emb = enc.encode([r["query"] for r in kept], normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=len(kept) > 500)
        sims = emb @ emb.T
        survivors: list[int] = []
        for i, r in enumerate(kept):
            best = max(survivors, key=lambda j: sims[i, j], default=None)
            if best is not None and sims[i, best] >= threshold:
                flags[r["id"]] = (kept[best]["id"], f"cosine {sims[i, best]:.2f}")
            else:
                survivors.append(i)
    with transaction(conn):
        conn.execute("UPDATE items SET dup_of=NULL, dup_reason=NULL")
        conn.executemany("UPDATE items SET dup_of=?, dup_reason=? WHERE id=?",
                         [(of, why, i) for i, (of, why) in flags.items()])
    return {"checked": len(rows), "lexical": sum(w == "lexical" for _, w in flags.values()),
            "cosine": sum(w != "lexical" for _, w in flags.values())}


# ------------------------------------------------------------------------------------------------- stats and export

def stats(conn) -> dict:
    def group(col):
        return {str(r[0]): r[1] for r in conn.execute(f"SELECT {col}, count(*) FROM items GROUP BY {col} ORDER BY 1")}

    approved = conn.execute("SELECT avg(score), count(*) FROM items WHERE status='approved' AND score IS NOT NULL"
                            ).fetchone()
    return {
        "items": conn.execute("SELECT count(*) FROM items").fetchone()[0],
        "status": _counts(conn),
        "needs_expansion": conn.execute("SELECT count(*) FROM items WHERE status='pending' AND output IS NULL"
                                        ).fetchone()[0],
        "flagged_duplicates": conn.execute("SELECT count(*) FROM items WHERE dup_of IS NOT NULL").fetchone()[0],
        "hard_failures": conn.execute("SELECT count(*) FROM items WHERE hard_failure IS NOT NULL").fetchone()[0],
        "approved_mean_score": round(approved[0], 4) if approved[0] is not None else None,
        "by_origin": group("origin"), "by_shape": group("coalesce(shape, '-')"),
        "decisions": {r[0]: r[1] for r in conn.execute(
            "SELECT action, count(*) FROM decisions WHERE undone=0 GROUP BY action ORDER BY 1")},
    }


def export(conn, out: Path) -> dict[str, int]:
    """Approved rows -> ``out/data/curated.jsonl`` (data schema, one row per normalised query) and
    ``out/qrels.jsonl`` (one ``{"query", "doc", "relevance": 1}`` per approved (query, note) pair)."""
    from .data import _check_row, normalise_query

    rows, qrels, seen, seen_q = [], [], set(), set()
    for it in conn.execute("SELECT * FROM items WHERE status='approved' ORDER BY id"):
        if it["source_path"] and (it["query"], it["source_path"]) not in seen_q:
            seen_q.add((it["query"], it["source_path"]))
            qrels.append({"query": it["query"], "doc": it["source_path"], "relevance": 1})
        if not it["output"] or normalise_query(it["query"]) in seen:
            continue
        seen.add(normalise_query(it["query"]))
        row = {"query": it["query"], "output": json.loads(it["output"])}
        category = it["category"] or ("notes" if it["source_path"] else None)
        if category:
            row["category"] = category
        if it["intent"]:
            row["intent"] = it["intent"]
        _check_row(row)  # the one validator: nothing leaves that `data validate` would refuse
        rows.append(row)
    dump = lambda rs: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs)  # noqa: E731
    atomic_write_text(out / "data" / "curated.jsonl", dump(rows))
    atomic_write_text(out / "qrels.jsonl", dump(qrels))
    return {"rows": len(rows), "qrels": len(qrels)}


# ---------------------------------------------------------------------------------------------------------------- cli

@command("curate")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.curate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True, help="the SQLite store (created when missing)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("import", help="add candidates, generate output or data rows (idempotent)")
    i.add_argument("files", nargs="+", help="JSONL files")
    i.add_argument("--approve", action="store_true", help="mark rows with an expansion approved (trusted data)")
    sub.add_parser("review", help=f"review pending rows one key at a time: {KEYS_HELP}")
    a = sub.add_parser("auto", help="batch rules on pending rows with an expansion")
    a.add_argument("--reject-hard-failures", action="store_true", help="reject rows the reward scores as hard failures")
    a.add_argument("--approve-min-score", type=float, metavar="X", help="approve rows scoring >= X (not duplicates)")
    a.add_argument("--reject-below", type=float, metavar="X", help="reject rows scoring < X")
    a.add_argument("--reject-duplicates", action="store_true", help="reject rows flagged by dedupe")
    a.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    d = sub.add_parser("dedupe", help="flag near-duplicate queries (lexical key and MiniLM cosine)")
    d.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"cosine at or above which two queries are near-duplicates (default {DEFAULT_THRESHOLD})")
    d.add_argument("--lexical-only", action="store_true", help="skip the MiniLM embeddings")
    s = sub.add_parser("stats", help="counts by status, origin, shape and decision")
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    e = sub.add_parser("export", help="approved rows as data-schema JSONL plus qrels.jsonl")
    e.add_argument("--out", required=True, help="folder: writes data/curated.jsonl and qrels.jsonl")
    args = ap.parse_args(argv)
    if args.cmd == "auto" and not (args.reject_hard_failures or args.reject_duplicates
                                   or args.approve_min_score is not None or args.reject_below is not None):
        ap.error("auto: give at least one rule (--reject-hard-failures, --approve-min-score X, --reject-below X, "
                 "--reject-duplicates)")
    if args.cmd == "dedupe" and not 0 < args.threshold <= 1:
        ap.error("--threshold must be in (0, 1]")
    conn = connect(args.db)
    try:
        if args.cmd == "import":
            problems = 0
            for f in args.files:
                n, added, bad = import_file(conn, Path(f), args.approve)
                for b in bad:
                    print(f"warning: {b}", file=sys.stderr)
                problems += len(bad)
                print(f"import: {f}: {n} rows, {added} new" + (f", {len(bad)} bad lines skipped" if bad else ""))
            return 1 if problems else 0
        if args.cmd == "review":
            done = review(conn, Keys(sys.stdin))
            print("review: " + ", ".join(f"{k} {v}" for k, v in done.items()))
        elif args.cmd == "auto":
            counts = auto(conn, args.reject_hard_failures, args.approve_min_score, args.reject_below,
                          args.reject_duplicates, args.dry_run)
            print(("auto (dry run): would apply " if args.dry_run else "auto: ")
                  + ", ".join(f"{k} {v}" for k, v in counts.items()))
        elif args.cmd == "dedupe":
            r = dedupe(conn, args.threshold, not args.lexical_only)
            print(f"dedupe: {r['checked']} rows checked; near-duplicates flagged: {r['lexical']} lexical, "
                  f"{r['cosine']} by cosine >= {args.threshold}")
        elif args.cmd == "stats":
            st = stats(conn)
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                c = st["status"]
                print(f"items: {st['items']} ({c['pending']} pending, {c['approved']} approved, {c['rejected']} "
                      f"rejected); needing an expansion: {st['needs_expansion']}; flagged near-duplicates: "
                      f"{st['flagged_duplicates']}; hard failures: {st['hard_failures']}")
                if st["approved_mean_score"] is not None:
                    print(f"approved mean reward: {st['approved_mean_score']:.3f}")
                for name in ("by_origin", "by_shape", "decisions"):
                    print(f"{name.replace('_', ' ')}: " + (", ".join(f"{k} {v}" for k, v in st[name].items()) or "-"))
        elif args.cmd == "export":
            r = export(conn, Path(args.out))
            print(f"export: {r['rows']} rows -> {Path(args.out) / 'data' / 'curated.jsonl'}; {r['qrels']} judgments "
                  f"-> {Path(args.out) / 'qrels.jsonl'}")
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
