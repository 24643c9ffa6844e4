"""Export: a Q4_K_M GGUF (plus optional other quants), verified by llama.cpp, with an Ollama Modelfile.

    python -m qmd_unsloth.export --model runs/grpo/latest --out runs/gguf [--quant q4_k_m] [--also q8_0]

``--model`` is a run folder (its ``merged/``), a merged model folder, or a LoRA adapter folder (merged onto its base
first).  On the Unsloth path (CUDA + unsloth) the GGUF comes from Unsloth's ``save_pretrained_gguf``; otherwise from
llama.cpp's converter and quantizer directly.  Either way nothing is downloaded or installed: the pinned tools folder
(``python -m qmd_unsloth.llamacpp prepare``) is used, and Unsloth is told so before it is imported.  Every file is
written under a temporary name, verified (file type, tensor types, EOS, chat template, a short llama.cpp
generation), and only then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from .atomic import atomic_write_text, clean_stale
from .cli import UserError, command
from .config import ExportConfig
from .llamacpp import FILE_TYPE_NAMES, QUANT_TYPES

SMOKE_QUERY = "auth config"
MODELFILE = '''# Ollama: ollama create qmd-expand -f Modelfile
# QMD's serving settings: no system prompt, temperature 0.7, top-k 20, top-p 0.8.  The prompt must be the full user
# text QMD sends: "/no_think Expand this search query: <query>".
FROM ./{gguf}
TEMPLATE """<|im_start|>user
{{{{ .Prompt }}}}<|im_end|>
<|im_start|>assistant
<think>

</think>

"""
PARAMETER temperature 0.7
PARAMETER top_k 20
PARAMETER top_p 0.8
PARAMETER stop <|im_end|>
'''


class ExportError(UserError, RuntimeError):
    """A user-facing export problem (one line)."""


def resolve_source(model: Path) -> tuple[str, Path]:
    """('merged', folder) or ('adapter', folder) for a run folder, merged model or adapter."""
    model = Path(model)
    if (model / "merged" / "config.json").is_file():
        return "merged", model / "merged"
    if (model / "adapter_config.json").is_file():
        return "adapter", model
    if (model / "config.json").is_file():
        return "merged", model
    raise ExportError(f"{model}: not a run folder, merged model or LoRA adapter (no config.json or "
                      "adapter_config.json)")


def merge_adapter(adapter: Path, out: Path) -> Path:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    try:
        model = AutoPeftModelForCausalLM.from_pretrained(adapter).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    except (OSError, ValueError) as e:  # a broken adapter_config.json, missing weights, a base not in the cache
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise ExportError(f"{adapter}: cannot load this LoRA adapter and its base model ({why})") from e
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def read_gguf(path: Path, tools: Path) -> dict:
    """Header facts through llama.cpp's own gguf-py (from the tools folder)."""
    if str(tools / "gguf-py") not in sys.path:
        sys.path.insert(0, str(tools / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(str(path))
    f = reader.fields

    def get(key, default=None):
        return f[key].contents() if key in f else default

    tokens = get("tokenizer.ggml.tokens", [])
    eos = get("tokenizer.ggml.eos_token_id")
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    size = path.stat().st_size
    return {"file_type": FILE_TYPE_NAMES.get(get("general.file_type"), str(get("general.file_type"))),
            "architecture": get("general.architecture"),
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
            "eos_token": tokens[eos] if eos is not None and eos < len(tokens) else None,
            "chat_template": get("tokenizer.chat_template"), "pre_tokenizer": get("tokenizer.ggml.pre"),
            "parameters": n_params, "bytes": size, "bits_per_weight": round(size * 8 / max(n_params, 1), 2)}


def generate(path: Path, prompt: str, max_tokens: int = 32, **sampling) -> tuple[str, int]:
    """Loads a GGUF in llama.cpp and generates for a rendered prompt under a hard token cap."""
    from llama_cpp import Llama

    from .llamacpp import generate_capped

    try:
        llm = Llama(model_path=str(path), n_ctx=512, verbose=False, seed=0)
    except ValueError as e:  # llama-cpp-python's one answer to a file llama.cpp refuses
        raise ExportError(f"{path.name}: llama.cpp cannot load the exported file") from e
    try:
        return generate_capped(llm, prompt, max_tokens, **sampling)
    finally:
        llm.close()


def verify(path: Path, quant: str, tools: Path, tokenizer_template: str | None) -> dict:
    """Checks an exported GGUF; raises ExportError with the first failed check."""
    from .prompt import render_prompt

    info = read_gguf(path, tools)
    want = quant.upper()
    if info["file_type"] != want:
        raise ExportError(f"{path.name}: file type is {info['file_type']}, expected {want}")
    if info["eos_token"] != "<|im_end|>":
        raise ExportError(f"{path.name}: EOS token is {info['eos_token']!r}, expected '<|im_end|>'")
    if not info["chat_template"]:
        raise ExportError(f"{path.name}: no chat template embedded")
    served = render_prompt(SMOKE_QUERY, info["chat_template"])
    trained = render_prompt(SMOKE_QUERY, tokenizer_template)
    if served != trained:
        raise ExportError(f"{path.name}: the embedded chat template renders a different prompt than training")
    t0 = time.perf_counter()
    text, n = generate(path, trained, max_tokens=32, temp=0.0)
    info.update(prompt_matches_training=True, smoke_generation={"tokens": n, "seconds": round(time.perf_counter() - t0, 2),
                                                                "text": text[:200]})
    info.pop("chat_template")
    return info


def export(cfg: ExportConfig) -> dict:
    from .llamacpp import check, convert, quantize
    from .model import choose_backend, load_tokenizer

    if cfg.model is None:
        raise ExportError("--model is required (a run folder, merged model or adapter)")
    kind, src = resolve_source(cfg.model)
    quants = [cfg.quant, *[q for q in cfg.also if q != cfg.quant]]
    unknown = [q for q in quants if q not in QUANT_TYPES]
    if unknown:
        raise ExportError(f"quant: unknown type {unknown[0]!r} (one of {', '.join(QUANT_TYPES)})")
    tools = Path(cfg.llama_cpp_dir)
    if not cfg.allow_llama_cpp_install:
        check(tools)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out)  # the work folder of an export that was killed
    name = cfg.name
    report: dict = {"source": str(src), "source_kind": kind, "files": {}}
    # a temporary folder named like every other temporary (.<name>.<pid>.<random>.tmp): never a result, and
    # removed by the next run when this process dies without cleaning up
    with tempfile.TemporaryDirectory(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=out) as tmp:
        tmp = Path(tmp)
        if kind == "adapter":
            src = merge_adapter(src, tmp / "merged")
        template = load_tokenizer(str(src)).chat_template
        backend = choose_backend("auto")
        report["backend"] = backend
        for quant in quants:
            t0 = time.perf_counter()
            staged = tmp / f"{name}-{quant}.gguf"
            if backend == "unsloth":
                _unsloth_gguf(src, tmp / f"unsloth-{quant}", quant, tools, cfg.allow_llama_cpp_install, staged)
            else:
                f16 = tmp / f"{name}-f16.gguf"
                if not f16.exists():
                    convert(tools, src, f16, "f16")
                quantize(tools, f16, staged, quant)
            info = verify(staged, quant, tools, template)
            final = out / staged.name
            os.replace(staged, final)  # only a verified file reaches its final name
            info["seconds"] = round(time.perf_counter() - t0, 1)
            report["files"][final.name] = info
            print(f"export: {final} {info['file_type']} {info['bytes'] / 2**20:.1f} MiB, "
                  f"{info['bits_per_weight']} bits/weight, verified in llama.cpp ({info['seconds']} s)")
    first = next(iter(report["files"]))
    atomic_write_text(out / "Modelfile", MODELFILE.format(gguf=first))
    atomic_write_text(out / "export.json", json.dumps(report, indent=2) + "\n")
    return report


def _unsloth_gguf(src: Path, workdir: Path, quant: str, tools: Path, allow_install: bool, staged: Path) -> None:
    """Unsloth's own save_pretrained_gguf, pointed at the pinned tools folder and forbidden to install anything."""
    os.environ["UNSLOTH_LLAMA_CPP_PATH"] = str(tools)
    os.environ["UNSLOTH_LLAMA_CPP_OFFLINE"] = "0" if allow_install else "1"
    os.environ["UNSLOTH_AUTO_INSTALL"] = "1" if allow_install else "0"
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(model_name=str(src), load_in_4bit=False)
    model.save_pretrained_gguf(str(workdir), tok, quantization_method=quant)
    made = sorted(workdir.rglob(f"*{quant.upper()}*.gguf")) or sorted(workdir.rglob(f"*{quant}*.gguf"))
    if not made:
        raise ExportError(f"Unsloth's save_pretrained_gguf wrote no {quant} file under {workdir}")
    shutil.move(str(made[0]), staged)


@command("export")
def main(argv: list[str] | None = None) -> int:
    from .config import parse_stage_args

    cfg, _ = parse_stage_args("export", __doc__, argv)
    export(cfg)  # user and environment faults become one line in the @command boundary
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
