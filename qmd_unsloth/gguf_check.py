"""The GGUF checks every consumer of an exported model runs: export before renaming, serve before a hot swap, the QMD
install before placing a file.

``load_checked(path)`` reads the header (llama.cpp's gguf-py), checks the file type, the EOS token and that QMD's
node-llama-cpp will wrap the chat the way the model was trained (the chat wrapper it picks for the embedded template
and architecture, and the BOS it writes: ``prompt.chat_format``), loads the file in llama.cpp and runs a capped greedy
generation of QMD's prompt under QMD's grammar that the reward must parse; it returns the loaded ``llama_cpp.Llama``
and the facts.  Any failed check raises ``GGUFCheckError`` with one line naming the file and the reason.
"""

from __future__ import annotations

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
    return {"file_type": FILE_TYPE_NAMES.get(get("general.file_type"), str(get("general.file_type"))),
            "architecture": get("general.architecture"),
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
            "eos_token": tokens[eos] if eos is not None and eos < len(tokens) else None,
            "bos_token": tokens[bos] if bos is not None and bos < len(tokens) else None,
            "chat_template": get("tokenizer.chat_template"), "pre_tokenizer": get("tokenizer.ggml.pre"),
            "context_length": get(f"{get('general.architecture')}.context_length"),
            "parameters": n_params, "bytes": size, "bits_per_weight": round(size * 8 / max(n_params, 1), 2)}


def check_header(path: Path, quant: str | None = None, expected=None, tools: Path | None = None) -> dict:
    """The checks that need no model load: a GGUF file, its file type (``quant`` when given, else a known one), EOS,
    and an embedded chat template that node-llama-cpp (inside QMD) maps to a wrapper we mirror; when ``expected`` (the
    ``prompt.ChatFormat`` the model was trained with) is given, the same wrapper and BOS, so QMD's prompt is the
    training prompt.  Adds ``chat_format`` (the ChatFormat) to the facts."""
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
    if quant is None and info["file_type"] not in FILE_TYPE_NAMES.values():
        raise GGUFCheckError(f"{name}: unknown file type {info['file_type']}")
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
                 n_ctx: int = QMD_CONTEXT, seed: int = 0, smoke_tokens: int = 32, require_parse: bool = True):
    """(llama_cpp.Llama, facts) for a GGUF that passed every check; the caller closes the model.

    ``require_parse=False`` (export) only records whether the smoke generation parses: an undertrained model may
    write a degenerate line, which says nothing about the file; serving insists on it."""
    from llama_cpp import Llama, LlamaGrammar

    from .llamacpp import generate_capped
    from .qmd_contract import GRAMMAR
    from .reward import score_expansion

    path = Path(path)
    info = check_header(path, quant, expected, tools)
    ctx = min(n_ctx, int(info["context_length"] or n_ctx))
    t0 = time.perf_counter()
    try:
        llm = Llama(model_path=str(path), n_ctx=ctx, verbose=False, seed=seed)
    except ValueError as e:
        raise GGUFCheckError(f"{path}: llama.cpp cannot load it, the file is truncated or corrupt ({e})") from None
    info["load_seconds"] = round(time.perf_counter() - t0, 3)
    try:
        grammar = LlamaGrammar.from_string(GRAMMAR, verbose=False)
        t0 = time.perf_counter()
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
    info.pop("chat_template")
    return llm, info


def verify_gguf(path: Path, quant: str | None = None, expected=None, tools: Path | None = None,
                require_parse: bool = True) -> dict:
    """Every check of ``load_checked``; the model is closed again.  Returns the facts (``chat_format`` as a dict)."""
    llm, info = load_checked(path, quant, expected, tools, n_ctx=1024, require_parse=require_parse)
    llm.close()
    info["chat_format"] = vars(info["chat_format"]).copy()
    return info
