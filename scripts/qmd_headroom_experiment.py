"""Can any expansion lift QMD's ranking on Cranfield's held-out queries, and which kind of line could?  Expansions
written by rule (no model) and by an oracle that reads the judged answer, scored under QMD's fusion.

    python scripts/qmd_headroom_experiment.py [--cranfield ../shared/ir/cranfield] [--max-heldout 40]
        [--out benchmarks/results/qmd_headroom-cpu.json]

The trained SmolLM2 arms of scripts/qmd_retrieval_experiment.py all ranked below the raw query (Cranfield -12% to
-30%).  This separates two explanations: QMD's fusion leaves no room for an expansion on this collection, or the
model's lines are not good enough.  Same held-out queries (seeded split, seeded sample of 40) and the same paired
comparison (wins/losses, bootstrap interval) as that experiment; every expansion goes through QMD's parsing, drop
rule, fallback and equal-to-query filter (``retrieval.searches_for``) and the QMD-faithful retriever (``retrieval.
Retriever``, QMD 2.8.3's hybridQuery with --no-rerank; tests/test_qmd_parity.py holds it to the real QMD).

Arms (terms: the query's words as QMD's drop rule splits them; "rarest": fewest Cranfield documents hold them):
* rule-based, usable by any model: ``lex`` of the query's 2 or 3 rarest terms (a short AND that FTS can match where
  the whole query, AND-ed, matches little), two such lines, and a ``vec`` line of the query's rarest terms;
* oracle (reads the best-judged document: an upper bound, not a method): a ``lex`` line of the rarest query term plus
  the document's two most distinctive words, a ``vec`` line of its title, a ``hyde`` line of its first 300
  characters, and all three together.  A line holding no query term is dropped by QMD, as it would be for a model;
* abstain: an expansion QMD keeps no line of (its fallback, a ``hyde`` line "Information about Q", is all it
  searches): what a model that declines to expand gets;
* near miss: a ``hyde`` line of the opening of the raw ranking's best document that is not judged relevant (what a
  fluent passage on the topic that is not the answer costs).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from qmd_retrieval_experiment import SPLIT_SEED, compare, heldout_queries, log, ndcg  # noqa: E402  (same split)
from qmd_unsloth.qmd_contract import query_terms  # noqa: E402

STOP = {"a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from", "has", "have", "how", "in",
        "is", "it", "of", "on", "or", "that", "the", "there", "these", "this", "to", "was", "what", "when", "which",
        "with", "any", "been", "being", "if", "into", "such", "than", "their", "they", "we", "were", "why", "will"}


def body(doc: str) -> tuple[str, str]:
    """(title, text) of a TREC document as bench writes it: ``# TITLE``, a blank line, the text."""
    first, _, rest = doc.partition("\n")
    return (first[2:].strip(), rest.strip()) if first.startswith("# ") else ("", doc.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cranfield", default=str(REPO.parent / "shared" / "ir" / "cranfield"))
    ap.add_argument("--max-heldout", type=int, default=40)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "qmd_headroom-cpu.json"))
    args = ap.parse_args()

    from qmd_unsloth.atomic import atomic_write_text
    from qmd_unsloth.retrieval import Retriever, load_collection, searches_for

    t0 = time.perf_counter()
    col = load_collection(args.cranfield)
    held = heldout_queries(col, args.max_heldout)
    df = Counter(w for d in col.docs for w in set(query_terms(d)))
    n_docs = len(col.docs)
    index = {d: i for i, d in enumerate(col.doc_ids)}

    def rarest(text: str, k: int) -> list[str]:
        terms = list(dict.fromkeys(w for w in query_terms(text) if w not in STOP and len(w) > 2))
        return sorted(terms, key=lambda w: (df.get(w, 0) or n_docs + 1, terms.index(w)))[:k]

    def best_doc(qid: str) -> str:
        judged = col.qrels[qid]
        return col.docs[index[max(judged, key=lambda d: (judged[d], -index.get(d, 0)))]]

    def distinctive(doc: str, k: int, skip: set[str]) -> list[str]:
        tf = Counter(w for w in query_terms(doc) if w not in STOP and len(w) > 2 and w not in skip)
        return [w for w, _ in sorted(tf.items(), key=lambda x: -x[1] * math.log(n_docs / (1 + df.get(x[0], 0))))[:k]]

    def near_miss(qid: str, text: str) -> str:
        """The raw ranking's best document that is not judged relevant: on topic, but not an answer."""
        judged = col.qrels[qid]
        return next(col.docs[d] for d in ret.rank(text, None).ids if col.doc_ids[d] not in judged)

    def arms(qid: str, text: str) -> dict[str, list[tuple[str, str]]]:
        r3 = rarest(text, 3)
        title, passage = body(best_doc(qid))
        oracle_lex = ("lex", " ".join(r3[:1] + distinctive(best_doc(qid), 2, set(query_terms(text)))))
        oracle_vec, oracle_hyde = ("vec", title), ("hyde", " ".join(passage[:300].split()))
        return {
            "rule: lex of 2 rarest query terms": [("lex", " ".join(r3[:2]))],
            "rule: lex of 3 rarest query terms": [("lex", " ".join(r3))],
            "rule: two lex lines of rarest pairs": [("lex", " ".join(r3[:2])), ("lex", " ".join(r3[1:3]))],
            "rule: vec of 3 rarest query terms": [("vec", " ".join(r3))],
            "oracle: lex (query term + answer's words)": [oracle_lex],
            "oracle: vec (answer's title)": [oracle_vec],
            "oracle: hyde (answer's opening)": [oracle_hyde],
            "oracle: all three": [oracle_hyde, oracle_lex, oracle_vec],
            "abstain: no line kept (QMD's fallback)": [("lex", "")],
            "near miss: hyde (opening of the best unjudged document)":
                [("hyde", " ".join(body(near_miss(qid, text))[1][:300].split()))],
        }

    log(f"Cranfield: {len(col.docs)} documents, {len(held)} held-out queries; indexing (FTS5 + MiniLM chunks)")
    ret = Retriever(col)
    raw = {q: [ndcg(col, ret.rank(t, None).ids, q)] for q, t in held.items()}
    per_arm: dict[str, dict[str, list[float]]] = {}
    kept: dict[str, int] = {}
    examples: dict[str, dict[str, list]] = {}
    for q, t in held.items():
        for name, lines in arms(q, t).items():
            searches = searches_for(t, [(k, v) for k, v in lines if v])  # nothing left: QMD's fallback
            per_arm.setdefault(name, {})[q] = [ndcg(col, ret.rank(t, searches).ids, q)]
            kept[name] = kept.get(name, 0) + len(searches)
            if len(examples.setdefault(name, {})) < 2:
                examples[name][t] = searches
    results = {name: {**compare(raw, scores), "searches_per_query": round(kept[name] / len(held), 2)}
               for name, scores in per_arm.items()}
    log("arm | nDCG@10 | vs raw | wins/losses/ties | 95% CI of the difference")
    for name, r in results.items():
        log(f"{name} | {r['ndcg@10']:.3f} | {r['relative']:+.1%} | {r['wins']}/{r['losses']}/{r['ties']} | "
            f"{r['ci95']}")
    out = {"benchmark": "qmd_headroom", "machine": platform.node() or "unknown", "device": "CPU",
           "date": time.strftime("%Y-%m-%d"), "collection": "cranfield", "documents": len(col.docs),
           "heldout_queries": len(held),
           "split": {"seed": SPLIT_SEED, "heldout": "1/3", "max_heldout": args.max_heldout},
           "retriever": "qmd_unsloth.retrieval (QMD 2.8.3 hybridQuery, --no-rerank, MiniLM-L6)",
           "raw_ndcg@10": round(sum(v[0] for v in raw.values()) / len(raw), 4), "arms": results,
           "examples": examples, "seconds": round(time.perf_counter() - t0, 1),
           "command": "python scripts/qmd_headroom_experiment.py"}
    atomic_write_text(args.out, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
