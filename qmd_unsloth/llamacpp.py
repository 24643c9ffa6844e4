"""A pinned llama.cpp tools folder built from registry packages, so no library downloads anything during export.

    python -m qmd_unsloth.llamacpp prepare [--dir DIR] [--sdist FILE]

The folder holds llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion/`` package and ``gguf-py/`` (taken from
llama-cpp-python's source distribution, fetched from the package registry with pip) and an executable
``llama-quantize`` that calls ``llama_model_quantize`` from the installed llama-cpp-python (the same library code as
llama.cpp's own tool).  Unsloth is pointed at it with ``UNSLOTH_LLAMA_CPP_PATH`` (see ``qmd_unsloth.model``).

The folder carries its own fixes, because Unsloth runs ``convert_hf_to_gguf.py`` from it as a child process: a
qwen2 pre-tokenizer fallback appended to ``conversion/base.py`` (a test tokenizer with Qwen2's split regex but an
unknown hash converts as ``qwen2``), and Unsloth's prebuilt-install marker so that Unsloth uses the folder as is.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

from .cli import UserError, command
from .atomic import atomic_folder, is_temporary

LLAMA_CPP_PYTHON = "0.3.36"
TOOLS_VERSION = 2  # bump when prepare() changes what the folder holds: check() then asks for a fresh prepare


def default_dir() -> Path:
    """The tools folder every stage uses unless told otherwise: $QMD_UNSLOTH_CACHE/llama.cpp (read at call time)."""
    return Path(os.environ.get("QMD_UNSLOTH_CACHE", Path.home() / ".cache" / "qmd_unsloth")) / "llama.cpp"


DEFAULT_DIR = default_dir()
PREPARE_HINT = "python -m qmd_unsloth.llamacpp prepare"
QUANT_TYPES = {"q4_k_m": 15, "q8_0": 7, "q5_k_m": 17, "q6_k": 18, "f16": 1}
# Every file type llama.cpp writes (gguf-py's LlamaFileType, MOSTLY_/ALL_ dropped): a GGUF's general.file_type.  We
# export the QUANT_TYPES above; any of these is accepted from elsewhere when llama.cpp loads the file (QMD loads what
# node-llama-cpp's llama.cpp loads: the smollm2 package ships a Q4_1, for example).
FILE_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
                   18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
                   25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
                   32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0"}
# For llama.cpp children: ggml's abort handler otherwise attaches gdb and prints a C++ backtrace before dying.
CHILD_ENV = {"GGML_NO_BACKTRACE": "1"}

QUANTIZE_SCRIPT = '''#!{python}
"""llama-quantize for qmd_unsloth: INPUT OUTPUT TYPE [NTHREADS] through llama-cpp-python's llama_model_quantize."""
import ctypes, sys
import llama_cpp
TYPES = {types!r}
if len(sys.argv) < 4 or sys.argv[3].lower() not in TYPES:
    sys.exit("usage: llama-quantize INPUT.gguf OUTPUT.gguf TYPE [NTHREADS]; TYPE one of " + ", ".join(TYPES))
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = TYPES[sys.argv[3].lower()]
params.nthread = int(sys.argv[4]) if len(sys.argv) > 4 else 0
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(0 if rc == 0 else f"llama_model_quantize failed with code {{rc}}")
'''


# Appended to conversion/base.py: every way of running the converter (ours, or Unsloth's save_pretrained_gguf, which
# runs the folder's convert_hf_to_gguf.py as a child process: unsloth_zoo/llama_cpp.py convert_to_gguf) gets it.
BASE_PATCH = """

# --- qmd_unsloth: qwen2 pre-tokenizer fallback (appended by `python -m qmd_unsloth.llamacpp prepare`) ---
# A BPE tokenizer whose pre-tokenizer hash is unknown here but whose split regex is exactly Qwen2's (such as
# qmd_unsloth's tiny test tokenizer) converts as "qwen2"; anything else still fails as before.
_QMD_UNSLOTH_QWEN2_SPLIT = {split!r}


def _qmd_unsloth_qwen2_fallback(original):
    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            try:
                with open(Path(self.dir_model) / "tokenizer.json", encoding="utf-8") as f:
                    pre = json.load(f).get("pre_tokenizer") or {{}}
            except (OSError, ValueError):
                raise NotImplementedError("BPE pre-tokenizer was not recognized") from None
            splits = [p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
            if any(p.get("pattern", {{}}).get("Regex") == _QMD_UNSLOTH_QWEN2_SPLIT for p in splits):
                logger.warning("qmd_unsloth: unknown BPE pre-tokenizer hash with Qwen2's split regex: using qwen2")
                return "qwen2"
            raise
    return get_vocab_base_pre


TextModel.get_vocab_base_pre = _qmd_unsloth_qwen2_fallback(TextModel.get_vocab_base_pre)
"""


class ToolsMissing(UserError, RuntimeError):
    """The llama.cpp tools folder or llama-cpp-python is missing (one line, names what and how to fix)."""


class ToolFailed(UserError, RuntimeError):
    """llama.cpp's converter or quantizer refused the model (one line: its last message)."""


def aborted(returncode: int, stderr: str) -> str | None:
    """How a llama.cpp child died, in words (``SIGABRT: std::out_of_range: unordered_map::at``), or None when it exited
    normally.  A C++ exception nobody catches inside llama.cpp (a vocabulary that lacks a token it looks up, for one)
    ends the process with SIGABRT after ``terminate called after throwing an instance of 'T'`` / ``what(): ...``; a
    GGML_ASSERT prints ``GGML_ASSERT(...) failed`` first."""
    import signal

    if returncode >= 0 and returncode != 134:  # 134: a shell's report of SIGABRT
        return None
    try:
        name = signal.Signals(-returncode if returncode < 0 else 6).name
    except ValueError:
        name = f"signal {-returncode}"
    lines = [l.strip() for l in (stderr or "").splitlines() if l.strip()]
    thrown = next((l.split("instance of", 1)[1].strip(" '") for l in reversed(lines)
                   if l.startswith("terminate called after throwing an instance of")), None)
    what = next((l.split("what():", 1)[1].strip() for l in reversed(lines) if l.startswith("what():")), None)
    asserted = next((l[:200] for l in reversed(lines) if "GGML_ASSERT" in l or "GGML_ABORT" in l), None)
    detail = f"{thrown}: {what}" if thrown and what else thrown or what or asserted
    return f"{name}: {detail}" if detail else name


def _tool_failed(what: str, stderr: str, outfile: Path, returncode: int = 1) -> Exception:
    """A full disk named as such (not the converter's last progress line), an abort by its signal and C++ message,
    else the tool's last message."""
    if any(w in stderr.lower() for w in ("no space left on device", "enospc", "disk quota exceeded")):
        # staged in a temporary folder of the output folder: name the output folder the user chose
        where = outfile.parent.parent / outfile.name if is_temporary(outfile.parent) else outfile
        return OSError(errno.ENOSPC, "No space left on device", str(where))
    died = aborted(returncode, stderr)
    if died:
        return ToolFailed(f"{what}: llama.cpp aborted ({died[:300]})")
    tail = [l for l in stderr.strip().splitlines() if l.strip()][-1:] or ["no output"]
    return ToolFailed(f"{what} failed: {tail[0].strip()[:300]}")


def _has_byte_level(part) -> bool:
    if not isinstance(part, dict):
        return False
    return part.get("type") == "ByteLevel" or any(_has_byte_level(p) for p in
                                                  part.get("pretokenizers", []) + part.get("decoders", []))


def byte_level_bpe_repair(state: dict) -> dict | None:
    """A repaired copy of a ``tokenizer.json`` (as a dict) that transformers built from a GGUF, or None when it needs
    no repair.

    transformers picks its GGUF tokenizer converter by ARCHITECTURE: a ``llama`` GGUF whose tokenizer is GPT-2-style
    byte-level BPE (``tokenizer.ggml.model = gpt2``: SmolLM2, Llama 3) goes through its Llama-2 converter, which
    marks the BPE ``byte_fallback`` and gives it Llama 2's decoder (ByteFallback, Fuse, Replace, ByteLevel).  It
    tokenizes correctly in transformers (every byte already has a byte-level token, so the fallback never fires), but
    llama.cpp's converter reads "BPE + byte_fallback + Sequence decoder" as a SentencePiece Llama vocabulary
    (``LlamaHfVocab``: tokenizer model ``llama``, no merges) and llama.cpp then looks up ``<0xNN>`` byte tokens that a
    byte-level vocabulary does not have: ``llama_vocab::byte_to_token`` throws ``std::out_of_range`` and the process
    aborts on the first text with a character outside the vocabulary.  The repair turns the fallback off and restores
    the byte-level decoder (GPT-2's); vocabulary, merges, pre-tokenizer and added tokens are kept, so token ids do not
    change.  A vocabulary that really has ``<0x00>``..``<0xFF>`` byte tokens is left alone."""
    model = state.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback") or not _has_byte_level(state.get("pre_tokenizer")):
        return None
    vocab = model.get("vocab") or {}
    if any(f"<0x{i:02X}>" in vocab for i in range(256)):
        return None
    fixed = json.loads(json.dumps(state))
    fixed["model"]["byte_fallback"] = False
    fixed["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return fixed


def check(tools: str | os.PathLike | None = None) -> Path:
    """Returns the tools folder, or raises ToolsMissing naming the missing piece and the command that prepares it."""
    tools = Path(tools) if tools is not None else default_dir()
    hint = PREPARE_HINT + (f" --dir {tools}" if tools != default_dir() else "")
    for name in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py", "llama-quantize"):
        if not (tools / name).exists():
            raise ToolsMissing(f"llama.cpp tools: {tools / name} is missing; prepare them with: {hint}")
    try:
        version = json.loads((tools / "TOOLS.json").read_text()).get("qmd_unsloth_tools", 1)
    except (OSError, ValueError):
        version = 1
    if version < TOOLS_VERSION:
        raise ToolsMissing(f"llama.cpp tools: {tools} was prepared by an older qmd_unsloth (no qwen2 fallback in "
                           f"conversion/base.py); prepare it again with: {hint}")
    from importlib.util import find_spec

    if find_spec("llama_cpp") is None:
        raise ToolsMissing("llama-cpp-python is not installed (it quantizes and verifies GGUF files); install it "
                           f"with: pip install llama-cpp-python=={LLAMA_CPP_PYTHON}")
    return tools


def fetch_sdist(dest: Path) -> Path:
    """llama-cpp-python's source distribution from the package registry (pip download, no build)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if found:
        return found[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dest)], check=True)
    return next(dest.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))


def prepare(tools: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None) -> Path:
    """Builds the tools folder (atomically: a temporary folder renamed when complete)."""
    tools = Path(tools) if tools is not None else default_dir()
    sdist = Path(sdist) if sdist else fetch_sdist(tools.parent / "sdist")
    with atomic_folder(tools) as tmp:
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        try:
            tar = tarfile.open(sdist)
        except tarfile.ReadError:
            raise ToolsMissing(f"{sdist}: not a source archive (a .tar.gz of llama-cpp-python=={LLAMA_CPP_PYTHON})") \
                from None
        with tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
                m.name[len(prefix):] == "convert_hf_to_gguf.py"
                or m.name[len(prefix):].startswith(("conversion/", "gguf-py/")))]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        with open(tmp / "conversion" / "base.py", "a", encoding="utf-8") as f:
            f.write(BASE_PATCH.format(split=_qwen2_split_regex()))
        quantize = tmp / "llama-quantize"
        quantize.write_text(QUANTIZE_SCRIPT.format(python=sys.executable, types=QUANT_TYPES))
        quantize.chmod(0o755)
        (tmp / "TOOLS.json").write_text(json.dumps({"llama_cpp_python": LLAMA_CPP_PYTHON, "sdist": sdist.name,
                                                    "qmd_unsloth_tools": TOOLS_VERSION}) + "\n")
        # Unsloth's install_llama_cpp (which its CPU backend's save_pretrained_gguf calls) accepts a folder that is a
        # source checkout (src/, ggml/, common/) or carries this prebuilt marker, and otherwise wipes it to re-clone
        # (unsloth_zoo/llama_cpp.py install_llama_cpp, _write_prebuilt_marker).  The marker is only read again to
        # stage a converter from the network, which never happens here: the folder's own converter and conversion/
        # package are found first (_download_convert_hf_to_gguf -> _resolve_bundle_convert_script).
        (tmp / "UNSLOTH_PREBUILT_INFO.json").write_text(json.dumps(
            {"source": "qmd_unsloth tools folder (python -m qmd_unsloth.llamacpp prepare)",
             "repo": "abetlen/llama-cpp-python", "tag": f"v{LLAMA_CPP_PYTHON}", "asset": sdist.name}, indent=2) + "\n")
    return tools


def convert(tools: Path, model_dir: Path, outfile: Path, outtype: str = "f16") -> None:
    """Runs the tools folder's ``convert_hf_to_gguf.py`` on a HF model folder in a child process, exactly as Unsloth
    does (the qwen2 fallback lives in the folder's ``conversion/base.py``)."""
    cmd = [sys.executable, str(Path(tools) / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(outfile),
           "--outtype", outtype]
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env={**os.environ, **CHILD_ENV})
    if r.returncode != 0:
        raise _tool_failed(f"convert_hf_to_gguf.py on {model_dir}", r.stderr, outfile, r.returncode)


def _qwen2_split_regex() -> str:
    from .tiny import QWEN2_SPLIT

    return QWEN2_SPLIT


def quantize(tools: Path, src: Path, dst: Path, quant: str) -> None:
    if quant not in QUANT_TYPES:
        raise ToolFailed(f"quant: unknown type {quant!r} (one of {', '.join(QUANT_TYPES)})")
    # through this interpreter (the script's shebang names the python that prepared the folder, for Unsloth)
    r = subprocess.run([sys.executable, str(tools / "llama-quantize"), str(src), str(dst), quant],
                       capture_output=True, text=True, errors="replace", env={**os.environ, **CHILD_ENV})
    if r.returncode != 0 or not dst.is_file():
        raise _tool_failed(f"llama-quantize {quant}", r.stderr + r.stdout, dst, r.returncode)


def generate_capped(llm, prompt: str, max_tokens: int, **sampling) -> tuple[str, int, bool]:
    """(text, tokens, stopped by itself) a loaded ``llama_cpp.Llama`` generates for a rendered prompt: generation
    ends at an end-of-generation token (EOS, ``<|im_end|>``, ...: llama.cpp's own set, as node-llama-cpp stops) or
    at a hard token cap (a random-weight model may never finish a UTF-8 character, and llama-cpp-python's chat API
    then ignores max_tokens).  ``sampling`` goes to ``Llama.generate`` (temp, top_k, top_p, min_p, grammar, ...).
    The prompt is tokenized with special tokens parsed and no BOS added: it already holds what the wrapper writes."""
    import llama_cpp

    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    out: list[int] = []
    stopped = False
    for tok in llm.generate(tokens, **sampling):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
            stopped = True
            break
        if len(out) >= max_tokens:
            break
        out.append(tok)
    return llm.detokenize(out, special=True).decode("utf-8", errors="replace"), len(out), stopped


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def openai_server(gguf: str | os.PathLike, *, alias: str = "local", port: int | None = None, n_ctx: int = 2048,
                  n_threads: int | None = None, log: str | os.PathLike | None = None, start_timeout: float = 120):
    """llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``, its ``server`` extra) serving
    ``gguf`` on 127.0.0.1 (a free port unless given); yields its base URL (``http://127.0.0.1:PORT/v1``) once
    ``/v1/models`` answers, and stops it afterwards."""
    import time
    import urllib.request

    port = port or free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx)]
    if n_threads:
        cmd += ["--n_threads", str(n_threads)]
    with open(log or os.devnull, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise UserError(f"llama_cpp.server exited with status {proc.returncode} while loading {gguf}"
                                    + (f"; see {log}" if log else "")) from None
                if time.monotonic() > deadline:
                    raise UserError(f"llama_cpp.server did not answer on {url} within {start_timeout:g} s") from None
                time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@command("llamacpp")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.llamacpp", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build the tools folder")
    p.add_argument("--dir", default=str(default_dir()), help=f"tools folder (default: {default_dir()})")
    p.add_argument("--sdist", help="a llama-cpp-python source distribution already downloaded")
    c = sub.add_parser("check", help="say whether the tools folder is ready")
    c.add_argument("--dir", default=str(default_dir()))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            print(f"llama.cpp tools ready in {prepare(args.dir, args.sdist)}")
        check(args.dir)
        if args.cmd == "check":
            print(f"llama.cpp tools ready in {args.dir}")
    except ToolsMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError:
        print(f"error: could not download llama-cpp-python=={LLAMA_CPP_PYTHON}'s source from the package registry",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
