"""Notes: candidate queries from your own markdown vault, each with the note it should find (pseudo-relevance).

    python -m qmd_unsloth.notes extract --vault DIR --out FILE [--mode local|teacher] [--per-note N] [--seed S]
        [--expand-with teacher|MODEL.gguf] [--teacher-url URL --teacher-model NAME] [--allow-remote]

Reads every ``.md``/``.markdown``/``.txt`` note under the vault: YAML front matter (title, aliases, tags), #tags and
nested tags (#project/alpha), [[wikilinks]] and [[target|alias]], headings, embeds (``![[...]]``, not text), fenced
and indented code blocks (kept in the document, never mined for queries), daily-note names (2024-03-05.md).  Skips
``.obsidian/``, ``.trash/``, ``.git/`` and other hidden folders, binary files and symlink loops; a file that is not
UTF-8 (or has broken front matter) is a warning on stderr naming it, never a crash.

Each output line (JSONL) is ``{"query": str, "source": {"path": "relative/posix.md", "heading": str|null},
"shape": str, "output": [[kind, text], ...]}``; ``output`` is there only when ``--expand-with`` wrote an expansion
(a teacher endpoint, or the current model as a GGUF, sampled the way QMD serves it).  Shapes: title, alias,
heading, tag, entity, question, short, misspelled, date.  Local mode (the default) uses heuristics and no model;
teacher mode asks an OpenAI-compatible endpoint, which must be local (loopback) unless ``--allow-remote`` is given,
because notes are private.  Output is deterministic for a given vault and ``--seed``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .atomic import atomic_write_text
from .cli import UserError, command
from .reward import STOPWORDS, tokens

NOTE_SUFFIXES = (".md", ".markdown", ".txt")
SKIP_DIRS = frozenset({".obsidian", ".trash", ".git"})  # and every other hidden folder
SHAPES = ("title", "alias", "heading", "tag", "entity", "question", "short", "misspelled", "date")
DEFAULT_PER_NOTE = 8
DEFAULT_TEACHER_URL = "http://127.0.0.1:8080/v1"

_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.S)
_FENCE = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^[ \t]{0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_EMBED = re.compile(r"!\[\[([^\]]*)\]\]")
_WIKILINK = re.compile(r"\[\[([^\]|#^]*)(?:[#^][^\]|]*)?(?:\|([^\]]*))?\]\]")
_MDLINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_TAG = re.compile(r"(?<![\w/#&])#([A-Za-z0-9_][\w\-/]*)")
_LIST = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s")
_DAILY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_ENTITY = re.compile(r"\b(?:[A-Z][a-z]+(?:[A-Z][a-z]+)+|[A-Z][a-z]*[A-Z]{2,}[a-z]*|[A-Z]{2,}[0-9]*|"
                     r"[A-Z][a-z]+(?:[ \t][A-Z][a-z]+)*)\b")
_DECIDE = re.compile(r"\b(decid\w*|decision\w*|agreed|chose|settled on)\b", re.I)
GENERIC_HEADINGS = frozenset({"notes", "summary", "overview", "todo", "todos", "tasks", "links", "references",
                              "related", "misc", "log", "ideas", "questions", "details", "context", "background"})


class NotesError(UserError, ValueError):
    """A user-facing problem with the vault, the endpoint or the flags (one line)."""


@dataclass
class Section:
    heading: str | None
    level: int
    text: str  # prose of the section: code, embeds and markup removed


@dataclass
class Note:
    path: str  # relative to the vault, posix separators: the note's doc id
    title: str
    body: str  # the file without its front matter
    aliases: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)  # without '#', nested kept whole: project/alpha
    links: list[str] = field(default_factory=list)  # wikilink targets
    embeds: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    date: _dt.date | None = None  # daily notes

    @property
    def text(self) -> str:
        """The note as a retrieval document: title and body, front matter removed."""
        return f"{self.title}\n{self.body}".strip()

    @property
    def prose(self) -> str:
        return "\n".join(s.text for s in self.sections)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------- reading

def walk_vault(vault: Path) -> Iterator[Path]:
    """Note files under ``vault`` in sorted order: hidden folders, non-note files and symlink loops skipped.

    Links that point inside the vault are not followed (their target is read under its own path); links that
    point outside are followed once each, so a loop or a folder linked twice is read once.
    """
    root_real = os.path.realpath(vault)

    def inside(real: str) -> bool:
        return real == root_real or real.startswith(root_real + os.sep)

    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    for root, dirs, files in os.walk(vault, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:  # a symlink loop outside the vault, or a folder linked twice
            _warn(f"{Path(root)}: folder already read through another path (symlink loop?); skipped")
            dirs[:] = []
            continue
        seen_dirs.add(real)
        keep = []
        for d in sorted(dirs):
            if d in SKIP_DIRS or d.startswith("."):
                continue
            if os.path.islink(os.path.join(root, d)) and inside(os.path.realpath(os.path.join(root, d))):
                continue  # read under its real path
            keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(NOTE_SUFFIXES):
                continue
            path = Path(root) / name
            real_file = os.path.realpath(path)
            if (path.is_symlink() and inside(real_file)) or real_file in seen_files or not os.path.isfile(real_file):
                continue
            seen_files.add(real_file)
            yield path


def _front_matter(text: str, where: Path) -> tuple[dict, str]:
    m = _FRONT.match(text)
    if not m:
        return {}, text
    import yaml

    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 2})" if mark is not None else ""
        _warn(f"{where}: front matter is not valid YAML{line}; read without it")
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    return meta, text[m.end():]


def _str_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = re.split(r"[,\s]+", value) if "," in value or " " not in value.strip() else [value]
    if not isinstance(value, (list, tuple)):
        value = [value]
    return [str(v).strip() for v in value if v is not None and str(v).strip()]


def _strip_code(body: str) -> list[tuple[str | None, int, list[str]]]:
    """Splits the body into (heading, level, prose lines), dropping fenced and indented code blocks."""
    sections: list[tuple[str | None, int, list[str]]] = [(None, 0, [])]
    fence: str | None = None
    prev_blank, in_indented = True, False
    for line in body.splitlines():
        m = _FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = None
            prev_blank = False
            continue
        if m:
            fence = m.group(1)
            continue
        indented = line.startswith(("    ", "\t")) and line.strip() and not _LIST.match(line)
        if indented and (prev_blank or in_indented):
            in_indented = True
            continue
        in_indented = False
        prev_blank = not line.strip()
        h = _HEADING.match(line)
        if h:
            sections.append((h.group(2).strip(), len(h.group(1)), []))
        else:
            sections[-1][2].append(line)
    return sections


def _plain(text: str) -> str:
    """Prose without embeds, inline code, link markup or emphasis: wikilinks become their alias or target."""
    text = _EMBED.sub(" ", text)
    text = _INLINE_CODE.sub(" ", text)
    text = _WIKILINK.sub(lambda m: (m.group(2) or m.group(1) or "").strip(), text)
    text = _MDLINK.sub(lambda m: m.group(1), text)
    text = re.sub(r"[*_=~]{1,3}([^*_=~\n]+)[*_=~]{1,3}", r"\1", text)
    return text


def parse_note(vault: Path, path: Path, raw: str) -> Note:
    rel = path.relative_to(vault).as_posix()
    meta, body = _front_matter(raw, path)
    stem = path.stem
    title = str(meta.get("title") or stem).strip()
    aliases = _str_list(meta.get("aliases", meta.get("alias")))
    tags = [t.lstrip("#") for t in _str_list(meta.get("tags", meta.get("tag")))]
    sections, links, embeds = [], [], []
    for heading, level, lines in _strip_code(body):
        prose = "\n".join(lines)
        embeds += [e.split("|")[0].strip() for e in _EMBED.findall(prose)]
        prose_no_embed = _EMBED.sub(" ", prose)
        links += [target.strip() for target, _ in _WIKILINK.findall(prose_no_embed) if target.strip()]
        for t in _TAG.findall(_INLINE_CODE.sub(" ", prose_no_embed)):
            if not t.replace("/", "").isdigit():
                tags.append(t.strip("/"))
        sections.append(Section(heading, level, _plain(prose)))
    m = _DAILY.match(stem)
    date = None
    if m:
        try:
            date = _dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        except ValueError:
            date = None
    uniq = lambda xs: list(dict.fromkeys(xs))  # noqa: E731
    return Note(rel, title, body, uniq(aliases), uniq(tags), uniq(links), uniq(embeds), sections, date)


def read_note(vault: Path, path: Path) -> Note | None:
    """One note, or None (with a warning naming the file) when it is binary or not UTF-8."""
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:
        _warn(f"{path}: binary file (NUL bytes); skipped")
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        _warn(f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); skipped")
        return None
    return parse_note(vault, path, text)


def read_vault(vault: str | os.PathLike) -> list[Note]:
    """Every readable note of the vault, in a stable order (the one reader: extract and bench retrieval use it)."""
    vault = Path(vault)
    if not vault.is_dir():
        raise NotesError(f"{vault}: vault folder not found")
    notes = []
    for path in walk_vault(vault):
        try:
            note = read_note(vault, path)
        except OSError as e:
            _warn(f"{path}: cannot read ({e.strerror}); skipped")
            continue
        if note is not None:
            notes.append(note)
    return notes


# ------------------------------------------------------------------------------------------------- local candidates

def _words(text: str) -> list[str]:
    return [t for t in tokens(text) if t not in STOPWORDS and len(t) > 1 and t[0].isalpha()]


def _keywords(note: Note, idf: dict[str, float], n: int) -> list[str]:
    tf = Counter(_words(note.prose) + _words(note.title) * 3 + [w for s in note.sections if s.heading
                                                                 for w in _words(s.heading)] * 2)
    return [w for w, _ in sorted(tf.items(), key=lambda kv: (-kv[1] * idf.get(kv[0], 1.0), kv[0]))[:n]]


def _misspell(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    op = rng.choice(("swap", "drop", "double"))
    if op == "swap" and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "drop":
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def _entities(note: Note) -> list[str]:
    """Names: wikilink targets first, then CamelCase, acronyms and capitalised words not at a sentence start."""
    found = [l.rsplit("/", 1)[-1] for l in note.links if l]
    for s in note.sections:
        for line in s.text.splitlines():
            for m in _ENTITY.finditer(line):
                ent, before = m.group(0), line[:m.start()].rstrip()
                if not before or before.endswith((".", "!", "?", "-", "*")):  # a sentence start
                    ent = ent.split(" ", 1)[1] if " " in ent else (ent if not ent.istitle() else "")
                if ent:
                    found.append(ent)
    title_words = set(tokens(note.title)) | {w for a in note.aliases for w in tokens(a)}
    return [e for e in dict.fromkeys(found) if not set(tokens(e)) <= title_words and _words(e)]


def local_candidates(note: Note, idf: dict[str, float], per_note: int, seed: int) -> list[dict]:
    """Heuristic queries for one note, seeded by (seed, path) so one note's candidates never depend on another."""
    rng = random.Random(f"{seed}:{note.path}")
    kw = _keywords(note, idf, 6)
    title_q = " ".join(tokens(note.title)) if not note.date else ""
    topic = title_q or (f"{note.date:%B} {note.date.day}".lower() if note.date else " ".join(kw[:2]))
    out: list[tuple[str, str | None, str]] = []  # (shape, heading, query)

    if title_q:
        out.append(("title", None, title_q))
    for alias in note.aliases:
        out.append(("alias", None, " ".join(tokens(alias))))
    if note.date:
        d = note.date
        month = d.strftime("%B").lower()
        out.append(("date", None, f"{month} {d.day} {d.year}"))
        out.append(("date", None, f"what happened on {month} {d.day}" + (f" {kw[0]}" if kw else "")))
    for s in note.sections:
        if not s.heading:
            continue
        h = " ".join(tokens(s.heading))
        if not _words(h):
            continue
        generic = h in GENERIC_HEADINGS or len(_words(h)) == 1
        query = f"{topic} {h}" if generic and topic and h not in topic else h
        out.append(("heading", s.heading, query))
        if _DECIDE.search(s.heading) or _DECIDE.search(s.text):
            out.append(("question", s.heading, f"what did we decide about {topic}"))
    for tag in note.tags:
        parts = [p for p in re.split(r"[/_\-]", tag.lower()) if p]
        extra = next((w for w in kw if w not in parts), "")
        out.append(("tag", None, " ".join(parts + ([extra] if extra else []))))
    for ent in _entities(note)[:3]:
        e = " ".join(tokens(ent))
        extra = next((w for w in kw if w not in e.split()), "")
        out.append(("entity", None, f"{e} {extra}".strip()))
    if topic:
        templates = ["where are my notes on {t}", "what do I know about {t}", "notes about {t}"]
        if _DECIDE.search(note.prose):
            templates.insert(0, "what did we decide about {t}")
        out.append(("question", None, rng.choice(templates).format(t=topic)))
    if kw:
        out.append(("short", None, " ".join(kw[:2]) if len(kw) > 1 else kw[0]))
    long_words = [w for w in (tokens(title_q) or kw) if len(w) >= 5 and w.isalpha()]
    if long_words:
        w = rng.choice(long_words)
        base = title_q if title_q and w in title_q.split() else " ".join(kw[:2])
        out.append(("misspelled", None, " ".join(_misspell(w, rng) if t == w else t for t in base.split())))

    seen, rows = set(), []
    for shape, heading, query in out:
        query = " ".join(query.split())
        if not query or query in seen:
            continue
        seen.add(query)
        rows.append({"query": query, "source": {"path": note.path, "heading": heading}, "shape": shape})
    if len(rows) > per_note:  # keep one of each shape first, then the rest, in a seeded order
        first = {}
        for r in rows:
            first.setdefault(r["shape"], r)
        rest = [r for r in rows if r not in first.values()]
        rng.shuffle(rest)
        keep = (list(first.values()) + rest)[:per_note]
        rows = [r for r in rows if r in keep]
    return rows


def idf_table(notes: list[Note]) -> dict[str, float]:
    df = Counter(w for n in notes for w in set(_words(n.prose) + _words(n.title)))
    return {w: math.log((1 + len(notes)) / (1 + c)) + 1 for w, c in df.items()}


# ----------------------------------------------------------------------------------------------- teacher endpoint

def check_endpoint(base_url: str, allow_remote: bool) -> None:
    """Notes are private: only a loopback endpoint unless the user names a remote one with --allow-remote."""
    import ipaddress
    from urllib.parse import urlparse

    host = (urlparse(base_url).hostname or "").lower()
    if not host:
        raise NotesError(f"--teacher-url {base_url!r}: not a URL (expected e.g. {DEFAULT_TEACHER_URL})")
    local = host == "localhost" or host.endswith(".localhost")
    try:
        local = local or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not local and not allow_remote:
        raise NotesError(f"--teacher-url {base_url}: {host} is not this machine and notes are private; "
                         "use a local endpoint or pass --allow-remote to send note text there")


_TEACHERS: dict = {}


def teacher_chat(base_url: str, model: str, messages: list[dict], *, allow_remote: bool, seed: int,
                 max_tokens: int = 400, temperature: float = 0.7) -> str:
    """One chat completion through qmd_unsloth.teacher (retries, timeouts, the key from the environment); only a
    loopback endpoint unless allow_remote, because notes are private."""
    from .teacher import Teacher, TeacherError

    check_endpoint(base_url, allow_remote)
    teacher = _TEACHERS.get((base_url, model))
    if teacher is None:
        teacher = _TEACHERS[(base_url, model)] = Teacher(base_url, model, concurrency=1, timeout=120,
                                                         max_tokens=max_tokens, temperature=temperature)
    try:
        return teacher.chat(messages, temperature=temperature, max_tokens=max_tokens, seed=seed).text
    except TeacherError as e:
        raise NotesError(f"--teacher-url {base_url}: {e}") from None


def teacher_candidates(note: Note, ask: Callable[[str], str], per_note: int) -> list[dict]:
    from .teacher_prompts import note_query_messages

    reply = ask(note_query_messages(note.path, note.title, note.tags, note.prose.strip()[:2000], per_note,
                                    tuple(SHAPES)))
    rows, seen = [], set()
    for line in reply.splitlines():
        m = re.match(r"^\s*(?:[-*\d.)\s]*)?(\w+)\s*:\s*(.+?)\s*$", line)
        if not m or m.group(1).lower() not in SHAPES:
            continue
        query = " ".join(m.group(2).strip("\"'").split())
        if query and query.lower() not in seen:
            seen.add(query.lower())
            rows.append({"query": query, "source": {"path": note.path, "heading": None}, "shape": m.group(1).lower()})
    return rows[:per_note]


def make_expander(spec: str, args) -> Callable[[str], list[tuple[str, str]]]:
    """``teacher``: the endpoint writes expansions; ``MODEL.gguf``: the current model, QMD's sampling and grammar."""
    from .prompt import parse_completion

    if spec == "teacher":
        from .teacher_prompts import expansion_messages, parse_expansion

        def expand(query: str) -> list[tuple[str, str]]:
            return parse_expansion(teacher_chat(args.teacher_url, args.teacher_model, expansion_messages(query),
                                                allow_remote=args.allow_remote, seed=args.seed))
        return expand
    path = Path(spec)
    if path.suffix != ".gguf":
        raise NotesError(f"--expand-with {spec}: expected 'teacher' or a .gguf file")
    if not path.is_file():
        raise NotesError(f"--expand-with {spec}: GGUF file not found")
    from .config import EvalConfig, load
    from .eval import GGUFGenerator

    gen = GGUFGenerator(path, load(EvalConfig, None, seed=args.seed, max_new_tokens=args.max_new_tokens))
    return lambda query: parse_completion(gen(query)["completion"])


# ------------------------------------------------------------------------------------------------------------ extract

def extract(args) -> dict:
    vault = Path(args.vault)
    if args.mode == "teacher" or args.expand_with == "teacher":
        check_endpoint(args.teacher_url, args.allow_remote)  # before any note is read
    notes = read_vault(vault)
    if not notes:
        raise NotesError(f"{vault}: no readable notes (.md, .markdown, .txt) found")
    idf = idf_table(notes)
    expander = make_expander(args.expand_with, args) if args.expand_with else None
    from tqdm import tqdm

    rows: list[dict] = []
    for note in tqdm(notes, desc="notes", unit="note", disable=None):
        if args.mode == "teacher":
            ask = lambda p: teacher_chat(args.teacher_url, args.teacher_model, p,  # noqa: E731
                                         allow_remote=args.allow_remote, seed=args.seed)
            cands = teacher_candidates(note, ask, args.per_note)
        else:
            cands = local_candidates(note, idf, args.per_note, args.seed)
        rows.extend(cands)
    if expander is not None:
        for row in tqdm(rows, desc="expanding", unit="query", disable=None):
            pairs = expander(row["query"])
            if pairs:
                row["output"] = [list(p) for p in pairs]
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    shapes = Counter(r["shape"] for r in rows)
    summary = {"notes": len(notes), "candidates": len(rows), "expanded": sum("output" in r for r in rows),
               "shapes": dict(sorted(shapes.items()))}
    print(f"notes: {summary['notes']} notes -> {summary['candidates']} candidates "
          f"({', '.join(f'{k} {v}' for k, v in summary['shapes'].items())}); "
          f"{summary['expanded']} with an expansion; wrote {args.out}")
    return summary


@command("notes")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.notes", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    x = sub.add_parser("extract", help="write candidate queries (with their source note) as JSONL")
    x.add_argument("--vault", required=True, help="folder of markdown/text notes (an Obsidian vault works)")
    x.add_argument("--out", required=True, help="candidates file to write (JSONL)")
    x.add_argument("--mode", choices=("local", "teacher"), default="local",
                   help="local: heuristics, no model (default); teacher: an OpenAI-compatible endpoint writes them")
    x.add_argument("--per-note", type=int, default=DEFAULT_PER_NOTE, metavar="N",
                   help=f"at most N candidates per note (default {DEFAULT_PER_NOTE})")
    x.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    x.add_argument("--expand-with", metavar="teacher|MODEL.gguf",
                   help="write an expansion for each candidate with the teacher endpoint or a GGUF model")
    x.add_argument("--teacher-url", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_TEACHER_URL),
                   help=f"OpenAI-compatible base URL (default $OPENAI_BASE_URL or {DEFAULT_TEACHER_URL})")
    x.add_argument("--teacher-model", default="teacher", help="model name sent to the endpoint")
    x.add_argument("--allow-remote", action="store_true", help="allow a teacher that is not on this machine")
    x.add_argument("--max-new-tokens", type=int, default=256, help="cap on each GGUF expansion (default 256)")
    args = ap.parse_args(argv)
    if args.per_note < 1:
        ap.error("--per-note must be at least 1")
    extract(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
