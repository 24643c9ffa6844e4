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

_TMP = re.compile(r"^\.(.+)\.(\d+)\.([A-Za-z0-9_]+)\.tmp(\.[A-Za-z0-9]+)?$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: changing it later from a thread would race with other file creation
_FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp's 0600 would hide outputs from other users
_DIR_MODE = 0o777 & ~_UMASK | 0o700


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
    """Removes temporaries in ``folder`` whose writing process is gone; returns what was removed.

    One exception: a process killed inside ``atomic_folder``'s swap (old output moved aside, new one not yet in
    place) left the old output as ``.<name>.<pid>.old.tmp`` and nothing under ``<name>``; it is moved back."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP.match(p.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        final = folder / m.group(1)
        if m.group(3) == "old" and not (final.exists() or final.is_symlink()):
            try:
                os.replace(p, final)
                continue
            except OSError:
                pass
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _renamed(e: OSError, tmp: Path, final: Path) -> OSError:
    """The same fault, naming the output the user asked for instead of its temporary name."""
    if e.errno is None:
        return e
    if e.filename is None:  # a failed write() names no file: name the output
        return OSError(e.errno, e.strerror, str(final))
    name = str(e.filename)
    if not name.startswith(str(tmp)):
        return e
    return OSError(e.errno, e.strerror, str(final) + name[len(str(tmp)):])


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary file path beside ``path`` (an empty file reserved under a unique name); on success it is
    renamed to ``path``, on any error removed.

    For writers that insist on opening a file name themselves (matplotlib, SQLite, converters).  ``suffix`` keeps an
    extension a writer needs (``.png``).  An OSError about the temporary names ``path`` instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp" + suffix, dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, _FILE_MODE)
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        renamed = _renamed(e, tmp_path, path)
        if renamed is e:
            raise
        raise renamed from e
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
    _fsync_dir(Path(path).parent)  # the rename itself survives a power cut


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        yield tmp
        tmp.chmod(_DIR_MODE)
        if path.exists() or path.is_symlink():
            old = path.with_name(f"{_tmp_prefix(path.name)}old.tmp")
            os.replace(path, old)  # the old folder moves aside in one step, then the new one takes its name
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        renamed = _renamed(e, tmp, path)
        if renamed is e:
            raise
        raise renamed from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
