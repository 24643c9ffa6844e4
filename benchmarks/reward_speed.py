"""Completions scored per second by qmd_unsloth.reward on one core (goal: >= 20,000/s).

    python benchmarks/reward_speed.py [--n 50000] [--out benchmarks/results/reward_speed-cpu.json]

The completions are the shipped data's targets plus, for every fourth row, a damaged variant (a dropped line, a
missing prefix, a think block, an echo), so the mix covers the hard-failure and deduction paths too.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import machine  # noqa: E402
from qmd_unsloth.atomic import atomic_write_text  # noqa: E402
from qmd_unsloth.data import load_examples  # noqa: E402
from qmd_unsloth.prompt import format_target  # noqa: E402
from qmd_unsloth.reward import score_expansion  # noqa: E402


def workload(n):
    rows = []
    for i, ex in enumerate(load_examples()):
        target = format_target(ex.pairs)
        rows.append((ex.query, target + "<|im_end|>"))
        if i % 4 == 0:
            damaged = [target.split("\n", 1)[-1], "Sure!\n" + target, "<think>hmm</think>\n" + target,
                       f"lex: {ex.query}\nvec: {ex.query}"][i // 4 % 4]
            rows.append((ex.query, damaged))
    return (rows * (n // len(rows) + 1))[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reward_speed-cpu.json"))
    args = ap.parse_args()
    where = machine.describe(cores_used=1)  # the load average before this run adds to it
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    rows = workload(args.n)
    for q, c in rows[:2000]:  # warm-up
        score_expansion(q, c)
    best = best_cpu = 0.0
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        for q, c in rows:
            score_expansion(q, c)
        best = max(best, len(rows) / (time.perf_counter() - t0))
        best_cpu = max(best_cpu, len(rows) / (time.process_time() - c0))
    # wall-clock rate, and the rate per CPU-second of this process (what the core gives when it is not shared: the
    # project's machines are, so compare per_cpu_second across runs)
    result = {"benchmark": "reward_speed", "completions": len(rows), "per_second_best_of_3": round(best),
              "per_cpu_second_best_of_3": round(best_cpu),
              "mean_chars": round(sum(len(c) for _, c in rows) / len(rows)), "goal_per_second": 20_000,
              "machine": where, "date": time.strftime("%Y-%m-%d")}
    print(f"reward: {result['per_second_best_of_3']:,} completions/s on one core, "
          f"{result['per_cpu_second_best_of_3']:,} per CPU-second "
          f"({len(rows):,} completions, mean {result['mean_chars']} chars)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
