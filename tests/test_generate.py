"""generate and its teacher client against real servers: llama-cpp-python's OpenAI-compatible server serving the tiny
model's GGUF, and a scripted HTTP server written here (stdlib http.server on a free port) that stands in for a
hosted teacher: good answers, 429, 500, malformed JSON, bodies cut short, hangs and a refused key."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import combinations
from pathlib import Path

import pytest

from qmd_unsloth import reward
from qmd_unsloth.data import near_duplicate_key, normalise_query, validate
from qmd_unsloth.llamacpp import free_port
from qmd_unsloth.teacher_prompts import (EXAMPLE, LINE_LIMITS, TOPICS, VEC_MIN_WORDS, expansion_rubric,
                                         parse_expansion, parse_queries, read_topics)
from tests.conftest import REPO, as_in_a_terminal, run_module

FAKE_KEY = "sk-test-9f8e7d6c5b4a-never-print-me"
KEY_ENV = "QMD_TEST_TEACHER_KEY"


def good_expansion(q: str) -> str:
    return "\n".join([f"hyde: Notes on {q}: the settings that matter, the usual failure modes and the commands that "
                      "fix them.", f"lex: {q} settings", f"lex: {q} troubleshooting",
                      f"vec: how do I configure {q} correctly", f"vec: common problems with {q} and how to fix them"])


WORDS = ("zorblax quennic vantrel mirkod plosset gandrew tulvix brasko fendle olmquist yarrick snevel dropple "
         "kessiter umbral wixley").split()
NOVEL = [f"{a} {b} calibration" for a, b in combinations(WORDS, 2)]  # queries no data file holds, no two alike


# -- a scripted teacher ------------------------------------------------------------------------------------------------
class Script:
    """What the scripted server answers.  ``plan[query]``: behaviours for successive requests about that query
    (then "ok"); query-generation requests get ``per_request`` new queries from ``NOVEL`` (plus ``extra``)."""

    def __init__(self, plan=None, delay=0.0, per_request=4, extra=()):
        self.plan = defaultdict(list, {k: list(v) for k, v in (plan or {}).items()})
        self.delay, self.per_request, self.extra = delay, per_request, list(extra)
        self.requests = Counter()  # behaviour -> count
        self.auth = set()
        self.novel = iter(NOVEL)
        self.lock = threading.Lock()

    def answer(self, body: dict) -> tuple[str, str]:
        msgs = body["messages"]
        user = msgs[-1]["content"]
        with self.lock:
            if user.startswith("Query: "):
                q = user[len("Query: "):]
                todo = self.plan[q]
                what = todo.pop(0) if todo else "ok"
                self.requests[what] += 1
                return what, good_expansion(q)
            self.requests["queries"] += 1
            qs, self.extra = self.extra + [next(self.novel) for _ in range(self.per_request)], []
            return "ok", "Here are some queries:\n" + "\n".join(f"{i + 1}. {q}" for i, q in enumerate(qs))


def make_handler(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, status, payload: bytes, headers=(), length=None):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload) if length is None else length))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()

        def do_GET(self):
            with script.lock:
                script.requests["models"] += 1  # check()'s GET /models: an HTTP request like any other
            self._send(200, json.dumps({"object": "list", "data": [{"id": "scripted", "object": "model"}]}).encode())

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.auth.add(self.headers.get("Authorization"))
            if body["model"] == "needs-another-key":
                return self._send(401, b'{"error": {"message": "Incorrect API key provided: ' +
                                  self.headers.get("Authorization", "").encode() + b'"}}')
            what, text = script.answer(body)
            time.sleep(script.delay)
            completion = json.dumps({
                "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}}).encode()
            try:
                if what == "ok":
                    self._send(200, completion)
                elif what == "429":
                    self._send(429, b'{"error": {"message": "slow down"}}', [("retry-after-ms", "20")])
                elif what == "500":
                    self._send(500, b'{"error": {"message": "boom"}}')
                elif what == "malformed":
                    self._send(200, b'{"id": "c1", "choices": [oops')
                elif what == "cut_json":  # a body cut in half whose length header agrees: valid HTTP, broken JSON
                    self._send(200, completion[: len(completion) // 2])
                elif what == "truncated":  # the connection closes before the promised length
                    self._send(200, completion[: len(completion) // 2], length=len(completion))
                    self.close_connection = True
                elif what == "hang":
                    time.sleep(3)
                    self._send(200, completion)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


@pytest.fixture
def scripted():
    servers = []

    def start(script: Script) -> str:
        srv = ThreadingHTTPServer(("127.0.0.1", free_port()), make_handler(script))
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def generate(*args, key=FAKE_KEY, timeout=120):
    return run_module("qmd_unsloth.generate", "--api-key-env", KEY_ENV, *args, env={KEY_ENV: key}, timeout=timeout)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_key_absent(r, *paths):
    for text in (r.stdout, r.stderr, *(Path(p).read_text() for p in paths if Path(p).exists())):
        assert FAKE_KEY not in text


# -- prompts and parsing -----------------------------------------------------------------------------------------------
def test_rubric_is_built_from_the_reward_constants(monkeypatch):
    before = expansion_rubric()
    assert f"{reward.HYDE_MIN_CHARS}-{reward.HYDE_MAX_CHARS} characters" in before
    assert f"2-{reward.LEX_MAX_TERMS} terms" in before and reward.FILLER[0] in before
    assert ", ".join(f"{k} {v}" for k, v in reward.MAX_POINTS.items()) in before
    monkeypatch.setattr(reward, "HYDE_MAX_CHARS", 240)
    monkeypatch.setattr(reward, "LEX_MAX_TERMS", 4)
    monkeypatch.setattr(reward, "FILLER", ("as per usual",) + reward.FILLER)
    after = expansion_rubric()
    assert "50-240 characters" in after and "2-4 terms" in after and '"as per usual"' in after
    assert "50-200 characters" not in after


def test_rubric_line_limits_and_example_are_what_the_reward_scores():
    q = "vantrel sprocket alignment"
    assert reward.score_expansion(*EXAMPLE).score == 1.0  # the worked example in the prompt gets full marks

    def deductions(lines):
        return " ".join(reward.score_expansion(q, "\n".join(lines)).reasons)

    hyde = f"hyde: {'vantrel sprocket alignment notes: shim the left bracket first, then torque to spec. ' * 1}"
    lex = [f"lex: vantrel sprocket {w}" for w in ("alignment", "shims", "torque", "bracket")]
    vec = [f"vec: how to align a vantrel sprocket {w}" for w in ("quickly", "by hand", "with shims", "at home")]
    assert "lex lines" not in deductions([hyde] + lex[:LINE_LIMITS["lex"]] + vec[:2])
    assert "lex lines" in deductions([hyde] + lex[:LINE_LIMITS["lex"] + 1] + vec[:2])
    assert "vec lines" not in deductions([hyde] + lex[:2] + vec[:LINE_LIMITS["vec"]])
    assert "vec lines" in deductions([hyde] + lex[:2] + vec[:LINE_LIMITS["vec"] + 1])
    assert "hyde lines" in deductions([hyde] * (LINE_LIMITS["hyde"] + 1) + lex[:2] + vec[:2])
    short = "vec: " + " ".join(["vantrel", "sprocket", "alignment", "guide"][:VEC_MIN_WORDS])
    assert "under" not in deductions([hyde] + lex[:2] + [short, vec[0]])
    assert "under" in deductions([hyde] + lex[:2] + [short.rsplit(" ", 1)[0], vec[0]])


def test_topics_are_the_categories_of_the_data_card():
    card = (REPO / "data" / "README.md").read_text()
    categories = card.split("## Categories", 1)[1].split("\n## ", 1)[0]  # the categories table, not the languages one
    table = {line.split("|")[1].strip() for line in categories.splitlines()
             if line.startswith("| ") and line.split("|")[2].strip().isdigit()}
    # one file per category, plus one per language (whose rows carry these same categories)
    files = {p.stem for p in (REPO / "data").glob("*.jsonl") if not p.stem.startswith("multilingual_")}
    assert set(TOPICS) == table == files


def test_parse_expansion_reads_lines_fences_bold_and_json():
    prose = ("<think>the user wants lines</think>Sure! Here is the expansion:\n```\n**hyde:** A passage about it.\n"
             "- lex: redis eviction\n1. vec: how does redis evict keys\n```\nHope this helps!")
    assert parse_expansion(prose) == [("hyde", "A passage about it."), ("lex", "redis eviction"),
                                      ("vec", "how does redis evict keys")]
    assert parse_expansion('```json\n{"hyde": "h text", "lex": ["a b", "c d"], "vec": "how e f"}\n```') == [
        ("hyde", "h text"), ("lex", "a b"), ("lex", "c d"), ("vec", "how e f")]
    assert parse_expansion('{"output": [["lex", "a b"], ["vec", "x y z"]]}') == [("lex", "a b"), ("vec", "x y z")]
    assert parse_expansion('[{"type": "LEX", "text": "a b"}]') == [("lex", "a b")]
    assert parse_expansion("I cannot help with that.") == []
    assert parse_expansion("lex: __init__ py") == [("lex", "__init__ py")]


def test_parse_queries_drops_numbering_preambles_and_repeats():
    text = 'Here are 4 queries:\n1. docker volumes\n2) "kubectl logs"\n- "connection reset" nginx\n* docker volumes\n'
    assert parse_queries(text) == ["docker volumes", "kubectl logs", '"connection reset" nginx']
    assert parse_queries('{"queries": ["a b", "c"]}') == ["a b", "c"]


def test_topics_file_errors_name_the_line(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("# mine\nbirding: bird identification\nnot a valid/name: x\n")
    with pytest.raises(ValueError, match=r"t\.txt:3: topic name"):
        read_topics(p)
    p.write_text("birding: bird identification\nknots\n")
    assert read_topics(p) == {"birding": "bird identification", "knots": "knots"}


# -- llama-cpp-python's OpenAI-compatible server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_server(tiny_gguf, tmp_path_factory):
    pytest.importorskip("uvicorn", reason="llama-cpp-python's server extra: pip install -e '.[serve]'")
    from qmd_unsloth.llamacpp import openai_server

    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with openai_server(tiny_gguf, alias="tiny", n_ctx=1024, n_threads=1, log=log) as url:
        yield url


def test_generate_against_llama_cpp_server(llama_server, tmp_path):
    """The tiny random model writes no valid row: the whole path runs (requests, parsing, scoring, rejection
    reasons, skipped duplicates), the output stays valid and the budget holds."""
    data_query = json.loads((REPO / "data" / "devops.jsonl").read_text().splitlines()[0])["query"]
    queries = tmp_path / "q.txt"
    queries.write_text(f"# category: devops\nzorblax widget calibration\n{data_query}\nkubernetes pod CrashLoopBackOff\n"
                       "# category: science\nquennic flux half-life\n")
    out = tmp_path / "gen.jsonl"
    r = generate("--base-url", llama_server, "--model", "tiny", "--count", "4", "--queries", str(queries),
                 "--out", str(out), "--max-requests", "8", "--max-tokens", "48", "--concurrency", "2")
    assert r.returncode == 1, r.stderr  # the random model cannot reach --count: an honest failure
    assert "Traceback" not in r.stderr
    state = json.loads((tmp_path / "gen.jsonl.state.json").read_text())
    run = state["runs"][-1]
    assert run["requests"] == 8 and run["replies"] == 7 and run["completion_tokens"] > 0  # 7 chats + GET /models
    assert run["skipped_queries"] == {"duplicate": 1, "held-out eval query": 1}
    assert sum(run["rejected"].values()) == run["answered"] - run["accepted"] >= 2
    assert run["answered"] <= 8 and run["stop_reason"] == "--max-requests 8 used up"
    assert set(state["rejected"]) >= {normalise_query("zorblax widget calibration"), normalise_query("quennic flux half-life")}
    assert "rows accepted this run" in r.stdout and "requests: 8" in r.stdout
    errors, good = validate([out])
    assert not errors and good == run["accepted"]
    assert_key_absent(r, out, tmp_path / "gen.jsonl.state.json")


# -- the scripted teacher: accept path and faults ----------------------------------------------------------------------
def test_accepts_good_rows_and_survives_faults(scripted, tmp_path):
    qs = NOVEL[:7]
    plan = {qs[0]: ["429", "500"], qs[1]: ["malformed"], qs[2]: ["truncated"], qs[3]: ["cut_json"],
            qs[4]: ["hang"] * 10}
    script = Script(plan)
    url = scripted(script)
    data_query = json.loads((REPO / "data" / "databases.jsonl").read_text().splitlines()[0])["query"]
    queries = tmp_path / "q.txt"
    queries.write_text("# category: devops\n" + "\n".join(qs) + f"\n{data_query}\nrust lifetime elision rule\n")
    out = tmp_path / "gen.jsonl"
    r = generate("--base-url", url, "--model", "scripted", "--queries", str(queries), "--out", str(out),
                 "--timeout", "0.5", "--max-retries", "2", "--concurrency", "3")
    assert r.returncode == 1 and "6 of 7 rows" in r.stderr  # the hanging query failed; everything else got in
    got = rows(out)
    assert sorted(row["query"] for row in got) == sorted(q for q in qs if q != qs[4])
    assert all(row["category"] == "devops" and row["score"] >= 0.8 and row["teacher"] == "scripted" for row in got)
    assert validate([out]) == ([], 6)
    run = json.loads((tmp_path / "gen.jsonl.state.json").read_text())["runs"][-1]
    assert run["failed_requests"] == {"timeout": 1} and run["accepted"] == 6
    assert run["skipped_queries"] == {"duplicate": 1, "held-out eval query": 1}  # near-duplicate of an eval query
    assert script.requests["429"] == script.requests["500"] == script.requests["malformed"] == 1
    assert script.requests["truncated"] == script.requests["cut_json"] == 1 and script.requests["hang"] == 3
    # every HTTP request counts: 14 POSTs (7 queries, 7 retries: 429, 500, a bad body, a cut body, cut JSON, two
    # more hangs) and the start-up GET /models
    assert run["retries"] == 7 and run["requests"] == sum(script.requests.values()) == 15
    assert "failed after retries: timeout 1" in r.stdout and "acceptance: 100.0% of 6" in r.stdout
    assert script.auth == {f"Bearer {FAKE_KEY}"}  # the key was sent ...
    assert_key_absent(r, out, tmp_path / "gen.jsonl.state.json")  # ... and never shown or written

    r2 = generate("--base-url", url, "--model", "scripted", "--queries", str(queries), "--out", str(out),
                  "--timeout", "0.5", "--max-retries", "0")  # resume: only the failed query is asked again
    assert r2.returncode == 1 and script.requests["hang"] == 4 and len(rows(out)) == 6


def test_generates_new_queries_until_count_without_duplicates(scripted, tmp_path):
    eval_near = "elision rules rust lifetime"  # a reordering of a held-out eval query
    data_query = json.loads((REPO / "data" / "science.jsonl").read_text().splitlines()[0])["query"]
    script = Script(per_request=4, extra=[eval_near, data_query.upper(), NOVEL[5]])  # NOVEL[5] comes again later
    url = scripted(script)
    out = tmp_path / "gen.jsonl"
    r = generate("--base-url", url, "--model", "scripted", "--count", "10", "--out", str(out), "--concurrency", "4")
    assert r.returncode == 0, r.stderr
    got = rows(out)
    assert len(got) == 10 and len({normalise_query(x["query"]) for x in got}) == 10
    assert {x["category"] for x in got} <= set(TOPICS) and all(x["shape"] for x in got)
    assert not {near_duplicate_key(x["query"]) for x in got} & {near_duplicate_key(eval_near), near_duplicate_key(data_query)}
    run = json.loads((tmp_path / "gen.jsonl.state.json").read_text())["runs"][-1]
    assert run["skipped_queries"] == {"held-out eval query": 1, "duplicate": 2}
    assert run["count"] == run["rows_in_out"] == 10


def test_budget_caps_requests(scripted, tmp_path):
    script = Script()
    url = scripted(script)
    out = tmp_path / "gen.jsonl"
    r = generate("--base-url", url, "--model", "scripted", "--count", "50", "--out", str(out), "--max-requests", "7")
    assert r.returncode == 1 and "--max-requests 7 used up" in r.stderr
    assert sum(script.requests.values()) == 7 and len(rows(out)) == script.requests["ok"]


def test_budget_counts_every_http_request_retries_included(scripted, tmp_path):
    """A budget of N sends N HTTP requests, whatever mix of first tries and retries: the openai client's own retries
    are off, every try goes through the Teacher's loop and its budget."""
    from qmd_unsloth.teacher import BudgetExhausted, Teacher

    qs = NOVEL[20:23]
    script = Script({qs[0]: ["429"] * 10, qs[1]: ["429", "500"]})
    url = scripted(script)
    with Teacher(url, "scripted", max_requests=3, max_retries=10, timeout=5) as t:
        with pytest.raises(BudgetExhausted):
            t.chat([{"role": "user", "content": f"Query: {qs[0]}"}])
        assert script.requests["429"] == 3 and t.stats.requests == 3 and t.stats.retries == 2
        assert t.budget_left() == 0
    assert sum(script.requests.values()) == 3

    script = Script({qs[0]: ["429", "429"], qs[1]: ["429", "malformed", "429"]})
    url = scripted(script)
    queries = tmp_path / "q.txt"
    queries.write_text("# category: devops\n" + "\n".join(qs) + "\n")
    out = tmp_path / "gen.jsonl"
    r = generate("--base-url", url, "--model", "scripted", "--queries", str(queries), "--out", str(out),
                 "--max-requests", "6", "--max-retries", "5", "--concurrency", "1")
    # GET /models, then qs[0]: 429, 429, ok; then qs[1]: 429, malformed -- the sixth request; nothing more is sent
    assert r.returncode == 1 and "--max-requests 6 used up" in r.stderr, r.stderr
    assert sum(script.requests.values()) == 6 and script.requests["models"] == 1
    assert [row["query"] for row in rows(out)] == [qs[0]]
    run = json.loads((tmp_path / "gen.jsonl.state.json").read_text())["runs"][-1]
    assert run["requests"] == 6 and run["retries"] == 3


def test_resume_after_sigkill_and_sigint(scripted, tmp_path):
    script = Script(delay=0.15, per_request=6)
    url = scripted(script)
    out = tmp_path / "gen.jsonl"
    cmd = [sys.executable, "-m", "qmd_unsloth.generate", "--base-url", url, "--model", "scripted", "--count", "24",
           "--out", str(out), "--concurrency", "2", "--api-key-env", KEY_ENV]
    env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: FAKE_KEY}

    def start_and_wait_for(n_rows):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=as_in_a_terminal)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < n_rows):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        return proc

    proc = start_and_wait_for(3)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    text = out.read_bytes()
    out.write_bytes(text[: text.rfind(b"\n") + 1])  # (should the kill itself have torn a line)
    killed_at = len(rows(out))
    torn = b'{"query": "half a ro'
    with open(out, "ab") as fh:  # what a kill in the middle of a write leaves
        fh.write(torn)
    proc = start_and_wait_for(killed_at + 3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert f"dropped a torn last line ({len(torn)} bytes)" in stderr and "Traceback" not in stderr
    assert "generate:" in stdout and "stopped: interrupted (Ctrl-C)" in stdout
    assert validate([out])[0] == []  # Ctrl-C leaves a valid file
    r = generate("--base-url", url, "--model", "scripted", "--count", "24", "--out", str(out))
    assert r.returncode == 0, r.stderr
    got = rows(out)
    assert len(got) == 24 and len({x["query"] for x in got}) == 24
    assert_key_absent(r, out, tmp_path / "gen.jsonl.state.json")


def test_unreachable_endpoint_and_refused_key_are_one_line_errors(scripted, tmp_path):
    port = free_port()  # nothing listens there
    r = generate("--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--count", "3",
                 "--out", str(tmp_path / "gen.jsonl"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach the teacher at http://127.0.0.1:{port}/v1 (") and "--base-url" in line
    url = scripted(Script())
    r = generate("--base-url", url, "--model", "needs-another-key", "--count", "3", "--out", str(tmp_path / "g.jsonl"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"error: {url} refused the API key from ${KEY_ENV} (HTTP 401); set "
                                                 f"{KEY_ENV} (or --api-key-env NAME) to a valid key")
    assert_key_absent(r, tmp_path / "g.jsonl", tmp_path / "g.jsonl.state.json")
