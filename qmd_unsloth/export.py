"""Export: a Q4_K_M GGUF (plus optional other quants), checked in llama.cpp under QMD's prompt, with an Ollama Modelfile.

    python -m qmd_unsloth.export --model runs/grpo/latest --out runs/gguf [--quant q4_k_m] [--also q8_0]
        [--install-qmd] [--reload http://127.0.0.1:8765]

``--model`` is a run folder (its ``merged/``), a merged model folder, or a LoRA adapter folder (merged onto its base
first).  ``--backend unsloth`` (the ``auto`` choice when CUDA and unsloth are there; it also runs on Unsloth's CPU
backend) makes the GGUF with Unsloth's ``save_pretrained_gguf``; ``--backend llama.cpp`` with llama.cpp's converter
and quantizer directly.  Either way nothing is downloaded or installed: the pinned tools folder (``python -m
qmd_unsloth.llamacpp prepare``) is used, and Unsloth is pointed at it before it is imported.  Every file is
written under a temporary name, checked (file type, EOS, QMD's chat wrapper equal to the training one, a llama.cpp
load and a short greedy generation under QMD's grammar: ``qmd_unsloth.gguf_check``), and only then renamed into
place.  It is reported "verified" only when that generation also parses under the reward; an undertrained model
may write a degenerate line, which says nothing about the file, so export records that check without requiring it.  llama.cpp runs only in child processes (converter, quantizer, the
check), so an abort inside it is one line and leaves no temporary folder.  A tokenizer.json that transformers built
from a byte-level-BPE GGUF (SmolLM2's) is exported repaired (docs/export.md).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .atomic import atomic_write_text, clean_stale
from .cli import UserError, command
from .config import ExportConfig
from .gguf_check import SMOKE_QUERY, GGUFCheckError, describe_checks, read_gguf, verify_gguf  # noqa: F401
from .llamacpp import QUANT_TYPES, ToolsMissing

def modelfile(gguf: str, chat_format) -> str:
    """An Ollama Modelfile that gives the model QMD's context (qmd_contract): node-llama-cpp's system prompt, the chat
    wrapper's turns, no think block; QMD's sampling; stop at end of turn."""
    from .qmd_contract import DEFAULT_SYSTEM_PROMPT, SAMPLING

    bos = chat_format.bos if chat_format.wrapper == "ChatML" else ""
    return (f"# Ollama: ollama create qmd-expand -f Modelfile\n"
            f"# QMD's context for the model ({chat_format.wrapper} wrapper, node-llama-cpp's default system prompt) and "
            f"the sampling QMD applies.\n# The prompt must be the full user text QMD sends: \"/no_think Expand this "
            f"search query: <query>\".\nFROM ./{gguf}\n"
            f'TEMPLATE """{bos}<|im_start|>system\n{{{{ .System }}}}<|im_end|>\n<|im_start|>user\n{{{{ .Prompt }}}}'
            f'<|im_end|>\n<|im_start|>assistant\n"""\n'
            f'SYSTEM """{DEFAULT_SYSTEM_PROMPT}"""\n'
            f"PARAMETER temperature {SAMPLING['temperature']}\nPARAMETER top_k {SAMPLING['top_k']}\n"
            f"PARAMETER top_p {SAMPLING['top_p']}\nPARAMETER min_p {SAMPLING['min_p']}\nPARAMETER num_ctx 2048\n"
            f"PARAMETER num_predict 600\nPARAMETER stop <|im_end|>\n")


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


def repaired_view(src: Path, view: Path) -> tuple[Path, bool]:
    """(``src``, False), or a view of ``src`` (links to its files) with a repaired tokenizer.json and True, for a model
    saved with a byte-level BPE that transformers' GGUF loader marked byte_fallback (llama.cpp's converter would write
    it as a SentencePiece vocabulary and llama.cpp would abort in ``llama_vocab::byte_to_token``; see
    qmd_unsloth.llamacpp.byte_level_bpe_repair).  Models trained since qmd_unsloth repairs the tokenizer on load are
    saved right; this keeps the ones trained before exportable, without copying their weights."""
    from .llamacpp import byte_level_bpe_repair

    try:
        state = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return src, False  # no tokenizer.json, or one the converter reports on itself
    fixed = byte_level_bpe_repair(state)
    if fixed is None:
        return src, False
    view.mkdir()
    for f in src.iterdir():
        if f.name != "tokenizer.json":
            (view / f.name).symlink_to(f.resolve())
    (view / "tokenizer.json").write_text(json.dumps(fixed, ensure_ascii=False), encoding="utf-8")
    print(f"export: {src / 'tokenizer.json'}: byte-level BPE marked byte_fallback (made by transformers' GGUF loader, "
          "which llama.cpp would misread as SentencePiece): exported with that flag off and the byte-level decoder "
          "(same token ids)")
    return view, True


def verify(path: Path, quant: str, tools: Path, chat_format) -> dict:
    """Checks an exported GGUF with the shared checks (qmd_unsloth.gguf_check) against the ``prompt.ChatFormat`` the
    model was trained with; raises ExportError with the first failed check."""
    try:
        return verify_gguf(path, quant, chat_format, tools, require_parse=False)
    except GGUFCheckError as e:
        raise ExportError(str(e).replace(str(path), path.name, 1)) from None


def export_backend(requested: str) -> str:
    """'unsloth' or 'llama.cpp': auto picks Unsloth where training would (CUDA and unsloth installed)."""
    from .model import choose_backend

    if requested == "llama.cpp":
        return "llama.cpp"
    return "unsloth" if choose_backend("unsloth" if requested == "unsloth" else "auto") == "unsloth" else "llama.cpp"


def export(cfg: ExportConfig) -> dict:
    from .llamacpp import check, convert, quantize

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
    backend = export_backend(cfg.backend)
    if backend == "unsloth":
        from .model import import_unsloth

        # before the tokenizer and adapter loads below import transformers and peft, and with the tools folder
        # Unsloth must use (it reads UNSLOTH_LLAMA_CPP_PATH once, at import)
        import_unsloth(tools)
    from .model import load_tokenizer

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
        src, report["tokenizer_repaired"] = repaired_view(src, tmp / "source")
        from .prompt import UnsupportedChatTemplate, format_of_tokenizer

        tokenizer = load_tokenizer(str(src))
        try:
            trained_format = format_of_tokenizer(tokenizer)
        except UnsupportedChatTemplate as e:
            raise ExportError(f"{src}: {e}") from None
        report["backend"] = backend
        # what the GGUF was checked against: QMD's wrapper for the trained model (qmd_install reads it)
        report["chat_format"] = vars(trained_format).copy()
        for quant in quants:
            t0 = time.perf_counter()
            staged = tmp / f"{name}-{quant}.gguf"
            if backend == "unsloth":
                _unsloth_gguf(src, tmp / f"unsloth-{quant}", quant, cfg.allow_llama_cpp_install, staged)
            else:
                f16 = tmp / f"{name}-f16.gguf"
                if not f16.exists():
                    convert(tools, src, f16, "f16")
                quantize(tools, f16, staged, quant)
            info = verify(staged, quant, tools, trained_format)
            final = out / staged.name
            os.replace(staged, final)  # only a file that passed the checks reaches its final name
            info["seconds"] = round(time.perf_counter() - t0, 1)
            report["files"][final.name] = info
            print(f"export: {final} {info['file_type']} {info['bytes'] / 2**20:.1f} MiB, "
                  f"{info['bits_per_weight']} bits/weight, {describe_checks(info)} ({info['seconds']} s)")
    first = next(iter(report["files"]))
    atomic_write_text(out / "Modelfile", modelfile(first, trained_format))
    atomic_write_text(out / "export.json", json.dumps(report, indent=2) + "\n")
    return report


def _unsloth_gguf(src: Path, workdir: Path, quant: str, allow_install: bool, staged: Path) -> None:
    """Unsloth's own save_pretrained_gguf, on the tools folder import_unsloth() pointed it at.

    Where the file lands differs by backend, so the call's return value is used, never a search of ``workdir``:
    on CUDA it is written into a SIBLING folder ``<workdir>_gguf`` and the dict returned names it in ``gguf_files``
    (unsloth/save.py unsloth_save_pretrained_gguf, _gguf_output_directory); Unsloth's CPU backend writes under
    ``workdir`` and returns the list of paths (unsloth_zoo/cpu/loader.py save_pretrained_gguf).
    """
    os.environ["UNSLOTH_LLAMA_CPP_OFFLINE"] = "0" if allow_install else "1"  # read at call time by unsloth_zoo
    os.environ["UNSLOTH_AUTO_INSTALL"] = "1" if allow_install else "0"
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(model_name=str(src), load_in_4bit=False, use_exact_model_name=True)
    result = model.save_pretrained_gguf(str(workdir), tok, quantization_method=quant)
    files = result.get("gguf_files", []) if isinstance(result, dict) else list(result or [])
    made = [Path(f) for f in files if Path(f).name.upper().endswith(f".{quant.upper()}.GGUF")]
    if not made or not made[0].is_file():
        raise ExportError(f"Unsloth's save_pretrained_gguf reported no {quant} file (it returned {files})")
    shutil.move(str(made[0]), staged)
    for folder in (workdir, Path(f"{workdir}_gguf")):
        shutil.rmtree(folder, ignore_errors=True)


@command("export")
def main(argv: list[str] | None = None) -> int:
    from .config import parse_stage_args

    cfg, _ = parse_stage_args("export", __doc__, argv)
    report = export(cfg)  # user and environment faults become one line in the @command boundary
    _after_export(cfg, Path(cfg.out) / next(iter(report["files"])))
    return 0


def _after_export(cfg: ExportConfig, gguf: Path) -> None:
    """--install-qmd and --reload URL, on the main GGUF (each checks it again itself)."""
    if cfg.install_qmd:
        from .qmd_install import describe, install

        print(describe(install(gguf)))
    if cfg.reload:
        from .serve import reload_model

        out = reload_model(cfg.reload, gguf)
        print(f"export: {cfg.reload} now serves {out['model']} (was {out['previous']})")


if __name__ == "__main__":
    raise SystemExit(main())
