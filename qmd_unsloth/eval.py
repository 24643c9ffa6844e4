"""Eval: reward scores of a model's expansions, sampled the way QMD runs the GGUF.

    python -m qmd_unsloth.eval --model runs/gguf/qmd-query-expansion-q4_k_m.gguf --out runs/eval [--samples 3]
        [--engine llama.cpp|qmd] [--threads N] [--greedy] [--compare OTHER] [--min-score 0.7]

``--engine llama.cpp`` (the default) generates with llama-cpp-python from QMD's exact context (qmd_contract: the
chat wrapper node-llama-cpp picks, its system prompt), under QMD's grammar, with the sampling QMD actually applies
(temperature 0.7, top-k 20, top-p 0.8, no min-p, no penalty) and QMD's 600-token cap.  ``--engine qmd`` runs the
real QMD's own expansion (``LlamaCpp.expandQuery`` of @tobilu/qmd 2.8.3, installed by ``python -m
qmd_unsloth.qmd_real install``) on the file, so the score is the score of what QMD will do with it.  A HF model
folder is generated with transformers (same temperature, top-k and top-p; no grammar).

Every completion records its tokens, whether it stopped by itself (end of turn before the cap: under QMD's grammar a
model can only stop after a newline) and the lines QMD keeps of it (its drop rule and fallback).  Writes
``report.json`` (per query, per category, per language, rating counts, mean, stopped-by-itself share, tokens per
expansion, lines QMD keeps, latency), ``report.md`` and ``report.png``.  ``--compare`` scores a second model on the
same queries side by side.  Exits 1 when the mean score is below ``--min-score``.

Per language: a query's language is the suffix of a ``# category: multilingual_xx`` header, else detected from the
query by the reward's rule (script, then function words), else English; every completion is scored in that
language, and the report gives the mean score and the share of expansion lines written in the query's language
(the reward's own line rule).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from .cli import UserError, command
from .config import EvalConfig



class EvalError(UserError, RuntimeError):
    """A user-facing eval problem (one line)."""


MULTILINGUAL_PREFIX = "multilingual_"


def query_language(category: str, query: str) -> str:
    """The language a query is scored and reported under: ``multilingual_xx`` headers name it, else detected."""
    from .reward import ISO_639_1, language_of

    tag = category[len(MULTILINGUAL_PREFIX):] if category.startswith(MULTILINGUAL_PREFIX) else None
    return language_of(query, tag if tag in ISO_639_1 else None)


def read_queries(path: Path) -> list[tuple[str, str]]:
    """(category, query) pairs; ``# category: NAME`` lines start a group."""
    if not Path(path).is_file():
        raise EvalError(f"{path}: queries file not found")
    out, cat = [], "(none)"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8") \
            from None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# category:"):
            cat = line.split(":", 1)[1].strip() or "(none)"
        elif line and not line.startswith("#"):
            out.append((cat, line))
    if not out:
        raise EvalError(f"{path}: no queries")
    return out


class GGUFGenerator:
    """llama.cpp generation of QMD's prompt with QMD's grammar, sampling, context and token cap."""

    def __init__(self, path: Path, cfg: EvalConfig):
        from llama_cpp import Llama, LlamaGrammar

        from .gguf_check import GGUFCheckError, check_header
        from .qmd_contract import CONTEXT_SIZE, GRAMMAR

        try:
            self.fmt = check_header(path)["chat_format"]  # the wrapper QMD's node-llama-cpp picks for this file
        except GGUFCheckError as e:
            raise EvalError(str(e)) from None
        try:
            self.llm = Llama(model_path=str(path), n_ctx=CONTEXT_SIZE, verbose=False, seed=cfg.seed)
        except ValueError as e:  # llama-cpp-python's one answer to a file llama.cpp refuses
            raise EvalError(f"{path}: llama.cpp cannot load this GGUF (corrupt, truncated, not a GGUF or an "
                            f"unsupported architecture); export it again with python -m qmd_unsloth.export") from e
        self.grammar = LlamaGrammar.from_string(GRAMMAR, verbose=False)
        self.cfg = cfg

    def __call__(self, query: str) -> dict:
        from .llamacpp import generate_capped

        cfg = self.cfg
        sampling = dict(temp=0.0) if cfg.greedy else dict(
            temp=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
            presence_penalty=cfg.presence_penalty, frequency_penalty=0.0, repeat_penalty=1.0)
        text, n, stopped = generate_capped(self.llm, self.fmt.prompt(query), cfg.max_new_tokens, grammar=self.grammar,
                                           **sampling)
        return {"completion": text, "tokens": n, "stopped": stopped}


class HFGenerator:
    def __init__(self, path: str, cfg: EvalConfig):
        import torch

        from .infer import load

        self.model, self.tok = load(path)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)  # sampling is reproducible for a given --seed

    def __call__(self, query: str) -> dict:
        from .infer import expand

        cfg = self.cfg
        text = expand(self.model, self.tok, [query], greedy=cfg.greedy, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)[0]
        stopped = bool(self.tok.eos_token) and text.endswith(self.tok.eos_token)
        return {"completion": text, "tokens": len(self.tok(text, add_special_tokens=False)["input_ids"]),
                "stopped": stopped}


def qmd_generations(path: Path, queries: list[str], cfg: EvalConfig) -> list[dict]:
    """The real QMD's own expansion of every query (one QMD process for all): the raw response, its tokens, why it
    stopped, and the lines QMD kept (``queryables``)."""
    import tempfile

    from .qmd_real import QMDFailed, QMDMissing, find

    try:
        qmd = find()
    except QMDMissing as e:
        raise EvalError(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="qmd-eval-home-") as home:
        try:
            rows = qmd.expand(path, queries, Path(home), threads=cfg.threads)
        except QMDFailed as e:
            raise EvalError(str(e)) from None
    out = []
    for row in rows:
        cap = row["capture"] or {}
        out.append({"completion": cap.get("response") or "", "tokens": cap.get("generated_tokens") or 0,
                    "stopped": cap.get("stop_reason") in ("eogToken", "stopGenerationTrigger"),
                    "stop_reason": cap.get("stop_reason"), "seconds": round(row["seconds"], 3),
                    "qmd_kept": [(q["type"], q["text"]) for q in row["queryables"]]})
    return out


def generations(model: str, queries: list[tuple[str, str]], cfg: EvalConfig) -> tuple[str, list[dict]]:
    """(kind, one generation per query and sample, in order): completion, tokens, stopped, seconds."""
    from tqdm import tqdm

    path = Path(model)
    samples = 1 if cfg.greedy else cfg.samples
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EvalError(f"{model}: GGUF file not found")
        if cfg.engine == "qmd":
            if cfg.greedy:
                raise EvalError("--engine qmd samples as QMD does (temperature 0.7, a clock seed): drop --greedy")
            print(f"eval: QMD's own expansion of {len(queries)} queries x {samples} on {path.name}", file=sys.stderr)
            return "qmd", qmd_generations(path, [q for _, q in queries for _ in range(samples)], cfg)
        gen, kind = GGUFGenerator(path, cfg), "gguf"
    else:
        if not (path / "config.json").is_file():
            raise EvalError(f"{model}: not a .gguf file or a HF model folder")
        if cfg.engine == "qmd":
            raise EvalError(f"{model}: --engine qmd runs a .gguf file (export it first: python -m qmd_unsloth.export)")
        gen, kind = HFGenerator(model, cfg), "hf"
    out = []
    for _, q in tqdm(queries, desc=f"eval {path.name}", unit="query"):
        for _ in range(samples):
            t0 = time.perf_counter()
            g = gen(q)
            out.append({**g, "seconds": round(time.perf_counter() - t0, 3)})
    return kind, out


def evaluate(model: str, queries: list[tuple[str, str]], cfg: EvalConfig) -> dict:
    from statistics import median

    from .qmd_contract import expanded_searches, fallback, kept
    from .reward import RATINGS, score_expansion

    kind, gens = generations(model, queries, cfg)
    samples = 1 if cfg.greedy else cfg.samples
    rows = []
    for (cat, q), i, g in zip([pair for pair in queries for _ in range(samples)], list(range(samples)) * len(queries),
                              gens):
        lang = query_language(cat, q)
        s = score_expansion(q, g["completion"], lang)
        lines = kept(q, g["completion"])
        searches = expanded_searches(q, g["completion"])
        row = {"query": q, "category": cat, "lang": lang, "sample": i, "completion": g["completion"],
               "score": round(s.score, 4), "rating": s.rating, "hard_failure": s.hard_failure, "reasons": s.reasons,
               "lines": s.lines_judged, "lines_in_language": s.lines_in_language, "seconds": g["seconds"],
               "tokens": g["tokens"], "stopped": g["stopped"], "kept_lines": len(lines), "searches": len(searches),
               "fallback": not lines}
        if "qmd_kept" in g:  # the real QMD's own kept lines: our mirror of its drop rule must agree
            row["stop_reason"] = g["stop_reason"]
            row["qmd_searches"] = g["qmd_kept"]
            row["drop_rule_agrees"] = g["qmd_kept"] == (lines or fallback(q))
        rows.append(row)
    n = len(rows)
    by_cat: dict[str, list[float]] = {}
    by_lang: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r["score"])
        by_lang.setdefault(r["lang"], []).append(r)
    ratings = Counter(r["rating"] for r in rows)
    tokens = [r["tokens"] for r in rows]
    report = {
        "model": str(model), "kind": kind, "engine": cfg.engine if kind != "hf" else "transformers",
        "decoding": "greedy" if cfg.greedy else
        {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
         "min_p": cfg.min_p if kind == "gguf" else None,
         "presence_penalty": cfg.presence_penalty if kind == "gguf" else None, "grammar": kind != "hf",
         "max_tokens": cfg.max_new_tokens if kind != "qmd" else 600},
        "queries": len(queries), "samples_per_query": samples, "completions": n,
        "mean_score": round(sum(r["score"] for r in rows) / n, 4),
        "format_valid": round(sum(1 for r in rows if r["hard_failure"] is None) / n, 4),
        "ratings": {name: ratings.get(name, 0) for _, name in RATINGS},
        "stopped_by_itself": round(sum(1 for r in rows if r["stopped"]) / n, 4),
        "tokens_per_query": round(sum(tokens) / n, 1),
        "tokens_median": median(tokens), "tokens_max": max(tokens),
        "kept_lines_per_query": round(sum(r["kept_lines"] for r in rows) / n, 2),
        "searches_per_query": round(sum(r["searches"] for r in rows) / n, 2),
        "fallback_share": round(sum(1 for r in rows if r["fallback"]) / n, 4),
        "categories": {c: round(sum(v) / len(v), 4) for c, v in sorted(by_cat.items())},
        "languages": {lang: language_figures(v) for lang, v in sorted(by_lang.items(), key=lambda kv: (-len(kv[1]), kv[0]))},
        "seconds_per_query": round(sum(r["seconds"] for r in rows) / n, 3),
        "rows": rows,
    }
    if kind == "qmd":
        report["drop_rule_agrees"] = round(sum(1 for r in rows if r["drop_rule_agrees"]) / n, 4)
    return report


def language_figures(rows: list[dict]) -> dict:
    """Queries, mean score and the share of expansion lines written in the query's language (None: no lines)."""
    lines = sum(r["lines"] for r in rows)
    return {"queries": len({r["query"] for r in rows}), "completions": len(rows),
            "mean_score": round(sum(r["score"] for r in rows) / len(rows), 4),
            "lines_in_language": round(sum(r["lines_in_language"] for r in rows) / lines, 4) if lines else None}


def markdown(reports: list[dict]) -> str:
    names = [Path(r["model"]).name for r in reports]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(reports)]

    def row(label, fmt):
        lines.append(f"| {label} | " + " | ".join(fmt(r) for r in reports) + " |")

    row("mean score", lambda r: f"{r['mean_score']:.3f}")
    row("format-valid", lambda r: f"{r['format_valid']:.1%}")
    for name in reports[0]["ratings"]:
        row(name, lambda r, name=name: str(r["ratings"][name]))
    row("completions", lambda r: str(r["completions"]))
    def opt(key, fmt):  # figures reports from before the QMD contract lack: "-"
        return lambda r: "-" if r.get(key) is None else fmt(r)

    row("stopped by itself", opt("stopped_by_itself", lambda r: f"{r['stopped_by_itself']:.1%}"))
    row("tokens / expansion (mean, median, max)", opt(
        "tokens_median", lambda r: f"{r['tokens_per_query']:.1f}, {r['tokens_median']:g}, {r['tokens_max']}"))
    row("lines QMD keeps / expansion", opt("kept_lines_per_query", lambda r: f"{r['kept_lines_per_query']:.2f}"))
    row("expansion searches QMD runs / query", opt("searches_per_query", lambda r: f"{r['searches_per_query']:.2f}"))
    row("QMD falls back to the raw query", opt("fallback_share", lambda r: f"{r['fallback_share']:.1%}"))
    row("seconds / query", lambda r: f"{r['seconds_per_query']:.3f}")
    for cat in reports[0]["categories"]:
        row(f"category {cat}", lambda r, cat=cat: f"{r['categories'].get(cat, 0):.3f}")

    def lang_cell(r, lang):
        f = r.get("languages", {}).get(lang)
        if not f:
            return "-"
        share = "-" if f["lines_in_language"] is None else f"{f['lines_in_language']:.0%}"
        return f"{f['mean_score']:.3f} ({share} in {lang})"

    for lang in reports[0].get("languages", {}):
        row(f"language {lang} ({reports[0]['languages'][lang]['queries']} queries)", lambda r, lang=lang: lang_cell(r, lang))
    return "\n".join(lines) + "\n"


def chart(reports: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(reports[0]["categories"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(reports)
    for i, r in enumerate(reports):
        ax.bar([x + i * width for x in range(len(cats))], [r["categories"].get(c, 0) for c in cats], width,
               label=f"{Path(r['model']).name} (mean {r['mean_score']:.3f})")
    ax.set_xticks([x + width * (len(reports) - 1) / 2 for x in range(len(cats))], cats, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean reward")
    ax.legend()
    fig.tight_layout()
    from .atomic import atomic_path

    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def run(cfg: EvalConfig) -> list[dict]:
    from .atomic import atomic_write_text

    if not cfg.model:
        raise EvalError("--model is required (a .gguf file or a HF model folder)")
    queries = read_queries(cfg.queries)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)  # an output folder that cannot be made fails now, not after generating
    reports = [evaluate(cfg.model, queries, cfg)]
    if cfg.compare:
        reports.append(evaluate(cfg.compare, queries, cfg))
    atomic_write_text(out / "report.json", json.dumps(reports[0] if len(reports) == 1 else
                                                      {"models": reports}, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(reports))
    chart(reports, out / "report.png")
    print(markdown(reports))
    print(f"eval: wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.png'}")
    return reports


@command("eval")
def main(argv: list[str] | None = None) -> int:
    from .config import parse_stage_args
    from .model import ModelLoadError

    cfg, _ = parse_stage_args("eval", __doc__, argv)
    try:
        reports = run(cfg)
    except (EvalError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if reports[0]["mean_score"] < cfg.min_score:
        print(f"eval: mean score {reports[0]['mean_score']:.3f} is below --min-score {cfg.min_score}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
