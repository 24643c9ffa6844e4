"""Training data: the schema, loading, de-duplication, the seeded split, and the `validate`/`prepare`/`stats` tools.

    python -m qmd_unsloth.data validate data/*.jsonl
    python -m qmd_unsloth.data prepare --out runs/prepared
    python -m qmd_unsloth.data stats
    python -m qmd_unsloth.data validate --dataset me/qmd-rows --column query=question --column output=expansions

Rows also come from Hugging Face datasets (a hub id, a save_to_disk folder, parquet/JSONL/CSV files) mapped into the
schema by a column mapping (qmd_unsloth.hf_data, docs/data.md) and checked by the same row validator.

One schema, ``{"query": str, "output": [[kind, text], ...]}`` with kind in lex/vec/hyde, optional ``category``,
``intent`` and ``lang`` (the query's ISO 639-1 code, e.g. ``zh``; untagged rows are English unless their script
says otherwise); unknown fields are ignored.  No torch import here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .atomic import atomic_write_text
from .cli import UserError, command
from .prompt import KINDS_ORDER
from .reward import ISO_639_1, STOPWORDS, _stem, is_cjk, language_of, tokens

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SPLIT_SEED = 42
VAL_FRACTION = 0.05


class DataError(UserError, ValueError):
    """Bad training data; ``errors`` holds one ``PATH:LINE: reason`` string per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__(errors[0] if len(errors) == 1 else f"{len(errors)} problems, first: {errors[0]}")


@dataclass(frozen=True)
class Example:
    query: str
    output: tuple[tuple[str, str], ...]
    category: str | None = None
    intent: str | None = None
    lang: str | None = None

    @property
    def language(self) -> str:
        """The query's language: the ``lang`` tag, else detected by the reward's rule, else English."""
        return language_of(self.query, self.lang)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(self.output)

    def kinds(self) -> Counter:
        return Counter(k for k, _ in self.output)


def _check_row(row) -> Example:
    """Validates one decoded JSON value; raises ValueError with a one-line reason naming the field."""
    if not isinstance(row, dict):
        raise ValueError(f"not a JSON object (got {type(row).__name__})")
    query = row.get("query")
    if "query" not in row:
        raise ValueError("query: missing")
    if not isinstance(query, str):
        raise ValueError(f"query: must be a string (got {type(query).__name__})")
    if not query.strip():
        raise ValueError("query: empty")
    if "output" not in row:
        raise ValueError("output: missing")
    output = row["output"]
    if not isinstance(output, list) or not output:
        raise ValueError("output: must be a non-empty list of [kind, text] pairs")
    pairs = []
    for i, pair in enumerate(output):
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise ValueError(f"output[{i}]: must be a [kind, text] pair of two strings (got {json.dumps(pair)[:60]})")
        kind, text = pair
        if kind not in KINDS_ORDER:
            raise ValueError(f"output[{i}]: unknown kind {kind!r} (expected lex, vec or hyde)")
        if not text.strip():
            raise ValueError(f"output[{i}]: empty {kind} text")
        if "\n" in text.strip():
            raise ValueError(f"output[{i}]: {kind} text spans several lines")
        pairs.append((kind, " ".join(text.split())))
    for key in ("category", "intent"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"{key}: must be a string")
    lang = row.get("lang")
    if lang is not None and (not isinstance(lang, str) or lang not in ISO_639_1):
        raise ValueError(f"lang: {json.dumps(lang, ensure_ascii=False)[:40]} is not a two-letter lowercase ISO 639-1 "
                         "code (such as zh, ja, de); fix it or drop the field")
    return Example(" ".join(query.split()), tuple(pairs), row.get("category"), row.get("intent"), lang)


def check_row(row) -> Example:
    """Validates one decoded JSON row (the schema every row file follows); raises ValueError naming the field."""
    return _check_row(row)


def read_examples(path: str | os.PathLike) -> Iterator[tuple[int, Example | None, str | None]]:
    """Yields (line number, example, None) or (line number, None, error) for every non-blank line of a JSONL file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        yield 0, None, "file not found"
        return
    except OSError as e:
        yield 0, None, f"cannot read: {e.strerror}"
        return
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, None, f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            yield lineno, None, f"bad JSON: {e.msg} at column {e.colno}"
            continue
        try:
            yield lineno, _check_row(row), None
        except ValueError as e:
            yield lineno, None, str(e)


def data_files(paths: Iterable[str | os.PathLike] | None = None, datasets=None) -> list[Path]:
    """The given files, the *.jsonl files of given folders, or every data/*.jsonl when nothing is given (with
    ``datasets`` given, an empty list of paths means no JSONL files: the datasets alone)."""
    if datasets and paths is not None and not list(paths):
        return []
    out: list[Path] = []
    for p in [DEFAULT_DATA_DIR] if not paths else paths:
        p = Path(p)
        out.extend(sorted(p.glob("*.jsonl")) if p.is_dir() else [p])
    return out


def validate(paths: Iterable[str | os.PathLike], datasets=None) -> tuple[list[str], int]:
    """Returns (every problem as ``PATH:LINE: reason`` or ``SOURCE[SPLIT]:ROW: reason``, number of good rows).  A
    dataset that cannot be loaded raises DatasetSourceError (one line)."""
    errors, good = [], 0
    for path in data_files(paths, datasets):
        for lineno, ex, err in read_examples(path):
            if err:
                errors.append(f"{path}:{lineno}: {err}" if lineno else f"{path}: {err}")
            else:
                good += 1
    for rows, errs in _dataset_rows(datasets):
        errors.extend(errs)
        good += len(rows)
    return errors, good


def _dataset_rows(datasets):
    """(examples, errors) of each Hugging Face dataset source (none: nothing imported)."""
    if not datasets:
        return []
    from .hf_data import examples, parse_specs

    return [examples(spec) for spec in parse_specs(datasets)]


def normalise_query(query: str) -> str:
    """Case, punctuation and spacing folded: the key for exact de-duplication."""
    return " ".join(tokens(query))


def near_duplicate_key(query: str) -> str:
    """Order, stopwords and plural endings folded: two queries with the same key are near-duplicates.  CJK text has
    no spaces, so its characters are the units (``容器网络`` and ``网络 容器`` share a key)."""
    toks = set()
    for t in tokens(query):
        if is_cjk(t):
            toks.update(t)
        elif t not in STOPWORDS:
            toks.add(_stem(t))
    return " ".join(sorted(toks or set(tokens(query))))


def load_examples(paths: Iterable[str | os.PathLike] | None = None, dedupe: bool = True,
                  datasets=None) -> list[Example]:
    """Every example of the files (or data/*.jsonl), then of the datasets; raises DataError listing every bad row."""
    errors, examples, seen = [], [], set()

    def add(ex):
        key = normalise_query(ex.query)
        if dedupe and key in seen:
            return
        seen.add(key)
        examples.append(ex)

    for path in data_files(paths, datasets):
        for lineno, ex, err in read_examples(path):
            if err:
                errors.append(f"{path}:{lineno}: {err}" if lineno else f"{path}: {err}")
                continue
            add(ex)
    for rows, errs in _dataset_rows(datasets):
        errors.extend(errs)
        for ex in rows:
            add(ex)
    if errors:
        raise DataError(errors)
    return examples


def check_rows(paths=None, seed: int = SPLIT_SEED, val_fraction: float = VAL_FRACTION,
               datasets=None) -> list[Example]:
    """The examples, or DataError when a file is bad or no training row is left (an empty file or folder)."""
    examples = load_examples(paths, datasets=datasets)
    if not split(examples, seed, val_fraction)[0]:
        sources = [str(p) for p in data_files(paths, datasets)] if datasets else \
            [str(p) for p in (paths or [DEFAULT_DATA_DIR])]
        if datasets:
            from .hf_data import parse_specs

            sources += [spec.label for spec in parse_specs(datasets)]
        where = ", ".join(sources)
        raise DataError([f"{where}: no training rows (an empty file, or a folder without *.jsonl files)"])
    return examples


def is_val(query: str, seed: int = SPLIT_SEED, val_fraction: float = VAL_FRACTION) -> bool:
    """Deterministic split by a seeded hash of the normalised query: adding rows never moves old ones."""
    digest = hashlib.sha256(f"{seed}:{normalise_query(query)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split(examples: list[Example], seed: int = SPLIT_SEED, val_fraction: float = VAL_FRACTION):
    train, val = [], []
    for ex in examples:
        (val if is_val(ex.query, seed, val_fraction) else train).append(ex)
    return train, val


def data_hash(paths: Iterable[str | os.PathLike] | None = None, datasets=None) -> str:
    """SHA-256 over the data files' names and bytes, and each dataset's source and rows (recorded in every run
    folder)."""
    h = hashlib.sha256()
    for p in data_files(paths, datasets):
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    if datasets:
        from .hf_data import fingerprint, parse_specs

        for spec in parse_specs(datasets):
            h.update(fingerprint(spec).encode())
    return h.hexdigest()


def prepared_rows(examples: list[Example], chat_format=None) -> list[dict]:
    """Rows in the prompt/completion form TRL's trainers take, plus the query (the GRPO reward reads it).
    ``chat_format``: the model's ``prompt.ChatFormat`` (None: the Qwen3 base)."""
    from .prompt import format_target, render_example

    rows = []
    for ex in examples:
        rendered = render_example(ex.query, ex.pairs, chat_format)
        rows.append({"query": ex.query, "category": ex.category or "", "lang": ex.language,
                     "target": format_target(ex.pairs), **rendered})
    return rows


def prepare(out_dir, paths=None, seed: int = SPLIT_SEED, val_fraction: float = VAL_FRACTION,
            chat_format=None, datasets=None) -> dict:
    """Writes ``train.jsonl``, ``val.jsonl`` and ``prepare.json`` (counts, seed, data hash) into ``out_dir``."""
    examples = check_rows(paths, seed, val_fraction, datasets)
    train, val = split(examples, seed, val_fraction)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # an output folder that cannot be made fails before the rendering
    for name, part in (("train", train), ("val", val)):
        rows = prepared_rows(part, chat_format)
        atomic_write_text(out_dir / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    meta = {"train": len(train), "val": len(val), "seed": seed, "val_fraction": val_fraction,
            "data_hash": data_hash(paths, datasets), "files": [str(p) for p in data_files(paths, datasets)]}
    if datasets:
        from .hf_data import parse_specs

        meta["datasets"] = [spec.label for spec in parse_specs(datasets)]
    atomic_write_text(out_dir / "prepare.json", json.dumps(meta, indent=2) + "\n")
    return meta


def stats(examples: list[Example], raw_count: int | None = None) -> dict:
    """Counts by category, query length, lines per kind, the reward distribution and duplicate checks."""
    from .prompt import format_target
    from .reward import RATINGS, score_expansion

    n = len(examples)
    scores = [score_expansion(ex.query, format_target(ex.pairs), ex.language) for ex in examples]
    words = [len(ex.query.split()) for ex in examples]
    near = Counter(near_duplicate_key(ex.query) for ex in examples)
    by_cat: dict[str, list[float]] = {}
    for ex, s in zip(examples, scores):
        by_cat.setdefault(ex.category or "(none)", []).append(s.score)
    by_lang: dict[str, list] = {}
    for ex, s in zip(examples, scores):
        by_lang.setdefault(ex.language, []).append(s)
    kinds = {k: Counter(ex.kinds().get(k, 0) for ex in examples) for k in KINDS_ORDER}
    ratings = Counter(s.rating for s in scores)
    return {
        "rows": n,
        "duplicates_removed": (raw_count - n) if raw_count is not None else 0,
        "near_duplicate_groups": sum(1 for c in near.values() if c > 1),
        "categories": {c: {"rows": len(v), "mean_reward": round(sum(v) / len(v), 4)} for c, v in sorted(by_cat.items())},
        "languages": {lang: {"rows": len(v), "mean_reward": round(sum(s.score for s in v) / len(v), 4),
                             "excellent_fraction": round(sum(s.rating == "Excellent" for s in v) / len(v), 4),
                             "lines_in_language": round(sum(s.lines_in_language for s in v)
                                                        / max(1, sum(s.lines_judged for s in v)), 4)}
                      for lang, v in sorted(by_lang.items(), key=lambda kv: (-len(kv[1]), kv[0]))},
        "query_words": {"mean": round(sum(words) / n, 2) if n else 0, "short_le_2": sum(w <= 2 for w in words),
                        "short_fraction": round(sum(w <= 2 for w in words) / n, 4) if n else 0,
                        "max": max(words, default=0)},
        "lines_per_kind": {k: dict(sorted(c.items())) for k, c in kinds.items()},
        "hyde_fraction": round(sum(1 for ex in examples if ex.kinds().get("hyde")) / n, 4) if n else 0,
        "reward": {"mean": round(sum(s.score for s in scores) / n, 4) if n else 0,
                   "ratings": {name: ratings.get(name, 0) for _, name in RATINGS},
                   "excellent_fraction": round(ratings.get("Excellent", 0) / n, 4) if n else 0},
        "_scores": scores,
    }


def _print_stats(st: dict, examples: list[Example], show_bad: int) -> None:
    print(f"rows: {st['rows']} (exact duplicates removed: {st['duplicates_removed']}, "
          f"near-duplicate groups: {st['near_duplicate_groups']})")
    print("by category:")
    for cat, c in st["categories"].items():
        print(f"  {cat:<20} {c['rows']:>5}  mean reward {c['mean_reward']:.3f}")
    print("by language (the row's lang tag, else detected; share of lines written in the query's language):")
    for lang, c in st["languages"].items():
        print(f"  {lang:<4} {c['rows']:>5}  mean reward {c['mean_reward']:.3f}  Excellent {c['excellent_fraction']:.1%}"
              f"  in language {c['lines_in_language']:.1%}")
    qw = st["query_words"]
    print(f"query words: mean {qw['mean']}, max {qw['max']}, <= 2 words: {qw['short_le_2']} ({qw['short_fraction']:.1%})")
    for kind, c in st["lines_per_kind"].items():
        print(f"{kind} lines per row: " + ", ".join(f"{k}: {v}" for k, v in c.items()))
    print(f"hyde present: {st['hyde_fraction']:.1%}")
    r = st["reward"]
    print(f"reward: mean {r['mean']:.3f}; " + ", ".join(f"{k} {v}" for k, v in r["ratings"].items())
          + f" ({r['excellent_fraction']:.1%} Excellent)")
    bad = [(s, ex) for s, ex in zip(st["_scores"], examples) if s.rating != "Excellent"]
    for s, ex in sorted(bad, key=lambda p: p[0].score)[:show_bad]:
        print(f"  {s.score:.2f} {s.rating:<10} {ex.query!r}: " + "; ".join(s.reasons))


@command("data")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.data", description="Training data tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="report every bad line as PATH:LINE: reason")
    v.add_argument("paths", nargs="*", help="JSONL files or folders")
    p = sub.add_parser("prepare", help="write train/val prompt/completion files")
    p.add_argument("paths", nargs="*", help="JSONL files or folders (default: data/*.jsonl, unless --dataset)")
    p.add_argument("--out", default="runs/prepared", help="output folder (default: runs/prepared)")
    p.add_argument("--seed", type=int, default=SPLIT_SEED)
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    s = sub.add_parser("stats", help="counts, lengths, lines per kind and the reward distribution")
    s.add_argument("paths", nargs="*", help="JSONL files or folders (default: data/*.jsonl, unless --dataset)")
    s.add_argument("--show-bad", type=int, default=20, metavar="N", help="list the N lowest rows not rated Excellent")
    s.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    for sp in (v, p, s):
        g = sp.add_argument_group("Hugging Face datasets (docs/data.md)")
        g.add_argument("--dataset", action="append", default=[], metavar="SOURCE",
                       help="hub id, save_to_disk folder, or parquet/JSONL/CSV files (repeatable)")
        g.add_argument("--split", default="train", help="split to read (default: train)")
        g.add_argument("--name", help="the hub dataset's configuration name")
        g.add_argument("--revision", help="hub revision")
        g.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                       help="map our field (query, output, hyde, lex, vec, text, lang, category, intent) to a column")
    args = ap.parse_args(argv)
    paths, datasets = _sources(ap, args)

    if args.cmd == "validate":
        if not paths and not datasets:
            ap.error("give JSONL files or folders, or --dataset SOURCE")
        if paths and not data_files(paths):
            raise DataError([f"{', '.join(args.paths)}: no *.jsonl files in this folder"])
        errors, good = validate(paths, datasets)
        for e in errors:
            print(e)
        print(f"{'error: ' if errors else ''}{good} good rows, {len(errors)} problem(s)", file=sys.stderr)
        return 1 if errors else 0
    try:
        if args.cmd == "prepare":
            if not 0 <= args.val_fraction < 1:
                ap.error("--val-fraction must be in [0, 1)")
            meta = prepare(args.out, paths, args.seed, args.val_fraction, datasets=datasets)
            print(f"wrote {args.out}/train.jsonl ({meta['train']} rows) and {args.out}/val.jsonl ({meta['val']} rows)")
            return 0
        raw = sum(1 for p in data_files(paths, datasets) for _, ex, _ in read_examples(p) if ex) \
            + sum(len(rows) for rows, _ in _dataset_rows(datasets))
        examples = load_examples(paths, datasets=datasets)
        st = stats(examples, raw)
        _print_stats(st, examples, args.show_bad)
        if args.json:
            atomic_write_text(args.json, json.dumps({k: v for k, v in st.items() if k != "_scores"}, indent=2) + "\n")
        return 0
    except DataError as e:
        if len(e.errors) == 1:
            raise
        for err in e.errors[:10]:
            print(err, file=sys.stderr)
        more = " (the first 10 above; python -m qmd_unsloth.data validate lists all)" if len(e.errors) > 10 else ""
        print(f"error: {len(e.errors)} problems in the data{more}", file=sys.stderr)
        return 1


def _sources(ap: argparse.ArgumentParser, args) -> tuple[list[str] | None, list | None]:
    """(JSONL paths, dataset sources) of a data command: with --dataset and no paths, the datasets alone."""
    if not args.dataset:
        if args.column:
            ap.error("--column needs --dataset")
        return (args.paths or None), None
    columns = {}
    for c in args.column:
        field, sep, col = c.partition("=")
        if not sep or not field.strip() or not col.strip():
            ap.error(f"--column {c}: expected FIELD=COLUMN, e.g. query=question")
        columns[field.strip()] = col.strip()
    from pydantic import ValidationError

    from .hf_data import HFDataset

    try:
        datasets = [HFDataset(source=d, split=args.split, name=args.name, revision=args.revision, columns=columns)
                    for d in args.dataset]
    except ValidationError as e:
        ap.error(f"--column: {e.errors()[0]['msg'].removeprefix('Value error, ')}")
    return args.paths or [], datasets


if __name__ == "__main__":
    raise SystemExit(main())
