"""Retrieval reward calls per second (BM25-only and hybrid) on an IR collection, against a GRPO step's needs.

    python benchmarks/retrieval_reward_speed.py [--collection ../shared/ir/cranfield] [--calls 200] [--out FILE]

A GRPO step scores batch x num_generations completions (8 to 16 with the shipped presets); the reward must score
them in a small fraction of the step (seconds on a GPU, tens of seconds on CPU).  Each call here scores a different
query's completion, so every raw-query ranking is computed once, as in GRPO's first epoch.  Writes
benchmarks/results/retrieval_reward_speed-<tag>.json, <tag> being ``cpu`` or the GPU's short name (``h100``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMPLETION = ("hyde: {q} was measured in the wind tunnel; the results agree with the linear theory within 5 percent.\n"
              "lex: {k} measurements\nlex: {k} theory\nvec: what experiments were made on {q}\n"
              "vec: how does the theory of {q} compare with measurements")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collection", default=str(REPO.parent / "shared" / "ir" / "cranfield"))
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    import machine
    from qmd_unsloth.retrieval import load_collection
    from qmd_unsloth.retrieval_reward import RetrievalReward

    queries = list(load_collection(args.collection).queries.values())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {"benchmark": "retrieval_reward_speed", "collection": args.collection,
              "retriever": "qmd_unsloth.retrieval: QMD 2.8.3's hybridQuery mirrored (SQLite FTS5, MiniLM)",
              "machine": {**machine.describe(gpu), "torch_threads": torch.get_num_threads()},
              "date": time.strftime("%Y-%m-%d"), "modes": {}}
    for mode in ("bm25", "hybrid"):
        t0 = time.perf_counter()
        reward = RetrievalReward(args.collection, mode=mode)
        build = time.perf_counter() - t0
        calls = [(q, COMPLETION.format(q=q, k=" ".join(q.split()[:2]))) for q in
                 (queries * (args.calls // len(queries) + 1))[: args.calls]]
        t0 = time.perf_counter()
        gains = [reward.gain(q, c) for q, c in calls]
        secs = time.perf_counter() - t0
        result["modes"][mode] = {"build_seconds": round(build, 2), "calls": len(calls),
                                 "calls_per_second": round(len(calls) / secs, 1),
                                 "seconds_per_16_completions": round(16 * secs / len(calls), 3),
                                 "mean_gain_of_a_templated_expansion": round(sum(gains) / len(gains), 4)}
        print(f"{mode:>6}: index {build:.1f} s, {len(calls) / secs:.1f} calls/s "
              f"({16 * secs / len(calls):.2f} s per 16 completions)")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"retrieval_reward_speed-{machine.tag(gpu)}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
