"""Export: a Q4_K_M GGUF (plus optional other quants), verified by llama.cpp, with an Ollama Modelfile.

    python -m qmd_unsloth.export --model runs/grpo/latest --out runs/gguf [--quant q4_k_m] [--also q8_0]
        [--install-qmd] [--reload http://127.0.0.1:8765]

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
from pathlib import Path

from .cli import UserError, command
from .config import ExportConfig
from .gguf_check import SMOKE_QUERY, GGUFCheckError, read_gguf, verify_gguf  # noqa: F401 (re-exported)
from .llamacpp import ToolsMissing

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

    model = AutoPeftModelForCausalLM.from_pretrained(adapter).merge_and_unload()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    return out


def verify(path: Path, quant: str, tools: Path, tokenizer_template: str | None) -> dict:
    """Checks an exported GGUF with the shared checks (qmd_unsloth.gguf_check); raises ExportError with the first
    failed check."""
    try:
        return verify_gguf(path, quant, tokenizer_template, tools)
    except GGUFCheckError as e:
        raise ExportError(str(e).replace(str(path), path.name, 1)) from None


def export(cfg: ExportConfig) -> dict:
    from .llamacpp import check, convert, quantize
    from .model import choose_backend, load_tokenizer

    if cfg.model is None:
        raise ExportError("--model is required (a run folder, merged model or adapter)")
    kind, src = resolve_source(cfg.model)
    tools = Path(cfg.llama_cpp_dir)
    if not cfg.allow_llama_cpp_install:
        check(tools)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    quants = [cfg.quant, *[q for q in cfg.also if q != cfg.quant]]
    name = cfg.name
    report: dict = {"source": str(src), "source_kind": kind, "files": {}}
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp:
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
    (out / "Modelfile").write_text(MODELFILE.format(gguf=first))
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
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
    from .model import ModelLoadError

    try:
        report = export(cfg)
    except (ExportError, ToolsMissing, ModelLoadError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _after_export(cfg, Path(cfg.out) / next(iter(report["files"])))
    return 0


def _after_export(cfg: ExportConfig, gguf: Path) -> None:
    """--install-qmd and --reload URL, on the verified main GGUF."""
    if cfg.install_qmd:
        from .qmd_install import describe, install

        print(describe(install(gguf)))
    if cfg.reload:
        from .serve import reload_model

        out = reload_model(cfg.reload, gguf)
        print(f"export: {cfg.reload} now serves {out['model']} (was {out['previous']})")


if __name__ == "__main__":
    raise SystemExit(main())
