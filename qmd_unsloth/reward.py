"""The shared reward: one rule-based score for GRPO, eval and the data tools.

Standard library only (importing it must not import torch).  ``score_expansion(query, completion)`` never raises on
any string and always returns a score in [0, 1].

Points (100 in all):

=========  ===  ==============================================================================================
format      20  at least one lex and one vec line, at most 3 of each and 1 hyde, hyde first
diversity   15  lines differ from each other and from the query
hyde        15  present (absent keeps 5), 50-200 characters, not repetitive, shares a term with the query
quality     20  lex short (2-5 terms) and keyword-like, vec natural language, no filler, no line QMD would drop
entities    10  acronyms, proper nouns and technical tokens of the query survive in the lex lines
thinking    20  no non-empty ``<think>`` block
=========  ===  ==============================================================================================

Hard failures score 0: empty output, a chat-template token inside the text (one trailing ``<|im_end|>`` or
``<|endoftext|>`` is stripped first), any non-empty line without an exact ``lex: ``, ``vec: `` or ``hyde: `` prefix.
An echo cap (score at most 0.35 when most lines merely repeat the query) applies to the one number used both as the
RL reward and for the eval rating.

Run ``python -m qmd_unsloth.reward FILE.jsonl`` to score ``{"query", "completion"}`` rows, ``--selftest`` for worked
examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .cli import command
from .prompt import LINE_RE as _LINE
from .prompt import strip_completion

MAX_POINTS = {"format": 20, "diversity": 15, "hyde": 15, "quality": 20, "entities": 10, "thinking": 20}
TOTAL_POINTS = sum(MAX_POINTS.values())
RATINGS = ((0.80, "Excellent"), (0.60, "Good"), (0.40, "Acceptable"), (0.20, "Poor"), (float("-inf"), "Failed"))
KINDS = ("hyde", "lex", "vec")
HYDE_MIN_CHARS, HYDE_MAX_CHARS = 50, 200
LEX_MAX_TERMS = 5
ECHO_CAP = 0.35
MAX_LINES_COMPARED = 12  # pairwise checks look at this many lines at most (a 1 MB completion stays linear)

_TEMPLATE_TOKEN = re.compile(r"<\|[a-z_]+\|>")
_TOKEN = re.compile(r"\w[\w+#]*(?:[./'-][\w+#]+)*")
_ACRONYM = re.compile(r"[A-Z][A-Z0-9]*[A-Z0-9]\Z")  # AWS, S3, EC2, JWT (>= 2 chars, all caps/digits)
_CAMEL = re.compile(r"[a-z][a-z0-9]*[A-Z]|[A-Z][a-z0-9]+[A-Z]")  # useEffect, PostgreSQL, GitHub
_TECH = re.compile(r"[._/+#]|[a-z][0-9]|[0-9][a-z]|^(1[89]|20)[0-9][0-9]$", re.I)  # node.js, C++, v2, ci/cd, 2025

_SENTENCE_START = re.compile(r"(ing|ed)$|^(best|top|using|setting|getting|list|guide|tips|new|latest|free|cheap)$")
STOPWORDS = frozenset(
    "a an and are as at be been but by can could did do does doing for from had has have how i if in into is it its "
    "me my no not of on or our over should so than that the their them then there these they this to too under up "
    "us was we were what when where which while who whom why will with would you your vs via about after before "
    "between during".split()
)
QUESTION_STARTS = frozenset("how what why when where which who whom whose is are can could should does do did".split())
FILLER = (
    "find information about", "find information on", "information about", "search for", "look up", "looking for",
    "learn about", "details on", "details about", "info on", "info about", "results for", "more about",
)


def _has_filler(text: str) -> bool:
    low = text.lower()
    return any(f in low for f in FILLER)


@dataclass(slots=True)
class Dimension:
    name: str
    points: float
    max_points: int
    deductions: list[str] = field(default_factory=list)

    def take(self, points: float, reason: str) -> None:
        self.points -= points
        self.deductions.append(f"-{points:g} {reason}")


@dataclass
class Score:
    score: float
    rating: str
    deductions: list[tuple[str, float, str]]  # (dimension, points taken, reason)
    hard_failure: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def dimensions(self) -> dict[str, Dimension]:
        """Points per dimension with the reason for every deduction (built on demand: GRPO needs only .score)."""
        if self.hard_failure:
            return {n: Dimension(n, 0, m) for n, m in MAX_POINTS.items()}
        dims = {n: Dimension(n, m, m) for n, m in MAX_POINTS.items()}
        for name, points, reason in self.deductions:
            dims[name].take(points, reason)
        for d in dims.values():
            d.points = max(0.0, d.points)
        return dims

    @property
    def reasons(self) -> list[str]:
        out = [f"hard failure: {self.hard_failure}"] if self.hard_failure else []
        order = {n: i for i, n in enumerate(MAX_POINTS)}  # grouped by dimension, as in .dimensions
        out += [f"{n}: -{p:g} {r}" for n, p, r in sorted(self.deductions, key=lambda d: order[d[0]])]
        return out + self.notes

    def as_dict(self) -> dict:
        return {
            "score": round(self.score, 4),
            "rating": self.rating,
            "hard_failure": self.hard_failure,
            "points": {n: round(d.points, 2) for n, d in self.dimensions.items()},
            "reasons": self.reasons,
        }


def rating_for(score: float) -> str:
    for floor, name in RATINGS:
        if score >= floor:
            return name
    return "Failed"


def tokens(text: str) -> list[str]:
    """Lowercased word tokens; technical tokens (node.js, c++, ci/cd) stay whole, quotes and punctuation go."""
    return _TOKEN.findall(text.lower())


def _stem(tok: str) -> str:
    if len(tok) > 4 and tok.endswith("ies"):
        return tok[:-3] + "y"
    if len(tok) > 3 and tok.endswith("s") and not tok.endswith("ss"):
        return tok[:-1]
    return tok


def _close(a: str, b: str) -> bool:
    """True when two tokens share a stem, a 4-letter prefix, or are one or two typos apart (misspellings)."""
    if a == b or _stem(a) == _stem(b):
        return True
    n = min(len(a), len(b))
    if n >= 4 and a[:4] == b[:4]:
        return True
    if n >= 5 and abs(len(a) - len(b)) <= 2 and a[0] == b[0]:
        return _edit_distance(a, b, 2) <= 2
    return False


def _edit_distance(a: str, b: str, limit: int) -> int:
    prev = prev2 = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:  # transposition
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


@dataclass(frozen=True)
class QueryInfo:
    text: str
    norm: str
    terms: tuple[str, ...]  # content tokens (no stopwords); all tokens when the query is only stopwords
    entities: tuple[str, ...]  # acronyms, proper nouns, technical tokens (lowercased tokens)
    token_set: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()  # terms and their stems
    prefixes: frozenset[str] = frozenset()  # 4-letter prefixes of terms of 4+ letters

    def shares_term(self, line_toks: list[str]) -> bool:
        """True when a line has a token close to a query term: same stem, same 4-letter prefix, or a typo apart."""
        keys, prefixes = self.keys, self.prefixes
        for t in line_toks:
            if t in keys or (len(t) >= 4 and t[:4] in prefixes):
                return True
            if t[-1] == "s" and len(t) <= 4 and _stem(t) in keys:
                return True
        return any(_close(t, q) for q in self.terms if len(q) >= 5 for t in line_toks if len(t) >= 5)


@lru_cache(maxsize=4096)
def analyse_query(query: str) -> QueryInfo:
    query = query[:2000]
    raw = _TOKEN.findall(query)
    toks = [t.lower() for t in raw]
    terms = tuple(t for t in toks if t not in STOPWORDS) or tuple(toks)
    entities: list[str] = []
    for i, word in enumerate(raw):
        low = toks[i]
        if low in STOPWORDS or low in QUESTION_STARTS:
            continue
        is_entity = bool(
            _ACRONYM.match(word)
            or _CAMEL.search(word)
            or _TECH.search(word.rstrip("."))
            or (word[0].isupper() and (i > 0 or not _SENTENCE_START.search(low)))  # proper noun
        )
        if is_entity and low not in entities:
            entities.append(low)
    keys = frozenset(terms) | frozenset(map(_stem, terms))
    prefixes = frozenset(t[:4] for t in terms if len(t) >= 4)
    return QueryInfo(query, " ".join(toks), terms, tuple(entities), frozenset(toks), keys, prefixes)


def _split(completion: str) -> tuple[str | None, str, list[tuple[str, str]]]:
    """Returns (hard failure, think text, [(kind, text), ...])."""
    think, text = strip_completion(completion)
    if not text.strip():
        return "empty output", think, []
    tok = _TEMPLATE_TOKEN.search(text)
    if tok:
        return f"chat-template token {tok.group(0)} in the output", think, []
    parsed = []
    for ln in text.split("\n"):
        ln = ln.strip()
        if ln:
            m = _LINE.match(ln)
            if m is None:
                return f"line without a lex:/vec:/hyde: prefix: {ln[:60]!r}", think, []
            parsed.append((m.group(1), m.group(2).rstrip()))
    return None, think, parsed


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def score_expansion(query: str, completion: str) -> Score:
    """Scores one completion for one query (see the module docstring for the rubric)."""
    if not isinstance(query, str):
        query = "" if query is None else str(query)
    if not isinstance(completion, str):
        completion = "" if completion is None else str(completion)
    failure, think, parsed = _split(completion)
    if failure:
        return Score(0.0, "Failed", [], hard_failure=failure)

    q = analyse_query(query)
    lex: list[str] = []
    vec: list[str] = []
    hyde: list[str] = []
    lists = {"lex": lex, "vec": vec, "hyde": hyde}
    for kind, text in parsed:
        lists[kind].append(text)
    lex_toks = [tokens(t[:2000]) for t in lex[:MAX_LINES_COMPARED]]
    vec_toks = [tokens(t[:2000]) for t in vec[:MAX_LINES_COMPARED]]
    hyde_toks = tokens(hyde[0][:4000]) if hyde else []
    out: list[tuple[str, float, str]] = []  # (dimension, points taken, reason)

    # thinking
    if think:
        out.append(("thinking", 20, "non-empty <think> block"))

    # format
    if not lex:
        out.append(("format", 10, "no lex line"))
    if not vec:
        out.append(("format", 10, "no vec line"))
    if len(lex) > 3:
        out.append(("format", min(6, 2 * (len(lex) - 3)), f"{len(lex)} lex lines (at most 3)"))
    if len(vec) > 3:
        out.append(("format", min(6, 2 * (len(vec) - 3)), f"{len(vec)} vec lines (at most 3)"))
    if len(hyde) > 1:
        out.append(("format", 5, f"{len(hyde)} hyde lines (at most 1)"))
    if hyde and parsed[0][0] != "hyde":
        out.append(("format", 3, "hyde is not the first line"))

    # diversity
    lex_norms = [" ".join(t) for t in lex_toks]
    vec_norms = [" ".join(t) for t in vec_toks]
    norms = lex_norms + vec_norms + ([" ".join(hyde_toks)] if hyde else [])
    echoes = len([1 for n in norms if n == q.norm and n])
    if echoes:
        out.append(("diversity", min(10, 4 * echoes), f"{echoes} line(s) only repeat the query"))
    dupes = len(norms) - len(set(norms))
    if dupes:
        out.append(("diversity", min(10, 4 * dupes), f"{dupes} duplicated line(s)"))
    if len(vec_toks) > 1:
        vec_sets = [set(t) for t in vec_toks]
        near = sum(
            1 for i in range(len(vec_sets)) for j in range(i + 1, len(vec_sets))
            if vec_sets[i] != vec_sets[j] and _jaccard(vec_sets[i], vec_sets[j]) >= 0.8
        )
        if near:
            out.append(("diversity", min(6, 3 * near), f"{near} pair(s) of nearly identical vec lines"))
    reordered = len([1 for t, n in zip(vec_toks, vec_norms) if n != q.norm and set(t) == q.token_set])
    if reordered:
        out.append(("diversity", min(6, 3 * reordered), f"{reordered} vec line(s) only reorder the query"))

    # hyde
    if not hyde:
        out.append(("hyde", 10, "no hyde passage (dense retrieval gains from one)"))
    else:
        n = len(hyde[0])
        if n < HYDE_MIN_CHARS:
            out.append(("hyde", 5, f"hyde is {n} chars (fewer than {HYDE_MIN_CHARS})"))
        elif n > HYDE_MAX_CHARS:
            out.append(("hyde", 5 if n <= 2 * HYDE_MAX_CHARS else 8, f"hyde is {n} chars (more than {HYDE_MAX_CHARS})"))
        content = [w for w in hyde_toks if w not in STOPWORDS]
        if content:
            counts: dict[str, int] = {}
            for w in content:
                counts[w] = counts.get(w, 0) + 1
            if max(counts.values()) > 3 or (len(content) >= 8 and len(counts) / len(content) < 0.5):
                out.append(("hyde", 5, "hyde repeats words"))
        if q.terms and not q.shares_term(hyde_toks[:400]):
            out.append(("hyde", 3, "hyde shares no term with the query"))

    # quality
    long_lex = len([1 for t in lex_toks if len(t) > LEX_MAX_TERMS])
    if long_lex:
        out.append(("quality", min(8, 4 * long_lex), f"{long_lex} lex line(s) over {LEX_MAX_TERMS} terms (FTS5 ANDs them)"))
    wordy = len([1 for t, tk in zip(lex, lex_toks) if t.endswith("?") or (len(tk) > 2 and tk[0] in QUESTION_STARTS)])
    if wordy:
        out.append(("quality", min(4, 2 * wordy), f"{wordy} lex line(s) read as a question, not keywords"))
    short_vec = len([1 for t in vec_toks if len(t) < 3])
    if short_vec:
        out.append(("quality", min(6, 3 * short_vec), f"{short_vec} vec line(s) under 3 words (not natural language)"))
    if lex and vec and sum(map(len, lex)) / len(lex) >= sum(map(len, vec)) / len(vec):
        out.append(("quality", 3, "lex lines are not shorter than vec lines"))
    if _has_filler(completion[:20000]):
        filler = len([1 for t in (lex + vec)[:MAX_LINES_COMPARED] if _has_filler(t[:300])])
        if filler:
            out.append(("quality", min(8, 4 * filler), f"{filler} line(s) with generic filler such as 'search for'"))
    if q.terms:
        dropped = len([1 for t in lex_toks + vec_toks if not q.shares_term(t[:100])])
        if dropped:
            out.append(("quality", min(10, 4 * dropped), f"{dropped} line(s) share no term with the query (QMD drops them)"))

    # entities
    if q.entities and not lex:
        out.append(("entities", 10, "no lex line to carry the query's entities"))
    elif q.entities:
        lex_sets = [set(t) for t in lex_toks]
        for e in q.entities:
            hits = len([1 for ls in lex_sets if e in ls])
            if hits == 0:
                out.append(("entities", 10, f"entity {e!r} missing from every lex line"))
            elif hits < len(lex_sets):
                out.append(("entities", 2, f"entity {e!r} missing from {len(lex_sets) - hits} lex line(s)"))

    taken = dict.fromkeys(MAX_POINTS, 0.0)
    for name, points, _ in out:
        taken[name] += points
    total = sum(max(0.0, MAX_POINTS[n] - t) for n, t in taken.items()) if out else TOTAL_POINTS
    score = min(1.0, total / TOTAL_POINTS)
    notes = []
    if echoes * 2 > len(norms):
        notes.append(f"echo cap: most lines repeat the query, score capped at {ECHO_CAP}")
        score = min(score, ECHO_CAP)
    return Score(score, rating_for(score), out, notes=notes)


def _completion_text(completion) -> str:
    """TRL passes strings (standard format) or lists of messages (conversational format)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in completion)
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "" if completion is None else str(completion)


def grpo_reward(completions: list, query: list[str] | None = None, **kwargs) -> list[float]:
    """TRL reward function: ``GRPOTrainer(reward_funcs=[grpo_reward])`` with a ``query`` column in the dataset."""
    if query is None:
        raise ValueError("grpo_reward needs the dataset's 'query' column (TRL passes extra columns as keywords)")
    return [score_expansion(q, _completion_text(c)).score for q, c in zip(query, completions)]


grpo_reward.__name__ = "qmd_expansion_reward"


SELFTEST = [
    ("auth config", "hyde: Set AUTH_SECRET and AUTH_URL in .env; the auth config file defines providers and session TTL.\n"
     "lex: auth config\nlex: authentication settings env\nvec: how do I configure authentication for my app\n"
     "vec: where are the auth configuration options defined"),
    ("auth config", "lex: auth config\nvec: auth config"),
    ("React hooks", "lex: hooks tutorial\nlex: state management\nvec: how do react hooks like useState work"),
    ("docker volumes", "<think>The user wants docker volumes.</think>\nlex: docker volumes\nvec: how do docker volumes persist data"),
    ("docker volumes", "Here are some expansions:\nlex: docker volumes"),
    ("docker volumes", "lex: docker volumes<|im_start|>assistant"),
]


def _summarise(scores: list[Score]) -> str:
    from collections import Counter

    n = len(scores)
    if not n:
        return "no rows"
    mean = sum(s.score for s in scores) / n
    counts = Counter(s.rating for s in scores)
    parts = ", ".join(f"{name} {counts.get(name, 0)}" for _, name in RATINGS)
    return f"{n} rows, mean score {mean:.3f}; {parts}"


@command("reward")
def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.reward", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help='JSONL files of {"query": ..., "completion": ...} rows')
    ap.add_argument("--selftest", action="store_true", help="print worked examples")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every row's score and reasons")
    args = ap.parse_args(argv)
    if not args.files and not args.selftest:
        ap.error("give a JSONL file or --selftest")
    if args.selftest:
        for query, completion in SELFTEST:
            s = score_expansion(query, completion)
            print(f"query: {query}\n  " + completion.replace("\n", "\n  "))
            print(f"  => {s.score:.3f} {s.rating}")
            for r in s.reasons:
                print(f"     {r}")
            print()
    scores: list[Score] = []
    bad = 0
    for path in args.files:
        try:
            fh = open(path, encoding="utf-8")
        except OSError as e:
            print(f"error: {path}: cannot read: {e.strerror}", file=sys.stderr)
            return 1
        with fh:
            try:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        query, completion = row["query"], row["completion"]
                    except (ValueError, KeyError, TypeError) as e:
                        print(f"{path}:{lineno}: need a JSON object with 'query' and 'completion' ({e})", file=sys.stderr)
                        bad += 1
                        continue
                    s = score_expansion(query, completion)
                    scores.append(s)
                    if args.verbose:
                        print(f"{path}:{lineno}: {s.score:.3f} {s.rating} {query!r}")
                        for r in s.reasons:
                            print(f"    {r}")
            except UnicodeDecodeError as e:
                print(f"error: {path}: not UTF-8 ({e.reason} at byte {e.start})", file=sys.stderr)
                return 1
    if args.files:
        print(_summarise(scores))
    if bad:
        print(f"error: {bad} bad row(s) skipped (listed above)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
