"""Serve speed: requests/s and p50/p95 latency of /expand at concurrency 1, 4 and 8, then the same while the model is
hot-swapped every half second.  A real `python -m qmd_unsloth.serve` on a free port.

    python benchmarks/serve_speed.py [--model FILE.gguf] [--requests 48] [--max-tokens 32]

Without --model the tiny test model is exported to a Q4_K_M GGUF first (CPU, offline, ~15 s).  Writes
benchmarks/results/serve_speed-cpu.json; the machine (CPU model, cores, load average at start) is recorded inside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def machine() -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import machine as m

    return m.describe()  # no GPU used: llama.cpp on the CPU


def start(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "qmd_unsloth.serve", "--model", str(model), "--port", "0",
                             "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    for _ in range(600):
        first = log.read_text().split("\n", 1)[0]
        if first.startswith("serve: http://"):
            return proc, first.split()[1]
        if proc.poll() is not None:
            raise SystemExit(f"server failed: {log.read_text()[-1000:]}")
        time.sleep(0.1)
    raise SystemExit("server did not start")


def run(url: str, concurrency: int, n: int, max_tokens: int) -> dict:
    def one(i):
        t0 = time.perf_counter()
        r = httpx.get(url + "/expand", params={"q": f"docker volume backup {i}", "max_tokens": max_tokens,
                                               "seed": i}, timeout=120)
        return time.perf_counter() - t0, r.status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(d for d, _ in done)
    return {"concurrency": concurrency, "requests": n, "failures": sum(1 for _, s in done if s != 200),
            "requests_per_s": round(n / wall, 1), "p50_ms": round(statistics.median(lat) * 1000, 1),
            "p95_ms": round(lat[max(0, int(round(0.95 * n)) - 1)] * 1000, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a GGUF (default: the tiny test model, exported now)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_speed-cpu.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    result_machine = machine()  # the load average before this run adds to it
    with tempfile.TemporaryDirectory(prefix="serve-speed-") as tmp:
        tmp = Path(tmp)
        if args.model:
            model = Path(args.model)
        else:
            from qmd_unsloth import config as C
            from qmd_unsloth.export import export
            from qmd_unsloth.tiny import ensure

            export(C.load(C.ExportConfig, None, model=ensure(), out=tmp / "gguf"))
            model = tmp / "gguf" / "qmd-query-expansion-q4_k_m.gguf"
        other = tmp / "swap.gguf"
        shutil.copyfile(model, other)
        proc, url = start(model, tmp / "serve.log")
        try:
            run(url, 2, 4, args.max_tokens)  # warm-up
            steady = [run(url, c, args.requests, args.max_tokens) for c in (1, 4, 8)]
            swapping, stop, reloads = [], threading.Event(), []

            def swapper():
                k = 0
                while not stop.is_set():
                    t0 = time.perf_counter()
                    r = httpx.post(url + "/admin/reload-model", json={"path": str([other, model][k % 2])},
                                   timeout=300)
                    reloads.append((r.status_code, time.perf_counter() - t0))
                    k += 1
                    stop.wait(0.5)

            for c in (1, 4, 8):
                stop.clear()
                t = threading.Thread(target=swapper)
                t.start()
                swapping.append(run(url, c, args.requests, args.max_tokens))
                stop.set()
                t.join()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    where = result_machine
    result = {"benchmark": "serve_speed", "machine": where, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "model": "tiny test model (Q4_K_M)" if not args.model else model.name,
              "endpoint": f"/expand (QMD grammar and sampling, max_tokens {args.max_tokens})",
              "steady": steady, "during_reloads": swapping,
              "reloads": {"count": len(reloads), "failures": sum(1 for s, _ in reloads if s != 200),
                          "mean_seconds": round(statistics.mean(d for _, d in reloads), 3) if reloads else None}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from qmd_unsloth.atomic import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"machine: {result['machine']}")
    print("phase           conc  req/s   p50 ms   p95 ms  failures")
    for phase, rows in (("steady", steady), ("during reloads", swapping)):
        for r in rows:
            print(f"{phase:<15} {r['concurrency']:>4} {r['requests_per_s']:>6} {r['p50_ms']:>8} {r['p95_ms']:>8} "
                  f"{r['failures']:>9}")
    print(f"reloads: {result['reloads']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
