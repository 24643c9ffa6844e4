"""Training rows from a Hugging Face dataset: a hub id, a ``save_to_disk`` folder, or parquet / JSONL / CSV files,
mapped into our schema by a column mapping and checked by the same row validator as ``data/*.jsonl``.

    hf_datasets:                                   # configs/sft.yaml, configs/grpo.yaml (docs/data.md)
      - source: me/qmd-rows                        # hub id (from the local HF cache when offline)
        split: train
        columns: {query: question, output: expansions}
      - source: exports/rows-*.parquet             # files (globs), or a folder written by save_to_disk
        columns: {query: q, hyde: passage, lex: keywords, vec: questions}
      - source: more.jsonl
        columns: {query: q, text: completion}      # "lex: ...\\nvec: ..." lines, as the model writes them

``columns`` maps our fields to the dataset's columns.  The answer comes from exactly one of: ``output`` (a list of
``[kind, text]`` pairs or ``{"kind", "text"}`` objects, or a JSON string of one), ``hyde``/``lex``/``vec`` (each a
string or a list of strings), or ``text`` (``kind: text`` lines).  ``lang``, ``category`` and ``intent`` are optional.
Unmapped, ``query`` and ``output`` are read from columns of those names.  A bad row is ``SOURCE[SPLIT]:ROW: field:
reason (column 'c')``, like ``PATH:LINE: reason`` for JSONL; a dataset that cannot be loaded is one line.

Standard library and pydantic at import; ``datasets`` is imported only when a dataset is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .cli import UserError

FIELDS = ("query", "output", "hyde", "lex", "vec", "text", "lang", "category", "intent")
ANSWER_FORMS = (("output",), ("hyde", "lex", "vec"), ("text",))
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class DatasetSourceError(UserError, ValueError):
    """A dataset that cannot be loaded or mapped (one line naming the source)."""


class HFDataset(BaseModel):
    """One dataset source (a plain string is its ``source``)."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1, description="hub id, save_to_disk folder, or parquet/JSONL/CSV files (globs)")
    split: str = Field("train", description="the split to read")
    name: str | None = Field(None, description="the hub dataset's configuration name")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    columns: dict[str, str] = Field(default_factory=dict, description="our field -> the dataset's column")

    @model_validator(mode="before")
    @classmethod
    def _plain_source(cls, value):
        return {"source": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _mapping(self):
        unknown = sorted(set(self.columns) - set(FIELDS))
        if unknown:
            raise ValueError(f"columns: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
        forms = [f for f in ANSWER_FORMS if any(k in self.columns for k in f)]
        if len(forms) > 1:
            raise ValueError("columns: map the answer from one of output, hyde/lex/vec or text, not several (got "
                             + ", ".join(k for f in forms for k in f if k in self.columns) + ")")
        return self

    @property
    def label(self) -> str:
        return f"{self.source}[{self.split}]"

    def mapping(self) -> dict[str, str]:
        """Our field -> column, with the defaults filled in (query, and output unless another form is mapped)."""
        out = {"query": "query", **self.columns}
        if not any(k in out for f in ANSWER_FORMS for k in f):
            out["output"] = "output"
        return out


def parse_specs(values) -> list[HFDataset]:
    return [v if isinstance(v, HFDataset) else HFDataset.model_validate(v) for v in values or []]


# ---------------------------------------------------------------------------------------------------- loading


def _offline() -> bool:
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _local_files(source: str) -> list[str] | None:
    """The files a local source names (a file, a glob, or a folder of data files), or None when it is not local."""
    import glob

    p = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        return sorted(glob.glob(str(p))) or []
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.suffix in FILE_BUILDERS and f.is_file())
    return None


def load_split(spec: HFDataset):
    """The ``datasets.Dataset`` of one source's split; DatasetSourceError with one line when it cannot be had."""
    try:
        import datasets
    except ModuleNotFoundError:
        raise DatasetSourceError(f"{spec.source}: the 'datasets' package is needed to read it (pip install "
                                 "datasets)") from None
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    p = Path(spec.source).expanduser()
    try:
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise DatasetSourceError(f"{spec.source}: no split {spec.split!r} (splits: {', '.join(ds)})")
                ds = ds[spec.split]
            return ds
        files = _local_files(spec.source)
        if files is not None:
            return _load_files(spec, files)
        return _load_hub(spec)
    except DatasetSourceError:
        raise
    except ValueError as e:
        low = str(e).lower()
        if "split" in low and ("unknown split" in low or "should be one of" in low):
            raise DatasetSourceError(f"{spec.label}: {' '.join(str(e).split())[:200]}") from None
        raise DatasetSourceError(f"{spec.source}: cannot read this dataset ({_short(e)})") from None
    except (OSError, datasets.exceptions.DatasetGenerationError) as e:
        raise DatasetSourceError(f"{spec.source}: cannot read this dataset ({_short(e)})") from None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


def _load_files(spec: HFDataset, files: list[str]):
    import datasets

    if not files:
        raise DatasetSourceError(f"{spec.source}: no such file or folder (or no parquet, JSONL or CSV files in it)")
    kinds = {FILE_BUILDERS.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        suffixes = sorted({Path(f).suffix or "(none)" for f in files})
        raise DatasetSourceError(f"{spec.source}: files of one kind are needed: .parquet, .jsonl/.json or .csv (got "
                                 f"{', '.join(suffixes)})")
    return datasets.load_dataset(kinds.pop(), data_files={spec.split: files}, split=spec.split)


def _load_hub(spec: HFDataset):
    """A hub id: through ``datasets.load_dataset``; offline (or with the hub out of reach) from the local Hugging
    Face cache, either the copy ``load_dataset`` made earlier or the repository files ``hf download`` put there."""
    import datasets

    if spec.source.startswith((".", "/", "~")) or spec.source.count("/") > 1:
        raise DatasetSourceError(f"{spec.source}: no such file or folder (and not a hub id like user/name)")
    try:
        return datasets.load_dataset(spec.source, spec.name, split=spec.split, revision=spec.revision)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as first:
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(spec.source, repo_type="dataset", revision=spec.revision,
                                       local_files_only=True)
        except Exception:
            why = ("HF_HUB_OFFLINE=1 is set" if _offline() else
                   "the hub could not be reached or has no such dataset" if isinstance(first, ConnectionError) else
                   f"the hub has no such dataset ({_short(first)})")
            raise DatasetSourceError(
                f"{spec.source}: dataset not in the local Hugging Face cache and {why}; download it first (hf "
                f"download {spec.source} --repo-type dataset) or pass a save_to_disk folder or parquet/JSONL files"
            ) from None
        return datasets.load_dataset(folder, spec.name, split=spec.split)


# ---------------------------------------------------------------------------------------------------- mapping


def _pairs_from_output(value) -> Any:
    """A list of [kind, text] pairs from the forms a dataset stores them in (validated afterwards)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("output: a string that is not JSON (map a 'kind: text' lines column as text)") from None
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, dict) and set(item) >= {"kind", "text"}:
                out.append([item["kind"], item["text"]])
            elif isinstance(item, tuple):
                out.append(list(item))
            else:
                out.append(item)
        return out
    return value


def _pairs_from_kinds(row: dict, mapping: dict[str, str]) -> list[list[str]]:
    out = []
    for kind in ("hyde", "lex", "vec"):
        if kind not in mapping:
            continue
        value = row.get(mapping[kind])
        values = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{kind}: must be a string or a list of strings (column {mapping[kind]!r})")
        out.extend([kind, v] for v in values if v.strip())
    return out


def _pairs_from_text(value) -> list[list[str]]:
    from .prompt import KINDS_ORDER

    if not isinstance(value, str):
        raise ValueError(f"text: must be a string of 'kind: text' lines (got {type(value).__name__})")
    out = []
    for j, line in enumerate(value.split("\n"), 1):
        if not line.strip():
            continue
        kind, sep, text = line.partition(":")
        if not sep or kind.strip() not in KINDS_ORDER:
            raise ValueError(f"text: line {j} {line.strip()[:40]!r} is not 'lex|vec|hyde: text'")
        out.append([kind.strip(), text.strip()])
    return out


def map_row(row: dict, mapping: dict[str, str]) -> dict:
    """One dataset row as a row of our JSONL schema (still to be validated); ValueError naming the field."""
    out: dict[str, Any] = {"query": row.get(mapping["query"])}
    if "output" in mapping:
        out["output"] = _pairs_from_output(row.get(mapping["output"]))
    elif "text" in mapping:
        out["output"] = _pairs_from_text(row.get(mapping["text"]))
    else:
        out["output"] = _pairs_from_kinds(row, mapping)
    for key in ("lang", "category", "intent"):
        col = mapping.get(key, key if key in row else None)
        if col is not None and row.get(col) not in (None, ""):
            out[key] = row[col]
    return out


def _column_of(message: str, mapping: dict[str, str]) -> str | None:
    field = message.split(":", 1)[0].split("[", 1)[0].strip()
    if field == "output":
        return next((mapping[k] for f in ANSWER_FORMS for k in f if k in mapping), None)
    return mapping.get(field)


def read_examples(spec: HFDataset):
    """Yields (row number, Example | None, error | None) for every row of the split, as data.read_examples does for
    a JSONL file (rows numbered from 1)."""
    from .data import check_row

    ds = load_split(spec)
    mapping = spec.mapping()
    optional = ("lang", "category", "intent")  # read when present under their own names, required when mapped
    missing = [(f, c) for f, c in mapping.items() if c not in ds.column_names and (f not in optional
                                                                                   or f in spec.columns)]
    if missing:
        field, col = missing[0]
        raise DatasetSourceError(f"{spec.label}: no column {col!r} for {field} (columns: "
                                 f"{', '.join(ds.column_names)}); map it: columns {{{field}: COLUMN}} in a config, "
                                 f"--column {field}=COLUMN on the command line")
    wanted = sorted(set(mapping.values()) | ({"lang", "category", "intent"} & set(ds.column_names)))
    for i, row in enumerate(ds.select_columns(wanted).to_list(), 1):
        try:
            yield i, check_row(map_row(row, mapping)), None
        except ValueError as e:
            msg = str(e)
            col = _column_of(msg, mapping)
            yield i, None, msg + (f" (column {col!r})" if col and f"column {col!r}" not in msg else "")


_CACHE: dict[str, tuple[list, list]] = {}


def examples(spec: HFDataset) -> tuple[list, list[str]]:
    """(examples, errors as ``SOURCE[SPLIT]:ROW: reason``) of one source; read once per process."""
    key = spec.model_dump_json()
    if key not in _CACHE:
        good, errors = [], []
        for i, ex, err in read_examples(spec):
            if err:
                errors.append(f"{spec.label}:{i}: {err}")
            else:
                good.append(ex)
        _CACHE[key] = (good, errors)
    return _CACHE[key]


def fingerprint(spec: HFDataset) -> str:
    """SHA-256 over the source description and its validated rows (for the run folder's data hash)."""
    h = hashlib.sha256(spec.model_dump_json().encode())
    for ex in examples(spec)[0]:
        h.update(json.dumps([ex.query, ex.output, ex.category, ex.intent, ex.lang], ensure_ascii=False).encode())
    return h.hexdigest()
