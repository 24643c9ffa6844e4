"""Time to prepare 10,000 rows (load, validate, de-duplicate, split, render prompt/completion, write); goal < 2 s.

    python benchmarks/prepare_speed.py [--rows 10000] [--out benchmarks/results/prepare_speed-cpu.json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import machine  # noqa: E402
from qmd_unsloth.atomic import atomic_write_text  # noqa: E402
from qmd_unsloth.data import load_examples, prepare  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prepare_speed-cpu.json"))
    args = ap.parse_args()
    where = machine.describe()
    base = load_examples()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "rows.jsonl"
        with src.open("w") as fh:
            for i in range(args.rows):  # unique queries, real answers
                ex = base[i % len(base)]
                fh.write(json.dumps({"query": f"{ex.query} v{i}", "category": ex.category,
                                     "output": [list(p) for p in ex.output]}) + "\n")
        prepare(Path(tmp) / "warm", [src])  # first call pays the one-off imports (transformers' jinja renderer)
        t0, c0 = time.perf_counter(), time.process_time()
        meta = prepare(Path(tmp) / "out", [src])
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = {"benchmark": "prepare_speed", "rows": args.rows, "seconds": round(secs, 3), "cpu_seconds": round(cpu, 3),
              "rows_per_second": round(args.rows / secs), "train": meta["train"], "val": meta["val"],
              "goal_seconds": 2.0, "machine": where, "date": time.strftime("%Y-%m-%d")}
    print(f"prepare: {args.rows:,} rows in {secs:.2f} s ({result['rows_per_second']:,} rows/s)")
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
