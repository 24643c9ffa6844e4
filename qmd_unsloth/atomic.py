"""Atomic outputs: every file or folder a command writes appears complete under its final name, or not at all.

Writers put their bytes under a temporary name in the same folder (``.<name>.<pid>.<random>.tmp``) and rename it
when complete, so a full disk, a crash or a kill leaves either the old output or the new one, never a truncated file
under the final name.  ``clean_stale`` removes temporaries left by processes that are gone; the writers call it for
their folder first, so leftovers of an interrupted run are cleaned on the next run and never picked up as results.

Standard library only (the data and reward modules import it and must stay fast).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_TMP = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp(\.[A-Za-z0-9]+)?$")


def _tmp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def is_temporary(path: str | os.PathLike) -> bool:
    """True for a name this module uses for unfinished outputs (never a result)."""
    return bool(_TMP.match(Path(path).name))


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Removes temporaries in ``folder`` whose writing process is gone; returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP.match(p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary file path beside ``path`` (nothing created yet); on success it is renamed to ``path``.

    For writers that insist on a file name of their own (matplotlib, SQLite backups, converters).  ``suffix`` keeps
    an extension a writer needs (``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes to a temporary file beside ``path``, flushes it to disk and renames it."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if path.exists() or path.is_symlink():
            old = path.with_name(f"{_tmp_prefix(path.name)}old.tmp")
            os.replace(path, old)  # the old folder moves aside in one step, then the new one takes its name
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
