"""Teacher prompts: what a teacher model is asked to write for `generate`, and how its answers are read.

The one place these prompts live.  Two requests:

* query generation: ``query_messages(topic, description, shape, n, avoid)`` asks for ``n`` search queries on a topic
  in one of ``SHAPES`` (short keywords, questions, misspellings, named entities, dates, quoted phrases, personal notes,
  other languages); ``parse_queries`` reads the answer.
* expansion: ``expansion_messages(query)`` asks for the lex/vec/hyde lines; ``parse_expansion`` reads them from
  plain lines, bullets, code fences or JSON.  The rubric in its system message is built by ``expansion_rubric`` from
  ``rubric_facts()``, which reads qmd_unsloth.reward's own constants, so the prompt and the reward cannot drift apart.

Standard library only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .cli import UserError

# The categories of data/README.md (one data/<name>.jsonl each); tests check the three agree.
TOPICS = {
    "programming": "languages, libraries, frameworks, concrete APIs",
    "personal_notes": "what people type to search their own notes, meetings, projects",
    "ml_ai": "training, fine-tuning, RAG, embeddings, named models",
    "devops": "docker, kubernetes, terraform, CI/CD, cloud, linux admin",
    "errors_debugging": "error messages, exit codes, debugging techniques",
    "short_keywords": "1-2 word queries and acronyms over all topics",
    "databases": "SQL and NoSQL engines, indexes, transactions, replication",
    "temporal": 'recency and versions: "latest", years, changelogs',
    "science": "physics, chemistry, biology, astronomy, earth science, math",
    "finance_legal": "personal finance, tax, investing, contracts, privacy law",
    "howto": "cooking, cleaning, home repair, gardening, household tech",
    "travel_places": "cities, landmarks, transport, visas",
    "people_orgs": "named people, companies, universities, foundations",
    "quoted_phrases": "queries with an exact phrase in double quotes",
    "long_questions": "full natural questions of 13-22 words",
    "misspellings": "realistic typos; expansions use the corrected spelling",
    "health_fitness": "exercise, nutrition, sleep, injuries",
}

# Query shapes: (what the query looks like, an example).
SHAPES = {
    "short_keywords": ("1-2 words or an acronym", "tls 1.3"),
    "keywords": ("3-5 keywords, no question words", "postgres vacuum table bloat"),
    "question": ("a natural question of 6-12 words", "how do I rotate logs without restarting nginx"),
    "long_question": ("a full natural question of 13-22 words",
                      "what is the safest way to migrate a large mysql database to postgres without downtime"),
    "misspelling": ("a query with one or two realistic typos (a missing, doubled or swapped letter)",
                    "kubernets ingres controler"),
    "named_entity": ("a query naming a specific product, library, person, company or place",
                     "Django ORM select_related"),
    "temporal": ("a query about a version, a year, a date or what is latest", "python 3.13 release notes"),
    "quoted_phrase": ("a query holding an exact phrase in double quotes", '"connection reset by peer" nginx'),
    "personal_notes": ("what someone types to find something in their own notes, meetings or journal",
                       "standup notes tuesday"),
    "other_language": ("a query written in German, French, Spanish, Portuguese, Japanese or Chinese (not English)",
                       "docker volumen berechtigungen"),
}
# Categories that are themselves a shape always use it; the others mix these shapes (keywords and questions twice:
# they are what people type most).
SHAPE_OF_TOPIC = {"short_keywords": "short_keywords", "misspellings": "misspelling", "quoted_phrases": "quoted_phrase",
                  "long_questions": "long_question", "temporal": "temporal", "personal_notes": "personal_notes"}
MIXED_SHAPES = ("keywords", "keywords", "question", "question", "short_keywords", "long_question", "misspelling",
                "named_entity", "temporal", "quoted_phrase", "other_language")
ANY_SUBJECT = "any subject: technology, science, work, money, health, travel, everyday life"


def shapes_for(topic: str) -> tuple[str, ...]:
    """The shapes queries of a topic are drawn from."""
    return (SHAPE_OF_TOPIC[topic],) if topic in SHAPE_OF_TOPIC else MIXED_SHAPES


class TopicsError(UserError, ValueError):
    """A bad --topics file (one line naming the file and line)."""


def read_topics(path: str | Path) -> dict[str, str]:
    """``--topics FILE``: one topic a line, ``name: description`` or just a name; blank and ``#`` lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise TopicsError(f"{path}: topics file not found")
    topics: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, desc = line.partition(":")
        name = "_".join(name.split()).lower()
        if not re.fullmatch(r"[\w-]{1,60}", name):
            raise TopicsError(f"{path}:{lineno}: topic name {name[:40]!r} must be a short word (letters, digits, _ or -)")
        topics[name] = " ".join(desc.split()) or name.replace("_", " ")
    if not topics:
        raise TopicsError(f"{path}: no topics (write one 'name: description' a line)")
    return topics


def query_messages(topic: str, description: str, shape: str, n: int, avoid: list[str] = ()) -> list[dict]:
    """The chat asking for ``n`` queries on ``topic`` in ``shape`` (``avoid``: existing queries not to repeat)."""
    what, example = SHAPES[shape]
    subject = ANY_SUBJECT if topic in SHAPE_OF_TOPIC else description
    lines = [f"Write {n} different search queries that real people would type into a search box.",
             f"Topic: {topic.replace('_', ' ')} ({subject}).",
             f"Each query is {what}, for example: {example}",
             "Cover different sub-topics, specific names and details; no two queries about the same thing."]
    if avoid:
        lines.append("Do not repeat or rephrase these existing queries: " + "; ".join(avoid) + ".")
    lines.append("Answer with the queries only, one a line: no numbering, no quotes around a query, no comments.")
    return [{"role": "system", "content": "You write realistic, varied search queries."},
            {"role": "user", "content": "\n".join(lines)}]


# -- the expansion rubric, from the reward's own rules ---------------------------------------------------------------
# Line-count limits the reward enforces with literals (at most 3 lex, 3 vec, 1 hyde lines; hyde first; vec lines of
# 3+ words): kept here with a test that scores completions at and past each limit, so a change in the reward fails it.
def note_query_messages(path: str, title: str, tags, excerpt: str, n: int, shapes: tuple[str, ...]) -> list[dict]:
    """The chat asking for search queries that should find one private note (``notes extract --mode teacher``)."""
    return [{"role": "user", "content": (
        f"You help build search training data from a private note. Write {n} different search queries a person "
        "would type to find this note again, one per line, each as SHAPE: query, with SHAPE one of "
        f"{', '.join(shapes)}. Mix short keyword queries, names, a question such as \"what did we decide about "
        "X\" and one with a typo. Reply with the lines only.\n\n"
        f"Note path: {path}\nTitle: {title}\nTags: {', '.join(tags) or '-'}\n\n{excerpt}\n")}]


LINE_LIMITS = {"lex": 3, "vec": 3, "hyde": 1}
VEC_MIN_WORDS = 3
# The worked example in the prompt; a test proves the reward gives it full marks.
EXAMPLE = ("docker volume permissions", "\n".join([
    "hyde: Files in a named Docker volume keep the UID of the process that wrote them; chown /data in the image or "
    "run with --user 1000:1000.",
    "lex: docker volume permission denied",
    "lex: docker volume chown uid",
    "lex: named volume ownership",
    "vec: why does my docker container get permission denied when writing to a volume",
    "vec: how to give the container user ownership of files in a docker volume"]))


def rubric_facts() -> dict:
    """The reward's numbers the expansion prompt states (the one coupling to qmd_unsloth.reward)."""
    from . import reward

    return {"max_points": dict(reward.MAX_POINTS), "total_points": reward.TOTAL_POINTS,
            "hyde_min_chars": reward.HYDE_MIN_CHARS, "hyde_max_chars": reward.HYDE_MAX_CHARS,
            "lex_max_terms": reward.LEX_MAX_TERMS, "filler": tuple(reward.FILLER), "kinds": tuple(reward.KINDS),
            "line_limits": dict(LINE_LIMITS), "vec_min_words": VEC_MIN_WORDS, "example": EXAMPLE}


def expansion_rubric(facts: dict | None = None) -> str:
    """The system message of an expansion request: the format and the reward's rubric in words."""
    f = facts or rubric_facts()
    lim, pts = f["line_limits"], f["max_points"]
    filler = ", ".join(f'"{x}"' for x in f["filler"][:6])
    example_query, example = f["example"]
    return "\n".join([
        "You expand search queries for a hybrid search engine (BM25 full-text search plus vector search).",
        "Answer with lines only, each starting with an exact lowercase prefix: " + ", ".join(
            f'"{k}: "' for k in f["kinds"]) + ". No other text: no headings, numbering, code fences or thinking.",
        f"- hyde: at most {lim['hyde']} line, written first: a specific passage of {f['hyde_min_chars']}-"
        f"{f['hyde_max_chars']} characters that a relevant document would contain, sharing a term with the query, "
        "without repeating words.",
        f"- lex: 1-{lim['lex']} lines of keywords for full-text search, 2-{f['lex_max_terms']} terms each (every term "
        f"must match, so more than {f['lex_max_terms']} is penalised); keywords, not questions; shorter than the vec "
        "lines; keep every named entity of the query (acronyms, proper nouns, versions, technical tokens such as "
        "node.js or C++) in every lex line.",
        f"- vec: 1-{lim['vec']} natural-language lines of at least {f['vec_min_words']} words, different from the "
        "query and from each other (not the query's words reordered).",
        "- Every line shares a term with the query (a line without one is dropped). Never repeat the query as a "
        f"line. No generic filler such as {filler}.",
        "- Keep the language of the query. For a misspelled query, write the lines with the corrected spelling.",
        f"Scoring ({f['total_points']} points): " + ", ".join(f"{k} {v}" for k, v in pts.items()) + ".",
        "",
        f"Example for the query: {example_query}",
        example,
    ])


def expansion_messages(query: str, rubric: str | None = None) -> list[dict]:
    """The chat asking for one query's expansion."""
    return [{"role": "system", "content": rubric or expansion_rubric()},
            {"role": "user", "content": f"Query: {' '.join(query.split())}"}]


# -- reading answers ---------------------------------------------------------------------------------------------------
_THINK = re.compile(r"<think>.*?(</think>|\Z)", re.S | re.I)
_FENCE = re.compile(r"^\s*```[\w-]*\s*$", re.M)
_EXPANSION_LINE = re.compile(
    r"^\s*(?:[-*\u2022]\s+|\d{1,2}[.)]\s+)?[*_`]{0,2}(lex|vec|hyde)[*_`]{0,2}\s*:[*_`]{0,2}\s*(.+?)\s*$", re.I)
_PREAMBLE = re.compile(r"^(here (are|is)|sure|certainly|of course|okay|ok[,.!]|note:|these|below|i hope)", re.I)


def _clean(text: str) -> str:
    return _FENCE.sub("", _THINK.sub("", text or "")).strip()


def _json_value(text: str):
    """The JSON value in ``text`` (whole, or the first {...} / [...] span), or None."""
    for candidate in (text, *(m.group(0) for m in re.finditer(r"[\[{].*[\]}]", text, re.S))):
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError):
            continue
    return None


def _unquote(text: str) -> str:
    text = text.strip().rstrip(",").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`" and text.count(text[0]) == 2:
        text = text[1:-1]
    return " ".join(text.split())


def _pairs_from_json(value) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        if isinstance(value.get("output"), list):
            return _pairs_from_json(value["output"])
        out = []
        for kind in ("hyde", "lex", "vec"):
            v = next((value[k] for k in value if isinstance(k, str) and k.lower() == kind), None)
            for text in ([v] if isinstance(v, str) else v if isinstance(v, list) else []):
                if isinstance(text, str) and text.strip():
                    out.append((kind, " ".join(text.split())))
        return out
    out = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
                kind, text = item
            elif isinstance(item, dict):
                kind = item.get("kind") or item.get("type") or ""
                text = item.get("text") or item.get("content") or ""
            else:
                continue
            if isinstance(kind, str) and kind.lower() in ("lex", "vec", "hyde") and isinstance(text, str) and text.strip():
                out.append((kind.lower(), " ".join(text.split())))
    return out


def parse_expansion(text: str) -> list[tuple[str, str]]:
    """(kind, text) pairs from a teacher's answer: ``kind: text`` lines (bullets, bold, numbering and code fences
    tolerated, prose ignored), or JSON (``{"hyde": ..., "lex": [...], "vec": [...]}``, ``{"output": [[kind, text]]}``
    or a list of pairs).  Empty when nothing usable is there."""
    body = _clean(text)
    if body[:1] in "[{":
        pairs = _pairs_from_json(_json_value(body))
        if pairs:
            return pairs
    pairs = []
    for line in body.splitlines():
        m = _EXPANSION_LINE.match(line)
        if m:
            value = _unquote(m.group(2).strip("*` "))
            if value:
                pairs.append((m.group(1).lower(), value))
    return pairs


def parse_queries(text: str, max_words: int = 30) -> list[str]:
    """Queries from a teacher's answer: one a line (numbering, bullets and wrapping quotes removed; preambles and
    headings dropped) or a JSON list (or ``{"queries": [...]}``).  Order kept, exact repeats dropped."""
    body = _clean(text)
    value = _json_value(body) if body[:1] in "[{" else None
    if isinstance(value, dict):
        value = next((v for v in value.values() if isinstance(v, list)), None)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        candidates = value
    else:
        candidates = []
        for line in body.splitlines():
            line = re.sub(r"^\s*(?:[-*\u2022]\s+|\d{1,3}[.)]\s+|#+\s+)", "", line).strip()
            if not line or line.endswith(":") or _PREAMBLE.match(line):
                continue
            candidates.append(line.strip("*` "))
    out, seen = [], set()
    for q in candidates:
        q = _unquote(q)
        if not q or len(q) > 200 or len(q.split()) > max_words or q.lower() in seen:
            continue
        seen.add(q.lower())
        out.append(q)
    return out
