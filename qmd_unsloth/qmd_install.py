"""Install into QMD: keep a checked GGUF in our own folder and point QMD's index YAML at it by absolute path.

    python -m qmd_unsloth.qmd_install --model runs/gguf/qmd-query-expansion-q4_k_m.gguf [--project DIR | --index FILE]
    python -m qmd_unsloth.qmd_install --rollback [--to-default]
    python -m qmd_unsloth.qmd_install --check [--project DIR | --index FILE]

What the real QMD 2.8.3 does (read in its dist/collections.js, trust.js, llm.js and cli/qmd.js, and run in
tests/test_qmd_real_install.py):

* Its config is ``index.yml`` in ``$QMD_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/qmd``, else ``~/.config/qmd``; a
  project's ``.qmd/index.yaml`` (preferred) or ``.qmd/index.yml``, found upward from the working directory, replaces
  it.  The model is ``models.generate`` there; ``QMD_GENERATE_MODEL`` counts only while that key is missing, and the
  first command that opens the store writes all three keys (generate, embed, rerank) into the file, so from then on
  the variable is ignored.  This installer therefore always writes ``models.generate``, never an environment line.
* A relative model path is taken relative to QMD's model cache (node-llama-cpp's resolveModelFile), so the path
  written is absolute.  ``qmd pull [--refresh]`` deletes every file in that cache whose name contains the configured
  model's file name, so our GGUFs never live there: they go to ``$XDG_DATA_HOME/qmd_unsloth/models`` (else
  ``~/.local/share/qmd_unsloth/models``) under names that carry their content hash.
* A missing model file makes ``qmd query`` fail with an uncaught error, and a file that is not GGUF is deleted by
  QMD: the file is checked before QMD is pointed at it (qmd_unsloth.gguf_check: GGUF header, EOS, the prompt, a
  llama.cpp load and generation in a child process), and every file type llama.cpp loads is accepted.
* A project config is behind ``qmd trust``: a custom model in it is used only while the file's approval digest
  (over custom models, update hooks and out-of-project collection paths) matches; every change of
  ``models.generate`` re-arms the gate, so after editing one the exact ``cd ... && qmd trust`` to run is printed.
  Trust is never recorded by this tool.
* QMD rewrites the YAML whenever it changes it (comments dropped).  The install edits only the ``models.generate``
  line when it can; the original bytes (or their absence) are kept in ``<models dir>/index-backups/``.  ``--rollback``
  puts them back exactly when the file is as the install left it; when QMD or the user rewrote it since, it sets
  ``models.generate`` back (or removes it, or the file QMD only filled with its defaults) and keeps everything else,
  and says which case happened.  Rolling back to a model file that is gone is refused (``--to-default`` removes
  ``models.generate`` instead, so QMD uses its default).

Every install is recorded in ``<models dir>/qmd_unsloth-installs.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from .atomic import atomic_path, atomic_write_bytes, atomic_write_text
from .cli import UserError, command

MANIFEST = "qmd_unsloth-installs.json"
ENV = "QMD_GENERATE_MODEL"
# QMD 2.8.3's built-in model URIs (dist/llm.js DEFAULT_*_MODEL): what it writes into the YAML when a key is missing,
# and the values its trust check does not gate.
QMD_DEFAULTS = {
    "embed": "hf:ggml-org/embeddinggemma-300M-GGUF/embeddinggemma-300M-Q8_0.gguf",
    "rerank": "hf:ggml-org/Qwen3-Reranker-0.6B-Q8_0-GGUF/qwen3-reranker-0.6b-q8_0.gguf",
    "generate": "hf:tobil/qmd-query-expansion-1.7B-gguf/qmd-query-expansion-1.7B-q4_k_m.gguf",
}


class InstallError(UserError, RuntimeError):
    """A user-facing install problem (one line)."""


# ------------------------------------------------------------------------------------------ where things are


def qmd_models_dir() -> Path:
    """QMD's own model cache (never ours to write: ``qmd pull --refresh`` deletes files there)."""
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "qmd" / "models"


def models_home() -> Path:
    """Where installed GGUFs and the manifest live: $XDG_DATA_HOME/qmd_unsloth/models (else ~/.local/share/...)."""
    data = os.environ.get("XDG_DATA_HOME")
    return (Path(data) if data else Path.home() / ".local" / "share") / "qmd_unsloth" / "models"


def qmd_index() -> Path:
    """QMD's global config file (collections.js getConfigDir + index name 'index')."""
    if os.environ.get("QMD_CONFIG_DIR"):
        return Path(os.environ["QMD_CONFIG_DIR"]) / "index.yml"
    config = os.environ.get("XDG_CONFIG_HOME")
    return (Path(config) if config else Path.home() / ".config") / "qmd" / "index.yml"


def find_project_config(start: Path) -> Path | None:
    """QMD's findLocalConfigPath: upward from ``start``, ``.qmd/index.yaml`` before ``.qmd/index.yml`` in a folder."""
    folder = Path(os.path.abspath(start))
    while True:
        for name in ("index.yaml", "index.yml"):
            if (folder / ".qmd" / name).exists():
                return folder / ".qmd" / name
        if folder.parent == folder:
            return None
        folder = folder.parent


def is_project_config(path: Path) -> bool:
    """QMD's isLocalConfigPath: a config file whose folder is named ``.qmd`` (gated by ``qmd trust``)."""
    return Path(os.path.abspath(path)).parent.name == ".qmd"


def project_root(path: Path) -> Path:
    return Path(os.path.abspath(path)).parent.parent


def target_index(index: Path | None = None, project: Path | None = None) -> Path:
    """The YAML file QMD reads: ``--index FILE`` (must exist), ``--project DIR`` (the project config QMD finds from
    DIR), else the global index.yml (created by the install when missing)."""
    if index is not None and project is not None:
        raise InstallError("pass --index FILE or --project DIR, not both")
    if index is not None:
        index = Path(index).expanduser()
        if not index.is_file():
            raise InstallError(f"{index}: no such file (omit --index for QMD's global {qmd_index()}, or pass "
                               "--project DIR for a project's .qmd/index.yaml)")
        return Path(os.path.abspath(index))
    if project is not None:
        project = Path(project).expanduser()
        if not project.is_dir():
            raise InstallError(f"{project}: no such folder")
        found = find_project_config(project)
        if found is None:
            raise InstallError(f"{project}: no .qmd/index.yaml or .qmd/index.yml here or above; create the project "
                               f"index first with: cd {shlex.quote(str(project))} && qmd init")
        return found
    return Path(os.path.abspath(qmd_index()))


def model_file(uri: str | None, cache: Path | None = None) -> Path | None:
    """The file a models.* value names, as node-llama-cpp resolves it (relative to QMD's model cache); None for an
    ``hf:`` URI or URL."""
    if not uri or re.match(r"^[a-z][a-z0-9+.-]*:", uri) and not re.match(r"^[A-Za-z]:[\\/]", uri):
        return None
    return Path(cache or qmd_models_dir()) / uri  # an absolute uri replaces the cache folder


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


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
        if value is None and len(children) == 1:  # generate was the only key: drop the empty models: block too
            del lines[start]
    elif value is not None:
        lines.insert(start + 1, new_line)
    return "".join(lines)


def _load_yaml(text: str, where: str):
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InstallError(f"{where}not valid YAML ({str(e).splitlines()[0]}); fix it or pass another --index") \
            from None
    if not isinstance(data, dict):
        raise InstallError(f"{where}must hold a mapping (collections, models, ...), as QMD writes it")
    return data


def set_generate(text: str, value: str | None) -> tuple[str, bool]:
    """(new text, comments kept).  Edits the one line when it can and proves the rest of the YAML unchanged;
    otherwise rewrites the file through PyYAML (comments lost; the caller keeps a backup)."""
    import yaml

    before = _load_yaml(text, "")
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
    if models:
        data["models"] = models
    else:
        data.pop("models", None)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if data else "", False


# ------------------------------------------------------------------------------------------ QMD's trust gate


def gated(data: dict, config: Path) -> list[str]:
    """What QMD's trust check gates in a project config (trust.js gatedItems): custom model URIs, ``update:`` hooks,
    collection paths outside the project.  For messages only: QMD decides."""
    out = []
    models = data.get("models") if isinstance(data.get("models"), dict) else {}
    for slot in ("embed", "rerank", "generate"):
        if models.get(slot) and models[slot] != QMD_DEFAULTS[slot]:
            out.append(f"models.{slot}")
    root = Path(os.path.realpath(project_root(config)))
    collections = data.get("collections") if isinstance(data.get("collections"), dict) else {}
    for name, col in collections.items():
        col = col if isinstance(col, dict) else {}
        if col.get("update"):
            out.append(f"collections.{name}.update")
        raw = os.path.expanduser(str(col.get("path") or "").strip())
        target = Path(os.path.realpath(root / raw if raw else root))
        if target != root and root not in target.parents:
            out.append(f"collections.{name}.path")
    return out


def trust_command(config: Path) -> str:
    return f"cd {shlex.quote(str(project_root(config)))} && qmd trust"


# ------------------------------------------------------------------------------------------ install


def _manifest(models_dir: Path) -> dict:
    p = models_dir / MANIFEST
    if not p.is_file():
        return {"installs": []}
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise InstallError(f"{p}: not valid JSON; restore it or remove it (rollback history is lost)") from None


def _save_manifest(models_dir: Path, manifest: dict) -> None:
    atomic_write_text(models_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _resolve_models_dir(models_dir: Path | None) -> Path:
    models_dir = Path(os.path.abspath(Path(models_dir).expanduser())) if models_dir else models_home()
    cache = Path(os.path.abspath(qmd_models_dir()))
    if models_dir == cache or cache in models_dir.parents:
        raise InstallError(f"{models_dir}: inside QMD's model cache ({cache}), where `qmd pull --refresh` deletes "
                           f"files; choose another --models-dir (default: {models_home()})")
    return models_dir


def training_format(model: Path, tokenizer: Path | None = None):
    """The ``prompt.ChatFormat`` the model was trained with (QMD must wrap its prompt the same way): from
    ``--tokenizer DIR``, else from the export.json beside the file, else None (then any wrapper QMD's
    node-llama-cpp maps the file to and we mirror is accepted)."""
    from .prompt import UnsupportedChatTemplate, format_of_tokenizer

    if tokenizer is not None:
        from .model import load_tokenizer

        architecture = None
        if Path(tokenizer).suffix == ".gguf":  # a GGUF's tokenizer: its architecture is in its header
            from .gguf_check import read_gguf

            architecture = read_gguf(Path(tokenizer))["architecture"]
        try:
            return format_of_tokenizer(load_tokenizer(str(tokenizer)), architecture)
        except UnsupportedChatTemplate as e:
            raise InstallError(f"{tokenizer}: {e}") from None
    from .gguf_check import exported_format

    return exported_format(model)


def check_model(model: Path, verify: bool = True, tokenizer: Path | None = None) -> dict:
    """The checks before QMD is pointed at a file: always a GGUF whose header reads (QMD deletes a file that is not
    GGUF and fails on a missing one); with ``verify`` every gguf_check check as well (EOS, the prompt, a llama.cpp
    load and a short generation, in a child process), for any file type llama.cpp loads."""
    from .gguf_check import GGUFCheckError, read_gguf, verify_gguf

    if not model.is_file():
        raise InstallError(f"{model}: no such file")
    with open(model, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise InstallError(f"{model}: not a GGUF file (it starts with {magic!r}, expected b'GGUF'); QMD deletes such "
                           "a file")
    expected = training_format(model, tokenizer) if verify else None
    try:
        if verify:
            return verify_gguf(model, expected=expected)
        return read_gguf(model)
    except GGUFCheckError as e:
        raise InstallError(str(e)) from None
    except (ValueError, IndexError, KeyError) as e:  # gguf-py on a damaged file (the --no-verify path)
        raise InstallError(f"{model}: the GGUF header cannot be read, the file is truncated or corrupt "
                           f"({type(e).__name__})") from None


def place(model: Path, models_dir: Path) -> tuple[Path, str]:
    """Copies ``model`` into ``models_dir`` under ``<stem>-<sha12>.gguf`` (atomically; kept when already there)."""
    digest = sha256(model)
    stem = re.sub(r"-[0-9a-f]{12}$", "", model.stem)
    dest = models_dir / f"{stem}-{digest[:12]}.gguf"
    if not (dest.is_file() and sha256(dest) == digest):
        with atomic_path(dest) as tmp:
            shutil.copyfile(model, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
    return dest, digest


def install(model: Path, models_dir: Path | None = None, index: Path | None = None, verify: bool = True,
            project: Path | None = None, tokenizer: Path | None = None) -> dict:
    """Places ``model`` in our models folder and points QMD's index YAML at it; returns the manifest record."""
    model = Path(os.path.abspath(Path(model).expanduser()))
    models_dir = _resolve_models_dir(models_dir)
    index = target_index(index, project)
    if not model.is_file():
        raise InstallError(f"{model}: no such file")
    original = index.read_bytes() if index.is_file() else None
    text = "" if original is None else _decode(original, index)
    data = _load_yaml(text, f"{index}: ")
    info = check_model(model, verify, tokenizer)
    dest, digest = place(model, models_dir)
    previous = _generate_of(data)
    new_text, kept = set_generate(text, str(dest))
    backup = None
    if original is not None:
        backup = models_dir / "index-backups" / f"{time.strftime('%Y%m%d-%H%M%S')}-{_sha(original)[:12]}-{index.name}"
        atomic_write_bytes(backup, original)
    if new_text.encode("utf-8") != original:
        atomic_write_text(index, new_text)
    prev_file = model_file(previous)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "source": str(model), "model": str(dest), "sha256": digest,
              "file_type": info.get("file_type"), "verified": bool(verify and info.get("verified")),
              "checks": info.get("checks") if verify else "header only (--no-verify)", "index": str(index),
              "index_existed": original is not None, "index_backup": str(backup) if backup else None,
              "original_sha256": _sha(original), "written_sha256": _sha(new_text.encode("utf-8")),
              "previous": previous, "previous_missing": bool(prev_file and not prev_file.is_file()),
              "comments_kept": kept, "project": is_project_config(index)}
    manifest = _manifest(models_dir)
    manifest["installs"].append(record)
    _save_manifest(models_dir, manifest)
    return record


def _decode(data: bytes, where: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InstallError(f"{where}: not UTF-8 text; QMD reads its config as UTF-8") from None


def describe(record: dict) -> str:
    index = Path(record["index"])
    from .gguf_check import describe_checks

    checks = record.get("checks")
    said = describe_checks(record) if isinstance(checks, dict) else "header only, not verified (--no-verify)"
    lines = [f"qmd_install: placed {record['model']} ({record['file_type'] or 'file type not recorded'}, {said}; "
             f"sha256 {record['sha256'][:12]})"]
    was = record["previous"] or "unset: QMD's default"
    if record.get("previous_missing"):
        was += ", a file that is gone: `qmd query` would have failed on it"
    if record["index_existed"]:
        lines.append(f"qmd_install: {index}: models.generate = {record['model']} (was {was}; original kept in "
                     f"{record['index_backup']}" + ("" if record["comments_kept"] else "; comments could not be kept")
                     + ")")
    else:
        lines.append(f"qmd_install: created {index} with models.generate = {record['model']} (QMD adds its default "
                     "embed and rerank models and `collections: {}` on its next command)")
    if record["project"]:
        lines.append(f"qmd_install: {index} is a project config behind QMD's trust check: QMD uses this model only "
                     f"after you approve the change with: {trust_command(index)}")
    if os.environ.get(ENV):
        lines.append(f"qmd_install: note: {ENV} is set here; QMD ignores it while {index.name} has models.generate")
    local = find_project_config(Path.cwd())
    if not record["project"] and local is not None:
        lines.append(f"qmd_install: note: QMD run in {Path.cwd()} uses {local} instead; install with --project "
                     f"{shlex.quote(str(project_root(local)))} for that one")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ rollback


def rollback(models_dir: Path | None = None, to_default: bool = False) -> dict:
    """Undoes the last install recorded in ``models_dir``; returns its record with ``restored`` (what happened) and
    ``trust`` (the command to run, for a project config that still needs an approval) added."""
    models_dir = Path(os.path.abspath(Path(models_dir).expanduser())) if models_dir else models_home()
    manifest = _manifest(models_dir)
    if not manifest["installs"]:
        old = qmd_models_dir() / MANIFEST  # where qmd_install kept its record before it left QMD's cache
        hint = (f" (an older qmd_install recorded installs in {old.parent}: --rollback --models-dir {old.parent})"
                if old.is_file() and old.parent != models_dir else "")
        raise InstallError(f"{models_dir / MANIFEST}: no install to roll back{hint}")
    record = manifest["installs"][-1]
    if record.get("env_line") or not record.get("index"):  # written by an older qmd_install (environment route)
        record["restored"] = f"that install printed `export {ENV}=...` instead of editing an index: unset {ENV}"
    else:
        _restore_index(record, to_default)
    manifest["installs"].pop()
    still_used = {r["model"] for r in manifest["installs"]}
    current = _current_generate(Path(record["index"])) if record.get("index") else None
    if record["model"] not in still_used and record["model"] != current:
        Path(record["model"]).unlink(missing_ok=True)
    _save_manifest(models_dir, manifest)
    return record


def _current_generate(index: Path) -> str | None:
    try:
        return _generate_of(_load_yaml(index.read_text(encoding="utf-8"), ""))
    except (OSError, UnicodeDecodeError, InstallError):
        return None


def _restore_index(record: dict, to_default: bool) -> None:
    index = Path(record["index"])
    backup = Path(record["index_backup"]) if record.get("index_backup") else None
    current = index.read_bytes() if index.is_file() else None
    existed = record.get("index_existed", True)
    ours = record["model"]
    previous = None if to_default else record["previous"]

    def refuse_missing():
        gone = model_file(previous)
        if gone is not None and not gone.is_file():
            raise InstallError(f"{index}: rolling back would point QMD at {previous}, which is gone (`qmd query` "
                               "fails on a missing model file); put it back, or roll back with --to-default to remove "
                               "models.generate so that QMD uses its default")

    if current is None:
        record["restored"] = (f"{index} was created by the install and is gone already: nothing to restore"
                              if not existed else
                              f"{index} is gone since the install: left absent (its original is in {backup})")
        return
    unchanged = _sha(current) == record.get("written_sha256", record.get("index_sha256"))
    if unchanged and not existed:
        index.unlink()
        record["restored"] = f"{index} removed: it did not exist before the install and is as the install left it"
    elif unchanged:
        original = backup.read_bytes() if backup and backup.is_file() else None
        if original is None or _sha(original) != record.get("original_sha256", _sha(original)):
            raise InstallError(f"{index}: the backup of its original ({backup}) is missing or changed; set "
                               "models.generate back by hand")
        refuse_missing()
        if to_default:
            text, _ = set_generate(_decode(original, index), None)
            atomic_write_text(index, text)
            record["restored"] = f"{index} restored from {backup}, then models.generate removed (--to-default)"
        else:
            atomic_write_bytes(index, original)
            record["restored"] = f"{index} restored exactly, byte for byte, from {backup}"
    else:
        text = _decode(current, index)
        data = _load_yaml(text, f"{index}: ")
        now = _generate_of(data)
        if now != ours:
            record["restored"] = (f"{index} was rewritten since the install and its models.generate is now {now!r}, "
                                  "not the installed file: left as it is")
        elif not existed and _only_qmd_defaults(data, ours):
            index.unlink()
            record["restored"] = (f"{index} removed: it did not exist before the install, and since then QMD only "
                                  "filled in its default models")
        else:
            refuse_missing()
            new, _ = set_generate(text, previous)
            atomic_write_text(index, new)
            who = ("QMD or the user rewrote it since the install (comments QMD drops are in the backup)" if existed
                   else "it did not exist before the install and gained other settings since")
            value = f"set back to {previous}" if previous else "removed (QMD uses its default again)"
            record["restored"] = f"{index}: {who}: only models.generate {value}; everything else kept as it is now"
    if is_project_config(index) and index.is_file():
        left = gated(_load_yaml(index.read_text(encoding="utf-8"), ""), index)
        record["trust"] = trust_command(index) if left else None


def _only_qmd_defaults(data: dict, ours: str) -> bool:
    """True when ``data`` is what the install wrote plus what QMD fills in by itself: its default embed and rerank
    models and an empty ``collections``."""
    rest = {k: v for k, v in data.items() if not (k == "collections" and not v)}
    models = rest.pop("models", None)
    if rest or not isinstance(models, dict):
        return False
    return all(k == "generate" and v == ours or v == QMD_DEFAULTS.get(k) for k, v in models.items())


# ------------------------------------------------------------------------------------------ check


def check(index: Path | None = None, project: Path | None = None) -> str:
    """One line on what QMD's config points models.generate at; InstallError when that file is gone or not a GGUF."""
    target = target_index(index, project)
    if not target.is_file():
        return f"qmd_install: {target}: no such file; QMD uses {os.environ.get(ENV) or QMD_DEFAULTS['generate']}"
    value = _generate_of(_load_yaml(_decode(target.read_bytes(), target), f"{target}: "))
    path = model_file(value)
    if value is None:
        return f"qmd_install: {target}: no models.generate; QMD writes its default there on its next command"
    if path is None:
        return f"qmd_install: {target}: models.generate = {value} (downloaded by QMD)"
    if not path.is_file():
        raise InstallError(f"{target}: models.generate points at {path}, which is gone (`qmd query` fails on it); "
                           "install a model, or roll back with --rollback [--to-default]")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise InstallError(f"{target}: models.generate points at {path}, which is not a GGUF file (QMD deletes it)")
    return f"qmd_install: {target}: models.generate = {path} (a GGUF file, {path.stat().st_size / 2**20:.1f} MiB)"


@command("qmd_install")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.qmd_install", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="the .gguf to install (checked first, like export does)")
    ap.add_argument("--project", help="a project folder: edit the .qmd/index.yaml (or .yml) QMD uses there")
    ap.add_argument("--index", help=f"a QMD index YAML file to edit (default: QMD's global {qmd_index()})")
    ap.add_argument("--models-dir", help=f"where GGUFs and the install record live (default: {models_home()})")
    ap.add_argument("--tokenizer", help="the model folder the GGUF was exported from: QMD must wrap the GGUF's prompt "
                                        "as that model was trained (default: export.json beside the GGUF, else any "
                                        "wrapper we mirror)")
    ap.add_argument("--rollback", action="store_true", help="undo the last install")
    ap.add_argument("--to-default", action="store_true", help="with --rollback: remove models.generate instead of "
                                                              "restoring a previous value")
    ap.add_argument("--check", action="store_true", help="say what QMD's config points models.generate at")
    ap.add_argument("--no-verify", action="store_true", help="check only the GGUF header, not the llama.cpp load")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.rollback:
        record = rollback(args.models_dir and Path(args.models_dir), args.to_default)
        print(f"qmd_install: rolled back {record['model']}: {record['restored']}")
        if record.get("trust"):
            print(f"qmd_install: {record['index']} still has settings QMD's trust check gates; approve what it holds "
                  f"now with: {record['trust']}")
        return 0
    if args.check:
        print(check(args.index and Path(args.index), args.project and Path(args.project)))
        return 0
    if not args.model:
        ap.error("--model is required (or --rollback, or --check)")
    record = install(Path(args.model), args.models_dir and Path(args.models_dir), args.index and Path(args.index),
                     verify=not args.no_verify, project=args.project and Path(args.project),
                     tokenizer=args.tokenizer and Path(args.tokenizer))
    print(describe(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
