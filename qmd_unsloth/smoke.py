"""Smoke run: prepare, SFT, GRPO, merge, expand, Q4_K_M export and eval on the tiny model; CPU, offline.

    python -m qmd_unsloth.smoke --workdir runs/smoke

Every stage's outputs stay under the work folder; each is checked to exist and load.  Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from .atomic import atomic_write_text
from .cli import command

SMOKE_QUERIES = ["auth config", "docker volumes", "kubernetes pod restart loop", "lisbon tram 28"]


@command("smoke")
def main(argv: list[str] | None = None) -> int:
    return _run(argv)  # a stage's user or environment fault is one "error:" line from the @command boundary


def _run(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.smoke", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="folder for every stage's outputs")
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--sft-lr", type=float, default=3e-3, help="high: the tiny model must move in few steps")
    ap.add_argument("--grpo-steps", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    failures: list[str] = []

    def stage(name):
        t0 = time.perf_counter()
        print(f"== smoke: {name}", flush=True)
        return lambda: timings.__setitem__(name, round(time.perf_counter() - t0, 1))

    from . import config as C
    from . import tiny
    from .data import prepare

    done = stage("tiny model")
    base = tiny.ensure(work / "tiny-qwen3")
    done()

    done = stage("prepare")
    meta = prepare(work / "prepared")
    done()

    done = stage("sft")
    from . import sft

    sft_cfg = C.load(C.SFTConfig, None, base_model=str(base), output_dir=work, run_name="sft", max_steps=args.sft_steps,
                     learning_rate=args.sft_lr, lora_r=32, lora_alpha=64, per_device_train_batch_size=8, gradient_accumulation_steps=1, logging_steps=10,
                     eval_steps=args.sft_steps, save_steps=args.sft_steps, max_seq_length=256, use_cpu=True,
                     backend="hf")
    sft_merged = sft.run(sft_cfg)
    done()

    done = stage("grpo")
    from . import grpo

    grpo_cfg = C.load(C.GRPOConfig, None, sft_model=str(sft_merged), output_dir=work, run_name="grpo",
                      max_steps=args.grpo_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                      num_generations=2, max_completion_length=32, logging_steps=1, save_steps=args.grpo_steps,
                      use_cpu=True, backend="hf")
    grpo_merged = grpo.run(grpo_cfg)
    done()

    done = stage("expand and score")
    from .infer import expand, load
    from .reward import score_expansion

    model, tok = load(str(grpo_merged))
    completions = expand(model, tok, SMOKE_QUERIES, greedy=True, max_new_tokens=48)
    scores = [score_expansion(q, c) for q, c in zip(SMOKE_QUERIES, completions)]
    done()

    done = stage("export gguf")
    from .export import export

    report = export(C.load(C.ExportConfig, None, model=grpo_merged.parent, out=work / "gguf"))
    gguf_name, gguf = next(iter(report["files"].items()))
    done()

    done = stage("eval gguf")
    from .eval import run as run_eval

    queries = work / "smoke_queries.txt"
    atomic_write_text(queries, "# category: smoke\n" + "\n".join(SMOKE_QUERIES) + "\n")
    ev = run_eval(C.load(C.EvalConfig, None, model=str(work / "gguf" / gguf_name), queries=queries,
                         out=work / "eval", samples=2, max_new_tokens=48))[0]
    done()

    sft_run, grpo_run = sft_merged.parent, grpo_merged.parent
    expected = [work / "prepared" / "train.jsonl", sft_run / "metrics.json", sft_run / "loss.png",
                sft_run / "config.yaml", sft_run / "versions.json", sft_run / "merged" / "config.json",
                grpo_run / "metrics.json", grpo_run / "reward.png", grpo_run / "merged" / "model.safetensors", work / "gguf" / gguf_name, work / "gguf" / "Modelfile",
                work / "eval" / "report.json", work / "eval" / "report.md", work / "eval" / "report.png"]
    if gguf["file_type"] != "Q4_K_M" or not gguf["prompt_matches_training"]:
        failures.append(f"GGUF checks: file type {gguf['file_type']}, wrapper as trained "
                        f"{gguf['prompt_matches_training']}")
    failures += [f"missing {p}" for p in expected if not p.is_file()]
    if len(completions) != len(SMOKE_QUERIES):
        failures.append("expansion count mismatch")

    print("\nsmoke summary")
    print(f"  data: {meta['train']} train / {meta['val']} val rows")
    for name, secs in timings.items():
        print(f"  {name:<18} {secs:>6.1f} s")
    print(f"  gguf: {gguf_name} {gguf['file_type']}, {gguf['bytes'] / 2**20:.1f} MiB, "
          f"{gguf['bits_per_weight']} bits/weight, loaded and generated by llama.cpp")
    print(f"  eval (GGUF, QMD sampling + grammar): mean {ev['mean_score']:.3f}, format-valid {ev['format_valid']:.0%}")
    for q, s in zip(SMOKE_QUERIES, scores):
        print(f"  {q!r}: {s.score:.2f} {s.rating} (tiny random model: low scores expected)")
    for f in failures:
        print(f"  FAILED: {f}", file=sys.stderr)
    print("smoke: " + ("FAILED" if failures else f"OK, outputs under {work}"))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
