"""A pinned llama.cpp tools folder built from registry packages, so no library downloads anything during export.

    python -m qmd_unsloth.llamacpp prepare [--dir DIR] [--sdist FILE]

The folder holds llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion/`` package and ``gguf-py/`` (taken from
llama-cpp-python's source distribution, fetched from the package registry with pip) and an executable
``llama-quantize`` that calls ``llama_model_quantize`` from the installed llama-cpp-python (the same library code as
llama.cpp's own tool).  Unsloth is pointed at it with ``UNSLOTH_LLAMA_CPP_PATH``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from .cli import UserError, command
from .atomic import atomic_folder, is_temporary

LLAMA_CPP_PYTHON = "0.3.36"
DEFAULT_DIR = Path(os.environ.get("QMD_UNSLOTH_CACHE", Path.home() / ".cache" / "qmd_unsloth")) / "llama.cpp"
PREPARE_HINT = "python -m qmd_unsloth.llamacpp prepare"
QUANT_TYPES = {"q4_k_m": 15, "q8_0": 7, "q5_k_m": 17, "q6_k": 18, "f16": 1}
FILE_TYPE_NAMES = {0: "F32", 1: "F16", 7: "Q8_0", 15: "Q4_K_M", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}

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


class ToolsMissing(UserError, RuntimeError):
    """The llama.cpp tools folder or llama-cpp-python is missing (one line, names what and how to fix)."""


class ToolFailed(UserError, RuntimeError):
    """llama.cpp's converter or quantizer refused the model (one line: its last message)."""


def _tool_failed(what: str, stderr: str, outfile: Path) -> Exception:
    """A full disk named as such (not the converter's last progress line), else the tool's last message."""
    if any(w in stderr.lower() for w in ("no space left on device", "enospc", "disk quota exceeded")):
        # staged in a temporary folder of the output folder: name the output folder the user chose
        where = outfile.parent.parent / outfile.name if is_temporary(outfile.parent) else outfile
        return OSError(errno.ENOSPC, "No space left on device", str(where))
    tail = [l for l in stderr.strip().splitlines() if l.strip()][-1:] or ["no output"]
    return ToolFailed(f"{what} failed: {tail[0].strip()[:300]}")


def check(tools: str | os.PathLike = DEFAULT_DIR) -> Path:
    """Returns the tools folder, or raises ToolsMissing naming the missing piece and the command that prepares it."""
    tools = Path(tools)
    for name in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py", "llama-quantize"):
        if not (tools / name).exists():
            raise ToolsMissing(f"llama.cpp tools: {tools / name} is missing; prepare them with: {PREPARE_HINT}"
                               + (f" --dir {tools}" if tools != DEFAULT_DIR else ""))
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


def prepare(tools: str | os.PathLike = DEFAULT_DIR, sdist: str | os.PathLike | None = None) -> Path:
    """Builds the tools folder (atomically: a temporary folder renamed when complete)."""
    tools = Path(tools)
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
        quantize = tmp / "llama-quantize"
        quantize.write_text(QUANTIZE_SCRIPT.format(python=sys.executable, types=QUANT_TYPES))
        quantize.chmod(0o755)
        (tmp / "TOOLS.json").write_text(json.dumps({"llama_cpp_python": LLAMA_CPP_PYTHON, "sdist": sdist.name}) + "\n")
    return tools


def convert(tools: Path, model_dir: Path, outfile: Path, outtype: str = "f16") -> None:
    """Runs llama.cpp's converter on a HF model folder in a child process (see ``_convert_main``)."""
    cmd = [sys.executable, "-m", "qmd_unsloth.llamacpp", "_convert", str(tools), str(model_dir), "--outfile",
           str(outfile), "--outtype", outtype]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
    if r.returncode != 0:
        raise _tool_failed(f"convert_hf_to_gguf.py on {model_dir}", r.stderr, outfile)


def _qwen2_split_regex() -> str:
    from .tiny import QWEN2_SPLIT

    return QWEN2_SPLIT


def _uses_qwen2_pretokenizer(model_dir: Path) -> bool:
    try:
        pre = json.loads((model_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    except (OSError, ValueError, KeyError):
        return False
    splits = [p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
    return any(p.get("pattern", {}).get("Regex") == _qwen2_split_regex() for p in splits)


def _convert_main(argv: list[str]) -> None:
    """In the child: import the converter from the tools folder; a BPE tokenizer whose pre-tokenizer hash llama.cpp
    does not know but whose split regex is Qwen2's (such as the tiny test model's) is mapped to ``qwen2``."""
    tools, model_dir, rest = Path(argv[0]), Path(argv[1]), argv[2:]
    sys.path[:0] = [str(tools), str(tools / "gguf-py")]
    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if _uses_qwen2_pretokenizer(model_dir):
                return "qwen2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), *rest]
    convert_hf_to_gguf.main()


def quantize(tools: Path, src: Path, dst: Path, quant: str) -> None:
    if quant not in QUANT_TYPES:
        raise ToolFailed(f"quant: unknown type {quant!r} (one of {', '.join(QUANT_TYPES)})")
    # through this interpreter (the script's shebang names the python that prepared the folder, for Unsloth)
    r = subprocess.run([sys.executable, str(tools / "llama-quantize"), str(src), str(dst), quant],
                       capture_output=True, text=True, errors="replace")
    if r.returncode != 0 or not dst.is_file():
        raise _tool_failed(f"llama-quantize {quant}", r.stderr + r.stdout, dst)


def generate_capped(llm, prompt: str, max_tokens: int, **sampling) -> tuple[str, int]:
    """Text a loaded ``llama_cpp.Llama`` generates for a rendered prompt, stopped at EOS or a hard token cap (a
    random-weight model may never finish a UTF-8 character, and llama-cpp-python's chat API then ignores
    max_tokens).  ``sampling`` goes to ``Llama.generate`` (temp, top_k, top_p, presence_penalty, grammar)."""
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    out: list[int] = []
    for tok in llm.generate(tokens, **sampling):
        if tok == llm.token_eos() or len(out) >= max_tokens:
            break
        out.append(tok)
    return llm.detokenize(out, special=True).decode("utf-8", errors="replace"), len(out)


@command("llamacpp")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_convert"]:
        _convert_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.llamacpp", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build the tools folder")
    p.add_argument("--dir", default=str(DEFAULT_DIR), help=f"tools folder (default: {DEFAULT_DIR})")
    p.add_argument("--sdist", help="a llama-cpp-python source distribution already downloaded")
    c = sub.add_parser("check", help="say whether the tools folder is ready")
    c.add_argument("--dir", default=str(DEFAULT_DIR))
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
