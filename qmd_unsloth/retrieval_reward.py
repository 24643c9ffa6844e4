"""Retrieval reward: an expansion scores by how much it improves the ranking of the documents judged relevant.

    reward = RetrievalReward("../shared/ir/cranfield", mode="hybrid")
    reward.gain("pressure distribution on a wing", completion)   # nDCG@10(with expansion) - nDCG@10(raw query)

The ranking is the one `bench retrieval` measures (qmd_unsloth.retrieval: QMD 2.8.3's hybridQuery mirrored in
Python, with QMD's parsing, drop rule and fallback applied to the completion, its strong-signal skip, FTS5 and
MiniLM lists and its fusion), for the raw query alone and with the expansion's lines; the reward is the difference
of their nDCG@10 on the query's judgments (real qrels, or pseudo-qrels such as the note a query was drawn from), in
[-1, 1].  ``mode="bm25"`` is QMD on an index without vectors: FTS lists only (no embedder: much faster).  A query with no
judgments gets ``None``, which TRL treats as "not scored by this function" when several rewards are combined.
The index and the document embeddings are built once per object (embeddings cached on disk).
"""

from __future__ import annotations

from pathlib import Path

from .cli import UserError

MODES = {"hybrid": ("hybrid", "hybrid+expansions"), "bm25": ("bm25", "bm25+lex"),
         "dense": ("dense", "dense+vec/hyde")}


class RetrievalRewardError(UserError):
    """A bad collection, qrels file or mode (one line)."""


def _key(query: str) -> str:
    return " ".join(str(query).lower().split())


class RetrievalReward:
    """Callable as a TRL reward function (``completions``, ``query`` keyword)."""

    def __init__(self, collection: str | Path, qrels: str | Path | None = None, mode: str = "hybrid",
                 k: int = 10, cache_dir: str | Path | None = None, clip: float = 1.0):
        from .retrieval import BenchError, Retriever, load_collection

        if mode not in MODES:
            raise RetrievalRewardError(f"retrieval mode: {mode!r} is not one of {', '.join(MODES)}")
        try:
            col = load_collection(collection, qrels=qrels)
        except BenchError as e:
            raise RetrievalRewardError(str(e)) from None
        if not col.qrels:
            raise RetrievalRewardError(f"{qrels or collection}: no relevance judgments found")
        self.mode, self.k, self.clip = mode, k, clip
        self.raw_run, self.exp_run = MODES[mode]
        self.retriever = Retriever(col, dense=mode != "bm25", cache_dir=cache_dir)
        self.doc_ids = col.doc_ids
        self.judged: dict[str, dict[str, int]] = {}
        for qid, text in col.queries.items():
            if col.qrels.get(qid):
                self.judged.setdefault(_key(text), {}).update(col.qrels[qid])
        self._raw_score: dict[str, float] = {}
        self.__name__ = f"retrieval_{mode}_ndcg{k}_gain"

    def has_judgments(self, query: str) -> bool:
        return _key(query) in self.judged

    def _ndcg(self, ranked: list[int], judged: dict[str, int]) -> float:
        from .retrieval import ndcg_at

        return ndcg_at([self.doc_ids[d] for d in ranked], judged, self.k)

    def scores(self, query: str, completion: str) -> tuple[float, float] | None:
        """(raw nDCG, expanded nDCG) for one completion, or None when the query has no judgments."""
        from .retrieval import runs_for

        judged = self.judged.get(_key(query))
        if not judged:
            return None
        runs = runs_for(self.retriever, query, str(completion), which=(self.exp_run,))
        raw = self._raw_score.get(query)
        if raw is None:
            raw = self._raw_score[query] = self._ndcg(runs[self.raw_run], judged)
        return raw, self._ndcg(runs[self.exp_run], judged)

    def gain(self, query: str, completion: str) -> float | None:
        """nDCG@10 with the expansion minus without, clipped to [-clip, clip]; None for an unjudged query."""
        got = self.scores(query, completion)
        return None if got is None else max(-self.clip, min(self.clip, got[1] - got[0]))

    def __call__(self, completions: list, query: list[str] | None = None, **kwargs) -> list[float | None]:
        from .reward import _completion_text

        if query is None:
            raise ValueError("the retrieval reward needs the dataset's 'query' column")
        return [self.gain(q, _completion_text(c)) for q, c in zip(query, completions)]


class CombinedRetrievalReward:
    """Several collections' retrieval rewards as one TRL reward function: each query is scored by the first reward
    whose collection judges it (None when none does)."""

    def __init__(self, rewards: list[RetrievalReward]):
        self.rewards = rewards
        self.__name__ = rewards[0].__name__

    def has_judgments(self, query: str) -> bool:
        return any(r.has_judgments(query) for r in self.rewards)

    def gain(self, query: str, completion: str) -> float | None:
        for r in self.rewards:
            if r.has_judgments(query):
                return r.gain(query, completion)
        return None

    def __call__(self, completions: list, query: list[str] | None = None, **kwargs) -> list[float | None]:
        from .reward import _completion_text

        if query is None:
            raise ValueError("the retrieval reward needs the dataset's 'query' column")
        return [self.gain(q, _completion_text(c)) for q, c in zip(query, completions)]


def combined(rewards: list[RetrievalReward]):
    """One reward as it is; several as a CombinedRetrievalReward."""
    return rewards[0] if len(rewards) == 1 else CombinedRetrievalReward(rewards)
