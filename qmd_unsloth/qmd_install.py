"""Install into QMD: place a verified GGUF where QMD keeps models and point QMD's index.yml at it; --rollback undoes it.

    python -m qmd_unsloth.qmd_install --model runs/gguf/qmd-query-expansion-q4_k_m.gguf [--models-dir DIR] [--index FILE]
    python -m qmd_unsloth.qmd_install --rollback [--models-dir DIR]

Where QMD looks (from its source): models are cached in ``$XDG_CACHE_HOME/qmd/models`` (else ``~/.cache/qmd/models``);
its config is ``index.yml`` in ``$QMD_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/qmd``, else ``~/.config/qmd`` (a project's
own ``.qmd/index.yml``: pass it with ``--index``); the query-expansion model is ``models.generate`` there, else the
environment variable ``QMD_GENERATE_MODEL``, else QMD's default ``qmd-query-expansion-1.7B-q4_k_m.gguf``.

The GGUF is checked first (qmd_unsloth.gguf_check, as export does) and copied atomically under a name that carries its
content hash, so an install never overwrites a file QMD uses.  Only the ``models.generate`` line of index.yml is
edited (comments and the rest are kept); the original is saved beside it as ``index.yml.qmd_unsloth-<time>.bak``.
Without an index.yml the ``QMD_GENERATE_MODEL=...`` line to set is printed.  Every install is recorded in
``<models dir>/qmd_unsloth-installs.json``; ``--rollback`` restores the index.yml of the last install (or, when the
file was edited since, puts back only the previous ``models.generate``) and removes the GGUF it placed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .atomic import atomic_path, atomic_write_bytes, atomic_write_text
from .cli import UserError, command

MANIFEST = "qmd_unsloth-installs.json"
ENV = "QMD_GENERATE_MODEL"


class InstallError(UserError, RuntimeError):
    """A user-facing install problem (one line)."""


def qmd_models_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "qmd" / "models"


def qmd_index() -> Path:
    if os.environ.get("QMD_CONFIG_DIR"):
        return Path(os.environ["QMD_CONFIG_DIR"]) / "index.yml"
    config = os.environ.get("XDG_CONFIG_HOME")
    return (Path(config) if config else Path.home() / ".config") / "qmd" / "index.yml"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ editing one YAML key

_MODELS_BLOCK = re.compile(r"models[ \t]*:[ \t]*(#.*)?$")
_MODELS_ANY = re.compile(r"models[ \t]*:")


def _generate_of(data) -> str | None:
    models = data.get("models") if isinstance(data, dict) else None
    return models.get("generate") if isinstance(models, dict) else None


def _without_generate(data):
    data = dict(data or {})
    models = data.pop("models", None)
    if isinstance(models, dict):
        models = {k: v for k, v in models.items() if k != "generate"}
    if models:
        data["models"] = models
    return data


def _edit_text(text: str, value: str | None) -> str | None:
    """``text`` with ``models.generate`` set to ``value`` (removed for None), editing only that line; None when the
    file's shape is not a plain block mapping this edit understands."""
    lines = text.splitlines(keepends=True)
    eol = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    start = next((i for i, l in enumerate(lines) if _MODELS_ANY.match(l)), None)
    if start is None:
        if value is None:
            return text
        sep = "" if not text or text.endswith("\n") else eol
        return f"{text}{sep}models:{eol}  generate: {json.dumps(value)}{eol}"
    if not _MODELS_BLOCK.match(lines[start].rstrip("\r\n")):
        return None  # flow style or a scalar: let the YAML fallback handle it
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
        end += 1
    children = [i for i in range(start + 1, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
    indent = re.match(r"[ \t]*", lines[children[0]]).group(0) if children else "  "
    key = re.compile(re.escape(indent) + r"generate[ \t]*:")
    found = next((i for i in children if key.match(lines[i])), None)
    new_line = f"{indent}generate: {json.dumps(value)}{eol}"
    if found is not None:
        lines[found:found + 1] = [] if value is None else [new_line]
    elif value is not None:
        lines.insert(start + 1, new_line)
    return "".join(lines)


def set_generate(text: str, value: str | None) -> tuple[str, bool]:
    """(new text, comments kept).  Edits the one line when it can and proves the rest of the YAML unchanged;
    otherwise rewrites the file through PyYAML (comments lost; the caller keeps a backup)."""
    import yaml

    try:
        before = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InstallError(f"not valid YAML ({str(e).splitlines()[0]}); fix it or pass another --index") from None
    if not isinstance(before, dict):
        raise InstallError("index.yml must hold a mapping (collections, models, ...)")
    edited = _edit_text(text, value)
    if edited is not None:
        try:
            after = yaml.safe_load(edited) or {}
        except yaml.YAMLError:
            after = None
        if (isinstance(after, dict) and _generate_of(after) == value
                and _without_generate(after) == _without_generate(before)):
            return edited, True
    data = dict(before)
    models = dict(data.get("models") or {})
    if value is None:
        models.pop("generate", None)
    else:
        models["generate"] = value
    data["models"] = models
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True), False


# ------------------------------------------------------------------------------------------ install and rollback


def _manifest(models_dir: Path) -> dict:
    p = models_dir / MANIFEST
    if not p.is_file():
        return {"installs": []}
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise InstallError(f"{p}: not valid JSON; restore it or remove it (rollback history is lost)") from None


def install(model: Path, models_dir: Path | None = None, index: Path | None = None, verify: bool = True) -> dict:
    """Places ``model`` for QMD and points QMD at it; returns the manifest record."""
    model = Path(model).expanduser().resolve()
    models_dir = Path(models_dir or qmd_models_dir()).expanduser().resolve()
    explicit_index = index is not None
    index = Path(index or qmd_index()).expanduser().resolve()
    if explicit_index and not index.is_file():
        raise InstallError(f"{index}: no such file (omit --index to print the {ENV}= line instead)")
    if not model.is_file():
        raise InstallError(f"{model}: no such file")
    info = None
    if verify:
        from .gguf_check import verify_gguf

        info = verify_gguf(model)
    digest = sha256(model)
    dest = models_dir / f"{model.stem}-{digest[:12]}.gguf"
    if not (dest.is_file() and sha256(dest) == digest):
        with atomic_path(dest) as tmp:
            shutil.copyfile(model, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "source": str(model), "model": str(dest),
              "sha256": digest, "index": None, "index_backup": None, "previous": None, "comments_kept": None,
              "file_type": info["file_type"] if info else None}
    if index.is_file():
        original = index.read_bytes()
        text = original.decode("utf-8")
        import yaml

        try:
            record["previous"] = _generate_of(yaml.safe_load(text) or {})
        except yaml.YAMLError:
            pass
        new_text, kept = set_generate(text, str(dest))
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
        while (backup := index.with_name(f"{index.name}.qmd_unsloth-{stamp}{f'-{n}' if n else ''}.bak")).exists():
            n += 1
        atomic_write_bytes(backup, original)
        atomic_write_text(index, new_text)
        record.update(index=str(index), index_backup=str(backup), comments_kept=kept,
                      index_sha256=hashlib.sha256(new_text.encode("utf-8")).hexdigest())
    else:
        record["previous"] = os.environ.get(ENV)
        record["env_line"] = f"{ENV}={dest}"
    manifest = _manifest(models_dir)
    manifest["installs"].append(record)
    atomic_write_text(models_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return record


def rollback(models_dir: Path | None = None) -> dict:
    """Undoes the last install recorded in ``models_dir``; returns its record with ``restored`` added."""
    models_dir = Path(models_dir or qmd_models_dir()).expanduser().resolve()
    manifest = _manifest(models_dir)
    if not manifest["installs"]:
        raise InstallError(f"{models_dir / MANIFEST}: no install to roll back")
    record = manifest["installs"][-1]
    if record["index"]:
        index = Path(record["index"])
        current = index.read_bytes() if index.is_file() else None
        unchanged = current is not None and hashlib.sha256(current).hexdigest() == record.get("index_sha256")
        backup = Path(record["index_backup"])
        if unchanged and backup.is_file():
            atomic_write_bytes(index, backup.read_bytes())
            record["restored"] = f"{index} restored from {backup}"
        elif current is not None:
            text, _ = set_generate(current.decode("utf-8"), record["previous"])
            atomic_write_text(index, text)
            record["restored"] = (f"{index} was edited since the install: only models.generate was set back "
                                  f"(backup of the original: {backup})")
        else:
            raise InstallError(f"{index}: gone since the install; the original is in {backup}")
    else:
        prev = record["previous"]
        record["restored"] = f"{ENV}={prev}" if prev else f"unset {ENV}"
    manifest["installs"].pop()
    still_used = {r["model"] for r in manifest["installs"]} | {record["previous"]}
    if record["model"] not in still_used:
        Path(record["model"]).unlink(missing_ok=True)
    atomic_write_text(models_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return record


def describe(record: dict) -> str:
    lines = [f"qmd_install: placed {record['model']} ({record['file_type'] or 'not verified'}, sha256 "
             f"{record['sha256'][:12]})"]
    if record["index"]:
        lines.append(f"qmd_install: {record['index']}: models.generate = {record['model']} (was "
                     f"{record['previous'] or 'unset: QMD default'}; backup {record['index_backup']}"
                     + ("" if record["comments_kept"] else "; comments could not be kept") + ")")
    else:
        lines.append(f"qmd_install: no index.yml at {qmd_index()}; set this in the environment QMD runs in:")
        lines.append(f"export {record['env_line']}")
    return "\n".join(lines)


@command("qmd_install")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.qmd_install", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="the .gguf to install (checked first, like export does)")
    ap.add_argument("--models-dir", help=f"where the GGUF goes (default: QMD's model cache, {qmd_models_dir()})")
    ap.add_argument("--index", help=f"QMD's index.yml (default: {qmd_index()})")
    ap.add_argument("--rollback", action="store_true", help="undo the last install")
    ap.add_argument("--no-verify", action="store_true", help="skip the GGUF checks (not recommended)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.rollback:
        record = rollback(args.models_dir and Path(args.models_dir))
        print(f"qmd_install: rolled back {record['model']}: {record['restored']}")
        return 0
    if not args.model:
        ap.error("--model is required (or --rollback)")
    record = install(Path(args.model), args.models_dir and Path(args.models_dir), args.index and Path(args.index),
                     verify=not args.no_verify)
    print(describe(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
