"""The GGUF checks every consumer of an exported model runs: export before renaming, serve before a hot swap, the QMD
install before placing a file.

``load_checked(path)`` reads the header (llama.cpp's gguf-py), checks the file type, the EOS token and that QMD's
node-llama-cpp will wrap the chat the way the model was trained (the chat wrapper it picks for the embedded template
and architecture, and the BOS it writes: ``prompt.chat_format``), loads the file in llama.cpp and runs a capped greedy
generation of QMD's prompt under QMD's grammar that the reward must parse; it returns the loaded ``llama_cpp.Llama``
and the facts.  Any failed check raises ``GGUFCheckError`` with one line naming the file and the reason.

llama.cpp runs in a child process first (``python -m qmd_unsloth.gguf_check --child``): a C++ abort inside llama.cpp
(a vocabulary that lacks a token it looks up ends in ``std::out_of_range`` and SIGABRT, a GGML_ASSERT on a damaged
tensor) kills that child, not the caller, and becomes one line naming the signal, the C++ message and the step.
``verify_gguf`` only runs the child; ``load_checked`` (serve) then loads the checked file in its own process.

"Verified" means exactly this, and nothing else is called verified: the header reads and names the expected file
type, EOS is ``<|im_end|>``, node-llama-cpp (inside QMD) would wrap the prompt with the same chat wrapper and BOS as
the model was trained with (so QMD's context is the training prompt), llama.cpp loads the file, and a capped greedy
generation of QMD's prompt under QMD's grammar parses under the reward.  ``info["checks"]`` records each check and
``info["verified"]`` whether all passed; ``describe_checks(info)`` says it in words.  Where the training wrapper is
not known (a GGUF without its export.json) or the generation does not parse (export allows that: an undertrained
model), the file is "checked", with what was and was not established.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from .cli import UserError
from .llamacpp import DEFAULT_DIR, FILE_TYPE_NAMES
from .qmd_contract import CONTEXT_SIZE

SMOKE_QUERY = "auth config"
EOS = "<|im_end|>"
QMD_CONTEXT = CONTEXT_SIZE  # QMD's context size for query expansion


class GGUFCheckError(UserError, ValueError):
    """A GGUF file that fails a check (one line: the file and the reason)."""


def _gguf_module(tools: Path | None):
    """llama.cpp's gguf-py from the tools folder when it is there (it matches the converter), else the installed one."""
    folder = Path(tools or DEFAULT_DIR) / "gguf-py"
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        import gguf
    except ImportError:
        raise GGUFCheckError("reading GGUF headers needs llama.cpp's gguf-py: python -m qmd_unsloth.llamacpp prepare "
                             "(or pip install gguf)") from None
    return gguf


def read_gguf(path: Path, tools: Path | None = None) -> dict:
    """Header facts through llama.cpp's own gguf-py."""
    gguf = _gguf_module(tools)
    reader = gguf.GGUFReader(str(path))
    f = reader.fields

    def get(key, default=None):
        return f[key].contents() if key in f else default

    tokens = get("tokenizer.ggml.tokens", [])
    eos = get("tokenizer.ggml.eos_token_id")
    bos = get("tokenizer.ggml.bos_token_id")
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    size = Path(path).stat().st_size
    ftype = get("general.file_type")
    return {"file_type": "unspecified" if ftype is None else FILE_TYPE_NAMES.get(ftype, f"unknown ({ftype})"),
            "architecture": get("general.architecture"),
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
            "eos_token": tokens[eos] if eos is not None and eos < len(tokens) else None,
            "bos_token": tokens[bos] if bos is not None and bos < len(tokens) else None,
            "chat_template": get("tokenizer.chat_template"), "pre_tokenizer": get("tokenizer.ggml.pre"),
            "context_length": get(f"{get('general.architecture')}.context_length"),
            "parameters": n_params, "bytes": size, "bits_per_weight": round(size * 8 / max(n_params, 1), 2)}


def check_header(path: Path, quant: str | None = None, expected=None, tools: Path | None = None) -> dict:
    """The checks that need no model load: a GGUF file, its file type (``quant`` when given; otherwise any: whether
    llama.cpp loads it is checked by loading it), EOS, and an embedded chat template that node-llama-cpp (inside QMD)
    maps to a wrapper we mirror; when ``expected`` (the ``prompt.ChatFormat`` the model was trained with) is given,
    the same wrapper and BOS, so QMD's prompt is the training prompt.  Adds ``chat_format`` (the ChatFormat)."""
    from .prompt import UnsupportedChatTemplate, chat_format

    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise GGUFCheckError(f"{name}: no such file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise GGUFCheckError(f"{name}: not a GGUF file (it starts with {magic!r}, expected b'GGUF')")
    try:
        info = read_gguf(path, tools)
    except GGUFCheckError:
        raise
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on a cut or damaged file
        raise GGUFCheckError(f"{name}: the GGUF header cannot be read, the file is truncated or corrupt "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if quant is not None and info["file_type"] != quant.upper():
        raise GGUFCheckError(f"{name}: file type is {info['file_type']}, expected {quant.upper()}")
    if info["eos_token"] != EOS:
        raise GGUFCheckError(f"{name}: EOS token is {info['eos_token']!r}, expected {EOS!r}")
    if not info["chat_template"]:
        raise GGUFCheckError(f"{name}: no chat template embedded")
    try:
        fmt = chat_format(info["chat_template"], info["architecture"], info["bos_token"])
    except UnsupportedChatTemplate as e:
        raise GGUFCheckError(f"{name}: {e}") from None
    if expected is not None and fmt != expected:
        raise GGUFCheckError(f"{name}: QMD would wrap its prompt as {fmt.wrapper} (BOS {fmt.bos!r}), but the model "
                             f"was trained on {expected.wrapper} (BOS {expected.bos!r}): its prompt would differ")
    info["chat_format"] = fmt
    info["prompt_matches_training"] = expected is not None
    return info


def load_checked(path: Path, quant: str | None = None, expected=None, tools: Path | None = None,
                 n_ctx: int = QMD_CONTEXT, seed: int = 0, smoke_tokens: int = 32, require_parse: bool = True,
                 isolate: bool = True):
    """(llama_cpp.Llama, facts) for a GGUF that passed every check; the caller closes the model.

    ``require_parse=False`` (export) only records whether the smoke generation parses: an undertrained model may
    write a degenerate line, which says nothing about the file; serving insists on it.  ``isolate`` runs every check
    in a child process first, so that a llama.cpp abort on a bad file cannot take the caller down."""
    if isolate:
        check_in_child(path, quant, expected, tools, n_ctx, seed, smoke_tokens, require_parse)
    from llama_cpp import Llama, LlamaGrammar

    from .llamacpp import generate_capped
    from .qmd_contract import GRAMMAR
    from .reward import score_expansion

    path = Path(path)
    info = check_header(path, quant, expected, tools)
    ctx = min(n_ctx, int(info["context_length"] or n_ctx))
    t0 = time.perf_counter()
    _step("loading it")
    try:
        llm = Llama(model_path=str(path), n_ctx=ctx, verbose=False, seed=seed)
    except ValueError as e:
        raise GGUFCheckError(f"{path}: llama.cpp cannot load it, the file is truncated or corrupt ({e})") from None
    info["load_seconds"] = round(time.perf_counter() - t0, 3)
    try:
        grammar = LlamaGrammar.from_string(GRAMMAR, verbose=False)
        t0 = time.perf_counter()
        _step("tokenizing the smoke prompt and generating under QMD's grammar")
        text, n, _ = generate_capped(llm, info["chat_format"].prompt(SMOKE_QUERY), smoke_tokens, grammar=grammar,
                                     temp=0.0)
        failure = score_expansion(SMOKE_QUERY, text).hard_failure
        if n == 0 or (failure is not None and require_parse):
            raise GGUFCheckError(f"{path}: its generation under QMD's grammar does not parse "
                                 f"({failure or 'no tokens'}): {text[:80]!r}")
    except BaseException:
        llm.close()
        raise
    info.update(n_ctx=ctx, smoke_generation={"tokens": n, "seconds": round(time.perf_counter() - t0, 2),
                                             "text": text[:200], "hard_failure": failure})
    parses = failure is None
    info["checks"] = {"header": True, "file_type": quant.upper() if quant else f"any ({info['file_type']})",
                      "eos": EOS, "chat_wrapper": info["chat_format"].wrapper,
                      "wrapper_matches_training": info["prompt_matches_training"], "llama_cpp_load": True,
                      "smoke_tokens": n, "smoke_generation_parses": parses}
    info["verified"] = bool(info["prompt_matches_training"] and parses)
    info.pop("chat_template")
    return llm, info


def describe_checks(info: dict) -> str:
    """What the checks of ``load_checked`` established, in words: "verified (...)" only when every check passed."""
    c = info.get("checks")
    if not c:  # a record from before checks were recorded, or a header-only check
        return "header only (not verified)"
    wrapper = c["chat_wrapper"]
    gen = f"a {c['smoke_tokens']}-token greedy generation under QMD's grammar"
    if info.get("verified"):
        return f"verified: header, EOS, QMD's {wrapper} wrapper as trained, llama.cpp load, {gen} that parses"
    done = [f"header, EOS, llama.cpp load, {gen}"]
    missing = []
    if not c["wrapper_matches_training"]:
        missing.append(f"QMD would use its {wrapper} wrapper, not compared with the training one (no export.json "
                       "beside the file)")
    else:
        done.insert(0, f"QMD's {wrapper} wrapper as trained")
    if not c["smoke_generation_parses"]:
        why = (info.get("smoke_generation") or {}).get("hard_failure") or "no tokens"
        missing.append(f"its generation does not parse under the reward ({why})")
    return f"checked ({'; '.join(done)}), not verified: {'; '.join(missing)}"


def exported_format(path: Path):
    """The ``prompt.ChatFormat`` the model was trained with, from the export.json that export wrote beside the GGUF
    (None when there is none or it does not list this file)."""
    from .prompt import ChatFormat

    path = Path(path)
    try:
        report = json.loads((path.parent / "export.json").read_text())
    except (OSError, ValueError):
        return None
    fmt = report.get("chat_format") if isinstance(report, dict) else None
    if path.name in (report.get("files") or {}) and isinstance(fmt, dict) and set(fmt) == {"wrapper", "bos"}:
        return ChatFormat(**fmt)
    return None


def verify_gguf(path: Path, quant: str | None = None, expected=None, tools: Path | None = None,
                require_parse: bool = True, isolate: bool = True) -> dict:
    """Every check of ``load_checked`` (in a child process unless ``isolate=False``); returns the facts
    (``chat_format`` as a dict)."""
    if isolate:
        return check_in_child(path, quant, expected, tools, 1024, 0, 32, require_parse)
    llm, info = load_checked(path, quant, expected, tools, n_ctx=1024, require_parse=require_parse, isolate=False)
    llm.close()
    info["chat_format"] = vars(info["chat_format"]).copy()
    return info


# ------------------------------------------------------------------------------------------ the child process

_STEP = "QMD_UNSLOTH_GGUF_STEP"  # the child's stderr marks each llama.cpp step with this prefix


def _step(what: str) -> None:
    if os.environ.get(_STEP):
        print(f"{_STEP}: {what}", file=sys.stderr, flush=True)


def check_in_child(path: Path, quant: str | None = None, expected=None, tools: Path | None = None,
                   n_ctx: int = 512, seed: int = 0, smoke_tokens: int = 32, require_parse: bool = True,
                   timeout: float = 1800) -> dict:
    """``load_checked`` in a child process: its facts, its GGUFCheckError, or one line for a child that died (the
    signal, llama.cpp's C++ message and the step it was in)."""
    from .llamacpp import CHILD_ENV, aborted

    path = Path(path)
    check_header(path, quant, expected, tools)  # the cheap checks here, with their own messages
    job = {"path": str(path), "quant": quant, "expected": vars(expected) if expected is not None else None,
           "tools": str(tools) if tools else None,
           "n_ctx": n_ctx, "seed": seed, "smoke_tokens": smoke_tokens, "require_parse": require_parse}
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, **CHILD_ENV, _STEP: "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        r = subprocess.run([sys.executable, "-m", "qmd_unsloth.gguf_check", "--child"], input=json.dumps(job),
                           capture_output=True, text=True, errors="replace", env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GGUFCheckError(f"{path}: llama.cpp did not finish loading it and a {smoke_tokens}-token generation "
                             f"within {timeout:g} s") from None
    steps = [l.split(": ", 1)[1] for l in r.stderr.splitlines() if l.startswith(f"{_STEP}: ")]
    step = steps[-1] if steps else "starting"
    died = aborted(r.returncode, r.stderr)
    if died:
        hint = ("; its vocabulary lacks a token llama.cpp needs (see docs/export.md)"
                if "out_of_range" in died and step.startswith("tokeniz") else "")
        raise GGUFCheckError(f"{path}: llama.cpp aborted while {step} ({died[:200]}){hint}")
    out = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not out:
        tail = [l.strip() for l in r.stderr.splitlines() if l.strip() and not l.startswith(_STEP)][-1:] or ["no output"]
        raise GGUFCheckError(f"{path}: the llama.cpp check exited with status {r.returncode} while {step}: "
                             f"{tail[0][:200]}")
    result = json.loads(out[-1])
    if "error" in result:
        raise GGUFCheckError(result["error"])
    return result["info"]


def _child() -> int:
    job = json.loads(sys.stdin.read())
    try:
        from .prompt import ChatFormat

        expected = ChatFormat(**job["expected"]) if job["expected"] else None
        llm, info = load_checked(Path(job["path"]), job["quant"], expected, job["tools"] and Path(job["tools"]),
                                 n_ctx=job["n_ctx"], seed=job["seed"], smoke_tokens=job["smoke_tokens"],
                                 require_parse=job["require_parse"], isolate=False)
        llm.close()
    except GGUFCheckError as e:
        print(json.dumps({"error": str(e)}))
        return 0
    info["chat_format"] = vars(info["chat_format"]).copy()
    print(json.dumps({"info": info}, default=str))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        raise SystemExit(_child())
    raise SystemExit("usage: python -m qmd_unsloth.gguf_check --child  (a JSON job on stdin; used by check_in_child)")
