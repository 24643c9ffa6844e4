"""Generate: training rows from a teacher model behind any OpenAI-compatible endpoint, kept only if the reward agrees.

    python -m qmd_unsloth.generate --base-url http://127.0.0.1:8080/v1 --model qwen3 --count 200 \\
        --out runs/generate/generated.jsonl [--queries FILE] [--topics FILE] [--min-score 0.8] [--concurrency 4] \\
        [--max-requests 1000] [--api-key-env OPENAI_API_KEY]

The teacher writes new search queries per topic (the categories of data/README.md, or ``--topics FILE``) in mixed
shapes, then expands each one, and each query of ``--queries FILE`` (expanded first), into lex/vec/hyde lines.  A row
is kept when it passes the data schema (qmd_unsloth.data) and scores at least ``--min-score`` under the shared
reward; rejections are counted by reason.  Queries that duplicate the existing data (``--data``), earlier output or,
even nearly, a held-out eval query are never sent.  ``--out`` is appended to one fsynced line per row; a re-run
resumes it (``--count`` counts the rows already there) and skips the queries a sidecar state file
(``OUT.state.json``) records as rejected.  Ctrl-C leaves a valid file and prints the summary.  The API key comes from
the environment variable named by ``--api-key-env`` and is never printed or written.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_text
from .cli import UsageError, UserError, command
from .config import GenerateConfig
from .data import check_row, data_files, near_duplicate_key, normalise_query, read_examples

STATE_VERSION = 1
NO_NEW_QUERIES_LIMIT = 20  # query requests in a row that bring no new query: the teacher has run dry


class GenerateError(UserError):
    """A user-facing generate problem (one line)."""


@dataclass
class Job:
    kind: str  # "expand" or "queries"
    query: str = ""
    category: str | None = None
    shape: str | None = None
    topic: str | None = None


@dataclass
class Tally:
    accepted: int = 0
    answered: int = 0  # expansions answered by the teacher (accepted + rejected rows)
    rejected: Counter = field(default_factory=Counter)  # row rejections by reason
    skipped: Counter = field(default_factory=Counter)  # queries never sent, by reason
    failed: Counter = field(default_factory=Counter)  # requests that failed after retries, by kind
    deductions: Counter = field(default_factory=Counter)  # reward reasons behind low scores
    new_queries: int = 0


# -- resume ------------------------------------------------------------------------------------------------------------
def read_output(path: Path) -> tuple[list[dict], int, bool]:
    """(rows already in ``path``, length in bytes of a torn last line to drop, whether a newline must be added).

    A kill can only tear the line being written, which then lacks its newline; it is dropped (a last line without
    a newline that is a whole valid row is kept).  A bad line anywhere else is a one-line error naming it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], 0, False
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows = []
    for lineno, line in enumerate(lines + ([tail] if tail.strip() else []), 1):
        if not line.strip():
            continue
        try:
            ex = check_row(json.loads(line.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as e:
            if line is tail:
                return rows, len(tail), False
            raise GenerateError(f"{path}:{lineno}: {e}; fix or remove that line, then run again") from None
        rows.append({"query": ex.query, "category": ex.category})
    return rows, 0, bool(tail.strip())


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.json")


def read_state(out: Path) -> dict:
    p = state_path(out)
    if not p.is_file():
        return {"version": STATE_VERSION, "rejected": {}, "query_requests": 0, "runs": []}
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
        if state.get("version") != STATE_VERSION or not isinstance(state.get("rejected"), dict):
            raise ValueError("unknown layout")
    except ValueError as e:
        raise GenerateError(f"{p}: not a generate state file ({e}); remove it to start its bookkeeping afresh") from None
    state.setdefault("query_requests", 0)
    state.setdefault("runs", [])
    return state


class Output:
    """Append-only JSONL: one write, flush and fsync per row, so a kill can only tear the line being written."""

    def __init__(self, path: Path, torn: int = 0, add_newline: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        if torn:
            with open(path, "r+b") as fh:
                fh.truncate(fh.seek(0, os.SEEK_END) - torn)
        self.fh = open(path, "ab")
        if add_newline:
            self.fh.write(b"\n")

    def append(self, row: dict) -> None:
        self.fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


# -- de-duplication ----------------------------------------------------------------------------------------------------
class Seen:
    """Exact (normalise_query) and near (near_duplicate_key) keys of every query we have or must not produce."""

    def __init__(self):
        self.exact: set[str] = set()
        self.near: set[str] = set()
        self.eval_exact: set[str] = set()
        self.eval_near: set[str] = set()
        self.done: set[str] = set()  # queries already in --out
        self.rejected: dict[str, str] = {}

    def add(self, query: str) -> None:
        self.exact.add(normalise_query(query))
        self.near.add(near_duplicate_key(query))

    def why_not(self, query: str) -> str | None:
        """None when the query is new; else the reason it is skipped."""
        norm = normalise_query(query)
        if not norm:
            return "no words"
        if norm in self.eval_exact or near_duplicate_key(query) in self.eval_near:
            return "held-out eval query"
        if norm in self.done:
            return "already in --out"
        if norm in self.rejected:
            return "rejected in an earlier run"
        if norm in self.exact or near_duplicate_key(query) in self.near:
            return "duplicate"
        return None


def load_seen(cfg: GenerateConfig, out: Path, done: list[dict]) -> tuple[Seen, dict[str, list[str]]]:
    """Keys of the existing data, the eval queries and the output so far; existing queries by category."""
    from .eval import read_queries

    seen, by_cat = Seen(), {}
    out_resolved = out.resolve()
    for path in data_files([cfg.data]) if Path(cfg.data).exists() else []:
        if path.resolve() == out_resolved:
            continue
        for _, ex, _ in read_examples(path):
            if ex is not None:
                seen.add(ex.query)
                by_cat.setdefault(ex.category or path.stem, []).append(ex.query)
    for row in done:
        seen.add(row["query"])
        seen.done.add(normalise_query(row["query"]))
        by_cat.setdefault(row.get("category") or "", []).append(row["query"])
    for _, q in read_queries(cfg.eval_queries):
        seen.eval_exact.add(normalise_query(q))
        seen.eval_near.add(near_duplicate_key(q))
    return seen, by_cat


# -- one run -----------------------------------------------------------------------------------------------------------
class Generator:
    def __init__(self, cfg: GenerateConfig, teacher, out: Path, done: list[dict], state: dict):
        from .teacher_prompts import TOPICS, expansion_rubric, read_topics

        self.cfg, self.teacher, self.out, self.state = cfg, teacher, out, state
        self.topics = read_topics(cfg.topics) if cfg.topics else dict(TOPICS)
        self.rubric = expansion_rubric()
        self.seen, self.by_cat = load_seen(cfg, out, done)
        self.seen.rejected = dict(state["rejected"])
        self.have = len(done)
        self.pending: deque[Job] = deque()
        self.tally = Tally()
        self.stop_reason = ""
        self.no_new_in_a_row = 0
        self.failures_in_a_row = 0
        self.last_failure = ""
        self.generating = True  # new queries are asked for when the pending ones run out
        self.topic_order = sorted(self.topics)
        random.Random(f"{cfg.seed}:topics").shuffle(self.topic_order)

    # queries
    def offer(self, query: str, category: str | None, shape: str | None = None) -> bool:
        why = self.seen.why_not(query)
        if why:
            self.tally.skipped[why] += 1
            return False
        self.seen.add(query)
        self.pending.append(Job("expand", " ".join(query.split()), category, shape))
        return True

    def next_query_job(self) -> Job:
        from .teacher_prompts import shapes_for

        i = self.state["query_requests"]  # kept in the state file: a re-run goes on with the next topic and shape
        self.state["query_requests"] = i + 1
        topic = self.topic_order[i % len(self.topic_order)]
        return Job("queries", topic=topic, shape=random.Random(f"{self.cfg.seed}:{i}").choice(shapes_for(topic)))

    def messages(self, job: Job) -> tuple[list[dict], dict]:
        from .teacher_prompts import expansion_messages, query_messages

        if job.kind == "expand":
            return expansion_messages(job.query, self.rubric), {"temperature": self.cfg.temperature}
        rng = random.Random(f"{self.cfg.seed}:avoid:{self.state['query_requests']}")
        have = self.by_cat.get(job.topic, [])
        avoid = rng.sample(have, min(8, len(have)))
        return (query_messages(job.topic, self.topics[job.topic], job.shape, self.cfg.queries_per_request, avoid),
                {"temperature": self.cfg.query_temperature})

    # answers
    def on_queries(self, job: Job, reply) -> None:
        from .teacher_prompts import parse_queries

        qs = parse_queries(reply.text)
        if reply.finish_reason == "length" and qs:
            qs = qs[:-1]  # the last one may be cut
        new = sum(self.offer(q, job.topic, job.shape) for q in qs)
        self.tally.new_queries += new
        self.no_new_in_a_row = 0 if new else self.no_new_in_a_row + 1

    def on_expansion(self, job: Job, reply, output: Output) -> None:
        from .prompt import format_target
        from .reward import score_expansion
        from .teacher_prompts import parse_expansion

        self.tally.answered += 1
        reason, detail = None, ""
        text, cut = reply.text, reply.finish_reason == "length"
        if cut:  # the lines before the last are whole; the last may stop mid-sentence
            text = text.rsplit("\n", 1)[0] if "\n" in text.strip() else ""
        pairs = parse_expansion(text)
        if not pairs:
            reason = "cut by max_tokens" if cut else "no lex/vec/hyde lines"
            detail = reply.text[:80]
        else:
            row = {"query": job.query, "output": [list(p) for p in pairs]}
            if job.category:
                row["category"] = job.category
            try:
                ex = check_row(row)
            except ValueError as e:
                reason, detail = "invalid row", str(e)
            else:
                score = score_expansion(ex.query, format_target(ex.pairs))
                if score.hard_failure:
                    reason, detail = "reward hard failure", score.hard_failure
                elif score.score < self.cfg.min_score:
                    reason, detail = "score below --min-score", "; ".join(score.reasons[:3])
                    for _, _, why in score.deductions:
                        self.tally.deductions[_reason_kind(why)] += 1
                else:
                    row = {"query": ex.query, **({"category": ex.category} if ex.category else {}),
                           **({"shape": job.shape} if job.shape else {}),
                           "output": [list(p) for p in ex.pairs], "score": round(score.score, 4),
                           "teacher": self.cfg.model}
                    output.append(row)
                    self.have += 1
                    self.tally.accepted += 1
                    self.by_cat.setdefault(job.category or "", []).append(ex.query)
                    return
        self.tally.rejected[reason] += 1
        self.seen.rejected[normalise_query(job.query)] = f"{reason}: {detail}"[:200]

    def on_failure(self, job: Job, err) -> None:
        self.tally.failed[err.kind] += 1
        self.failures_in_a_row += 1
        self.last_failure = str(err)
        if job.kind == "expand":  # not recorded as done: a re-run offers a supplied query again
            self.seen.exact.discard(normalise_query(job.query))
            self.seen.near.discard(near_duplicate_key(job.query))

    # the loop
    def run(self, target: int, bar, output: Output) -> None:
        from .teacher import BudgetExhausted, TeacherError

        cfg = self.cfg
        inflight: dict[Future, Job] = {}
        handled = 0
        while True:
            while not self.stop_reason and len(inflight) < cfg.concurrency:
                expanding = sum(1 for j in inflight.values() if j.kind == "expand")
                if self.have + expanding >= target:
                    break
                if self.teacher.budget_left() == 0:
                    self.stop_reason = f"--max-requests {cfg.max_requests} used up"
                    break
                if self.pending:
                    job = self.pending.popleft()
                elif self.generating and len(inflight) - expanding < max(1, cfg.concurrency // 2):
                    job = self.next_query_job()
                else:
                    break
                msgs, kw = self.messages(job)
                inflight[self.teacher.submit(msgs, **kw)] = job
            if not inflight or self.have >= target:
                break
            done, _ = wait(inflight, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                job = inflight.pop(fut)
                try:
                    reply = fut.result()
                except BudgetExhausted:
                    self.stop_reason = f"--max-requests {cfg.max_requests} used up"
                    if job.kind == "expand":
                        self.pending.appendleft(job)
                    continue
                except TeacherError as e:
                    self.on_failure(job, e)
                else:
                    self.failures_in_a_row = 0
                    if job.kind == "queries":
                        self.on_queries(job, reply)
                    else:
                        self.on_expansion(job, reply, output)
                handled += 1
                if handled % 20 == 0:
                    self.save_state()
            if self.failures_in_a_row >= cfg.max_failures_in_a_row and not self.stop_reason:
                self.stop_reason = f"{self.failures_in_a_row} requests failed in a row (last: {self.last_failure})"
            if self.no_new_in_a_row >= NO_NEW_QUERIES_LIMIT and not self.pending and not self.stop_reason:
                self.stop_reason = f"{NO_NEW_QUERIES_LIMIT} query requests in a row brought no new query"
            if not self.generating and not self.pending and not any(j.kind == "expand" for j in inflight.values()):
                break
            bar.n = self.have
            bar.set_postfix(self.postfix(), refresh=True)
        for fut in inflight:
            fut.cancel()
        bar.n = self.have
        bar.set_postfix(self.postfix(), refresh=True)

    def postfix(self) -> dict:
        s = self.teacher.stats
        secs = max(time.monotonic() - s.started, 1e-6)
        return {"acc": self.tally.accepted, "rej": sum(self.tally.rejected.values()),
                "fail": sum(self.tally.failed.values()), "req": s.requests, "tok/s": f"{s.completion_tokens / secs:.0f}"}

    def save_state(self) -> None:
        self.state["rejected"] = self.seen.rejected
        atomic_write_text(state_path(self.out), json.dumps(self.state, ensure_ascii=False, indent=1) + "\n")

    def summary(self, target: int) -> dict:
        s = self.teacher.stats.as_dict()
        t = self.tally
        return {"accepted": t.accepted, "rows_in_out": self.have, "count": target,
                "answered": t.answered, "acceptance_rate": round(t.accepted / t.answered, 4) if t.answered else 0.0,
                "rejected": dict(t.rejected.most_common()), "low_score_deductions": dict(t.deductions.most_common(5)),
                "skipped_queries": dict(t.skipped.most_common()), "failed_requests": dict(t.failed.most_common()),
                "new_queries": t.new_queries, "stop_reason": self.stop_reason, **s,
                "completion_tokens_per_s": round(s["completion_tokens"] / s["seconds"], 1) if s["seconds"] else 0.0}


def _reason_kind(reason: str) -> str:
    """A reward deduction without its numbers ('2 lex line(s) over 5 terms' -> 'lex line(s) over 5 terms')."""
    words = reason.split()
    return " ".join(words[1:]) if words and words[0].isdigit() else reason


def _fmt_counts(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items()) or "none"


def print_summary(s: dict, out: Path, file=sys.stdout) -> None:
    print(f"generate: {s['accepted']} rows accepted this run; {s['rows_in_out']} of {s['count']} in {out}", file=file)
    print(f"  acceptance: {s['acceptance_rate']:.1%} of {s['answered']} expansions answered", file=file)
    print(f"  rejected: {_fmt_counts(s['rejected'])}", file=file)
    if s["low_score_deductions"]:
        print(f"  low-score reasons: {_fmt_counts(s['low_score_deductions'])}", file=file)
    print(f"  queries not sent: {_fmt_counts(s['skipped_queries'])}; new queries from the teacher: {s['new_queries']}",
          file=file)
    print(f"  requests: {s['requests']} ({s['retries']} retries; failed after retries: "
          f"{_fmt_counts(s['failed_requests'])})", file=file)
    print(f"  tokens: {s['prompt_tokens']} prompt + {s['completion_tokens']} completion in {s['seconds']:.1f} s "
          f"({s['completion_tokens_per_s']:.0f} completion tokens/s)", file=file)
    if s["stop_reason"]:
        print(f"  stopped: {s['stop_reason']}", file=file)


def run(cfg: GenerateConfig) -> tuple[dict, bool]:
    """Runs generate; returns (summary, interrupted)."""
    from tqdm import tqdm

    from .eval import read_queries
    from .teacher import Teacher

    if not cfg.base_url or not cfg.model:
        raise UsageError("give --base-url URL and --model NAME (the teacher's OpenAI-compatible endpoint)")
    if cfg.count is None and cfg.queries is None:
        raise UsageError("give --count N (rows wanted) or --queries FILE (queries to expand)")
    if cfg.api_key_env != "OPENAI_API_KEY" and not os.environ.get(cfg.api_key_env):
        raise GenerateError(f"--api-key-env {cfg.api_key_env}: that environment variable is not set")
    supplied = read_queries(cfg.queries) if cfg.queries else []
    out = Path(cfg.out)
    done, torn, add_newline = read_output(out)
    state = read_state(out)
    if torn:
        print(f"generate: {out}: dropped a torn last line ({torn} bytes) left by an interrupted run", file=sys.stderr)
    teacher = Teacher(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                      max_requests=cfg.max_requests, timeout=cfg.timeout, max_retries=cfg.max_retries,
                      max_tokens=cfg.max_tokens)
    output = None
    gen = Generator(cfg, teacher, out, done, state)
    for cat, q in supplied:  # those already done, rejected before, duplicated or held out are skipped here
        gen.offer(q, None if cat == "(none)" else cat)
    # --count: rows wanted in all (new queries top up); without it, one row per supplied query still to do
    target = cfg.count if cfg.count is not None else gen.have + len(gen.pending)
    gen.generating = cfg.count is not None
    interrupted = False
    try:
        if gen.have < target:
            teacher.check()
        output = Output(out, torn, add_newline)
        with tqdm(total=target, initial=min(gen.have, target), unit="row", desc="generate", dynamic_ncols=True,
                  mininterval=0.5) as bar:
            try:
                gen.run(target, bar, output)
            except KeyboardInterrupt:
                interrupted = True
                gen.stop_reason = "interrupted (Ctrl-C)"
    finally:
        teacher.close()
        if output is not None:
            output.close()
            summary = gen.summary(target)
            state["runs"] = state["runs"][-49:] + [{"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary}]
            gen.save_state()
    return summary, interrupted


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@command("generate")
def main(argv: list[str] | None = None) -> int:
    from .config import parse_stage_args

    cfg, _ = parse_stage_args("generate", __doc__, argv)
    old = signal.signal(signal.SIGTERM, _raise_interrupt)  # a kill from a scheduler ends like Ctrl-C
    try:
        summary, interrupted = run(cfg)
    finally:
        signal.signal(signal.SIGTERM, old)
    print_summary(summary, Path(cfg.out))
    if interrupted:
        print("generate: interrupted; every accepted row is in the output, run the same command again to resume",
              file=sys.stderr)
        return 130
    if summary["rows_in_out"] < summary["count"]:
        print(f"generate: {summary['rows_in_out']} of {summary['count']} rows ({summary['stop_reason'] or 'no queries left'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
