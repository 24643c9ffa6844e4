"""The 12 GB presets under a 12 GiB memory cap, and the projected time of the default full runs.

    python benchmarks/gpu_presets.py --model MODEL_DIR --out benchmarks/results/presets_12gb-<gpu>.json
    python benchmarks/gpu_presets.py --dry-run --out /tmp/presets.json      (CPU, tiny model: code paths only)

Runs configs/presets/sft-12gb.yaml and grpo-12gb.yaml for a few steps each under
``torch.cuda.set_per_process_memory_fraction`` set to 12 GiB (an allocation past it raises out-of-memory as on a
12 GB card), then projects from the measured seconds per step: the default full SFT (the shipped data, the
preset's batch, configs/sft.yaml's 5 epochs) and 200 GRPO steps.  With a random-weight model every GRPO completion
runs to max_completion_length, so the GRPO projection is an upper bound.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAP_GIB = 12
SFT_STEPS, GRPO_STEPS, GRPO_FULL_STEPS = 6, 3, 200


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: the tiny model with --dry-run)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps: checks the code paths")
    args = ap.parse_args(argv)

    from qmd_unsloth.model import choose_backend, import_unsloth

    dry = args.dry_run
    if not dry and choose_backend("auto") == "unsloth":
        import_unsloth()  # before transformers, trl and peft
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from gpu_stage import machine, run_grpo, run_sft, write_json

    from qmd_unsloth import config as C

    if dry and not args.model:
        from qmd_unsloth.tiny import ensure

        args.model = str(ensure())
    if not args.model:
        ap.error("--model is required without --dry-run")
    out = Path(args.out).resolve()
    work = Path(tempfile.mkdtemp(prefix=f"qmd-{out.stem}-"))
    cap = None
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        cap = min(1.0, CAP_GIB * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(cap, 0)

    report: dict = {"benchmark": "gpu_presets_12gb", "dry_run": dry, "model": args.model, "machine": machine(),
                    "memory_fraction": round(cap, 4) if cap else None, "cap_gib": CAP_GIB if cap else None}
    full_sft = C.load(C.SFTConfig, REPO / "configs" / "sft.yaml")  # the default full run: its epochs
    small = dict(output_dir=work, report_to=[], logging_steps=1, save_steps=10_000)
    if dry:
        small.update(use_cpu=True, backend="hf", per_device_train_batch_size=2, gradient_accumulation_steps=1,
                     max_seq_length=128)
    sft_cfg = C.load(C.SFTConfig, REPO / "configs" / "presets" / "sft-12gb.yaml", base_model=args.model,
                     run_name="sft", max_steps=3 if dry else SFT_STEPS, val_fraction=full_sft.val_fraction, **small)
    try:
        sft = run_sft(sft_cfg, work / "sft")
        per_epoch = math.ceil(sft["train_rows"] / (sft["batch"] * sft["accumulation"]))
        sft["full_run_steps"] = math.ceil(per_epoch * full_sft.num_train_epochs)
        if sft["seconds_per_step"]:
            sft["projected_full_sft_seconds"] = round(sft["full_run_steps"] * sft["seconds_per_step"], 1)
        sft["ok"] = True
    except torch.cuda.OutOfMemoryError as e:
        sft = {"ok": False, "error": f"out of memory under the {CAP_GIB} GiB cap: {str(e).splitlines()[0]}"}
    report["sft"] = sft

    grpo_extra = dict(small)
    if dry:
        grpo_extra.update(num_generations=2, max_completion_length=8, per_device_train_batch_size=2,
                          gradient_accumulation_steps=1)
    grpo_cfg = C.load(C.GRPOConfig, REPO / "configs" / "presets" / "grpo-12gb.yaml", sft_model=args.model,
                      run_name="grpo", max_steps=3 if dry else GRPO_STEPS, use_vllm="off", **grpo_extra)
    try:
        grpo = run_grpo(grpo_cfg, work / "grpo")
        if grpo["seconds_per_step"]:
            grpo["projected_200_steps_seconds"] = round(GRPO_FULL_STEPS * grpo["seconds_per_step"], 1)
        grpo["ok"] = True
    except torch.cuda.OutOfMemoryError as e:
        grpo = {"ok": False, "error": f"out of memory under the {CAP_GIB} GiB cap: {str(e).splitlines()[0]}"}
    report["grpo"] = grpo
    report["goals"] = {
        "full_sft_under_3_min": (sft.get("projected_full_sft_seconds") or 1e9) < 180,
        "grpo_200_steps_under_8_min": (grpo.get("projected_200_steps_seconds") or 1e9) < 480,
        "peak_vram_under_10_gb": max(sft.get("peak_vram_gib") or 1e9, grpo.get("peak_vram_gib") or 1e9) < 10 / 1.073741824,
    }
    write_json(out, report)
    print({k: report[k] for k in ("sft", "grpo", "goals")})
    return 0 if sft.get("ok") and grpo.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
