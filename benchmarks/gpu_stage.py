"""Shared by the GPU benchmarks (not a benchmark itself): run SFT or GRPO for a few steps through qmd_unsloth's own
trainers and time them: seconds per optimizer step after warm-up, SFT tokens per second (TRL's logged num_tokens),
peak GPU memory.  Callers import unsloth (qmd_unsloth.model.import_unsloth) before this module when they use it.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from pathlib import Path

WARMUP_STEPS = 2  # first steps compile kernels and warm caches: not timed


def machine() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}


def _reset_peak() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_end: list[float] = []
            self.tokens: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, **kw):
            self.step_end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                self.tokens.append((time.perf_counter(), float(logs["num_tokens"])))

    return Clock()


def _timings(clock) -> dict:
    ends = clock.step_end
    per_step = [b - a for a, b in zip(ends[WARMUP_STEPS - 1:], ends[WARMUP_STEPS:])] if len(ends) > WARMUP_STEPS else []
    out = {"steps": len(ends), "timed_steps": len(per_step),
           "seconds_per_step": round(statistics.median(per_step), 4) if per_step else None}
    toks = [t for t in clock.tokens][WARMUP_STEPS - 1:]
    if len(toks) >= 2 and toks[-1][0] > toks[0][0]:
        out["tokens_per_second"] = round((toks[-1][1] - toks[0][1]) / (toks[-1][0] - toks[0][0]), 1)
    return out


def run_sft(cfg, run: Path) -> dict:
    """A few SFT steps; returns backend, timings, peak memory (load included) and the data size."""
    from qmd_unsloth import sft

    _reset_peak()
    t0 = time.perf_counter()
    trainer, _, backend, meta = sft.build_trainer(cfg, run)
    load_s = time.perf_counter() - t0
    clock = _clock()
    trainer.add_callback(clock)
    trainer.train()
    out = {"stage": "sft", "backend": backend, "load_seconds": round(load_s, 1), **_timings(clock),
           "peak_vram_gib": _peak_gib(), "train_rows": meta["train"],
           "batch": cfg.per_device_train_batch_size, "accumulation": cfg.gradient_accumulation_steps,
           "max_seq_length": cfg.max_seq_length}
    del trainer
    _reset_peak()
    return out


def run_grpo(cfg, run: Path) -> dict:
    from qmd_unsloth import grpo

    _reset_peak()
    t0 = time.perf_counter()
    trainer, _, backend, n = grpo.build_trainer(cfg, run)
    load_s = time.perf_counter() - t0
    clock = _clock()
    trainer.add_callback(clock)
    trainer.train()
    out = {"stage": "grpo", "backend": backend, "load_seconds": round(load_s, 1), **_timings(clock),
           "peak_vram_gib": _peak_gib(), "prompts": n, "num_generations": cfg.num_generations,
           "batch": cfg.per_device_train_batch_size, "max_completion_length": cfg.max_completion_length,
           "grpo_settings": {k: getattr(trainer.args, k) for k in grpo.GRPO_SETTINGS}}
    del trainer
    _reset_peak()
    return out


def write_json(path: Path, data: dict) -> None:
    from qmd_unsloth.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
