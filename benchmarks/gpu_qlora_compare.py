"""Unsloth 4-bit QLoRA against transformers + peft + bitsandbytes 4-bit QLoRA, side by side on one GPU.

    python benchmarks/gpu_qlora_compare.py --model MODEL_DIR --out benchmarks/results/qlora_compare-<gpu>.json
    python benchmarks/gpu_qlora_compare.py --dry-run --out /tmp/compare.json     (CPU, tiny model: code paths only)

Same model, data (the shipped data), batch, sequence length and LoRA for both; each backend runs in its own
subprocess, because importing unsloth patches transformers, trl and peft for the whole process.  Measures SFT
tokens/s and seconds/step, GRPO seconds/step, and peak GPU memory of each stage (load included).  scripts/gpu_check.sh
runs it with a Qwen3-1.7B-shaped model with random weights (no hub on the GPU machine): speed and memory are those of
the real shape; losses and rewards mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SFT_STEPS, GRPO_STEPS = 10, 3
BATCH, SEQ, GRPO_TOKENS = 8, 512, 64


def worker(backend: str, model: str, work: Path, dry: bool) -> dict:
    if backend == "unsloth":
        from qmd_unsloth.model import import_unsloth

        import_unsloth()  # before transformers, trl and peft
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_stage import machine, run_grpo, run_sft

    from qmd_unsloth import config as C

    common = dict(output_dir=work, report_to=[], logging_steps=1, save_steps=10_000, use_cpu=dry, seed=0)
    sft_cfg = C.load(C.SFTConfig, None, base_model=model, backend=backend, run_name=f"sft-{backend}",
                     max_steps=3 if dry else SFT_STEPS, per_device_train_batch_size=2 if dry else BATCH,
                     gradient_accumulation_steps=1, max_seq_length=128 if dry else SEQ, val_fraction=0.0, **common)
    result = {"backend": backend, "machine": machine(), "sft": run_sft(sft_cfg, work / "sft")}
    # Unsloth's CPU backend trains SFT only: the dry run takes GRPO's code path through the hf backend instead.
    grpo_backend = "hf" if dry else backend
    grpo_cfg = C.load(C.GRPOConfig, None, sft_model=model, backend=grpo_backend, run_name=f"grpo-{backend}",
                      max_steps=3 if dry else GRPO_STEPS, per_device_train_batch_size=2 if dry else 4,
                      num_generations=2 if dry else 4, gradient_accumulation_steps=1,
                      max_completion_length=8 if dry else GRPO_TOKENS,
                      use_vllm="off", **common)
    result["grpo"] = run_grpo(grpo_cfg, work / "grpo")
    return result


def compare(results: dict) -> dict:
    u, h = results.get("unsloth", {}), results.get("hf", {})
    out = {}
    try:
        out["sft_tokens_per_second_ratio"] = round(u["sft"]["tokens_per_second"] / h["sft"]["tokens_per_second"], 2)
        out["sft_peak_vram_ratio"] = round(u["sft"]["peak_vram_gib"] / h["sft"]["peak_vram_gib"], 2)
        out["grpo_seconds_per_step_ratio"] = round(u["grpo"]["seconds_per_step"] / h["grpo"]["seconds_per_step"], 2)
        out["grpo_peak_vram_ratio"] = round(u["grpo"]["peak_vram_gib"] / h["grpo"]["peak_vram_gib"], 2)
    except (KeyError, TypeError, ZeroDivisionError):
        pass
    if "sft_tokens_per_second_ratio" in out and "sft_peak_vram_ratio" in out:
        out["goal_2x_tokens_at_half_vram"] = (out["sft_tokens_per_second_ratio"] >= 2.0
                                              and out["sft_peak_vram_ratio"] <= 0.5)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: the tiny model with --dry-run)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps: checks the code paths")
    ap.add_argument("--worker", choices=["unsloth", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=600, help="seconds for each backend's subprocess")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    if args.dry_run and not args.model:
        from qmd_unsloth.tiny import ensure

        args.model = str(ensure())
    if not args.model:
        ap.error("--model is required without --dry-run")
    if args.worker:
        work = Path(tempfile.mkdtemp(prefix=f"qmd-{out.stem}-{args.worker}-"))
        sys.path.insert(0, str(REPO / "benchmarks"))
        result = worker(args.worker, args.model, work, args.dry_run)
        from gpu_stage import write_json

        write_json(out, result)
        return 0

    results: dict = {}
    for backend in ("unsloth", "hf"):
        part = Path(tempfile.gettempdir()) / f"qmd-{out.stem}.{backend}.{os.getpid()}.json"
        cmd = [sys.executable, __file__, "--worker", backend, "--model", args.model, "--out", str(part)]
        if args.dry_run:
            cmd.append("--dry-run")
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(REPO), os.environ.get("PYTHONPATH", "")])}, timeout=args.timeout)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc == 0 and part.is_file():
            results[backend] = json.loads(part.read_text())
            part.unlink()
        else:
            results[backend] = {"error": f"worker exited {rc}"}
        results[backend]["wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{backend}: {json.dumps(results[backend].get('sft', results[backend]))[:300]}", flush=True)
    report = {"benchmark": "gpu_qlora_compare", "dry_run": args.dry_run, "model": args.model,
              "settings": {"sft_steps": SFT_STEPS, "grpo_steps": GRPO_STEPS, "batch": BATCH, "max_seq_length": SEQ,
                           "grpo_completion_tokens": GRPO_TOKENS} if not args.dry_run else
                          {"sft_steps": 3, "grpo_steps": 3, "batch": 2, "max_seq_length": 128, "grpo_completion_tokens": 8},
              "results": results, "unsloth_vs_hf": compare(results)}
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_stage import write_json

    write_json(out, report)
    print(json.dumps(report["unsloth_vs_hf"]))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
