"""qmd_install against the real QMD 2.8.3 (qmd_unsloth.qmd_real), each case in its own HOME: QMD runs OUR file after
the install, ``qmd pull --refresh`` leaves it alone, rollback gives the index back, a project's ``.qmd/index.yaml``
needs ``qmd trust``.  Which file QMD ran is read from the hook's capture of each chat prompt (``model_path``).

QMD's default embed and rerank models are ``hf:`` URIs: offline, ``qmd pull`` waits on them forever (measured: still
"Pulling models" after 90 s), so the pull cases point ``models.embed``/``rerank`` at local GGUF files first, as a user
without network would.  ``qmd query --no-rerank`` with no ``qmd embed`` loads neither of them.  QMD's contexts get one
CPU thread (a harness choice for 2-core machines; it changes speed, not tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qmd_unsloth.qmd_contract import kept_lines
from qmd_unsloth.qmd_real import QMDMissing, find
from tests.conftest import REPO

try:
    QMD = find()
except QMDMissing as e:  # pragma: no cover - CI installs it (python -m qmd_unsloth.qmd_real install)
    pytest.skip(str(e), allow_module_level=True)

VAULT = REPO / "tests" / "fixtures" / "vault"
QUERY = "pasta recipe"


class Home:
    """One user's HOME, as both QMD and our tools see it."""

    def __init__(self, root: Path):
        self.root = root
        self.index = root / ".config" / "qmd" / "index.yml"
        self.models = root / ".local" / "share" / "qmd_unsloth" / "models"
        self.cache = root / ".cache" / "qmd" / "models"
        self.captures = root / "captures.jsonl"

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QMD_", "XDG_"))}
        env.update(HOME=str(self.root), XDG_CONFIG_HOME=str(self.root / ".config"),
                   XDG_CACHE_HOME=str(self.root / ".cache"), XDG_DATA_HOME=str(self.root / ".local" / "share"),
                   PYTHONPATH=str(REPO))
        return env

    def install(self, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qmd_unsloth.qmd_install", *map(str, args)], capture_output=True,
                              text=True, env=self.env(), cwd=cwd or self.root, timeout=600)

    def qmd(self, *args, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return QMD.run([str(a) for a in args], home=self.root, cwd=cwd, threads=1, capture=self.captures,
                       check=check, timeout=300)

    def responses(self) -> list[str]:
        return [json.loads(l)["response"] for l in self.captures.read_text().splitlines() if l.strip()]

    def ran(self) -> list[str]:
        """The model files QMD's chat prompts ran on, in order (from the hook's captures)."""
        if not self.captures.is_file():
            return []
        return [json.loads(l)["model_path"] for l in self.captures.read_text().splitlines() if l.strip()]

    def local_models(self, tiny_gguf: Path, config: Path) -> None:
        """Points models.embed/rerank at local files (offline, QMD cannot fetch its hf: defaults), as a user would:
        the YAML rewritten whole, the way QMD writes it."""
        other = self.root / "other-models"
        other.mkdir(exist_ok=True)
        data = yaml.safe_load(config.read_text())
        for slot in ("embed", "rerank"):
            shutil.copy(tiny_gguf, other / f"{slot}.gguf")
            data["models"][slot] = str(other / f"{slot}.gguf")
        config.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture
def home(tmp_path):
    h = Home(tmp_path / "home")
    h.root.mkdir()
    shutil.copytree(VAULT, h.root / "vault")
    return h


def _expansion_tree(stderr: str) -> list[tuple[str, str]]:
    """The searches ``qmd query`` lists under "Expanding query..." (its tree on stderr, the raw query first)."""
    tree = [l[3:] for l in stderr.splitlines() if l.startswith(("├─ ", "└─ "))][1:]
    return [tuple(l.split(": ", 1)) for l in tree if ": " in l]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_install_query_pull_refresh_rollback_in_the_global_index(tiny_gguf, home):
    home.qmd("collection", "add", home.root / "vault", "--name", "vault")
    data = yaml.safe_load(home.index.read_text())
    assert set(data["models"]) == {"embed", "generate", "rerank"}  # QMD wrote all three keys on its first command
    home.local_models(tiny_gguf, home.index)
    before = home.index.read_bytes()

    r = home.install("--model", tiny_gguf)
    assert r.returncode == 0, r.stderr
    placed = next(home.models.glob("qmd-query-expansion-q4_k_m-*.gguf"))
    assert placed.read_bytes() == tiny_gguf.read_bytes() and not list(home.cache.glob("*.gguf"))
    assert yaml.safe_load(home.index.read_text())["models"]["generate"] == str(placed)
    assert "QMD_GENERATE_MODEL" not in r.stdout and "export " not in r.stdout

    shown = _expansion_tree(home.qmd("query", "--no-rerank", QUERY).stderr)
    assert home.ran() == [str(placed)]  # QMD expanded the query with OUR file
    # and what it searched is its parse of OUR model's answer (random weights: often its fallback lines)
    kept = kept_lines(QUERY, home.responses()[0])
    assert shown and all(any(k == kind and t.startswith(text.removesuffix("...")) for k, t in kept)
                         for kind, text in shown), (shown, kept)

    pulled = home.qmd("pull", "--refresh").stdout
    assert f"-> {placed}" in pulled and placed.is_file() and _sha(placed) == _sha(tiny_gguf)
    home.qmd("query", "--no-rerank", "weekly review")
    assert home.ran() == [str(placed)] * 2

    r = home.install("--check")
    assert r.returncode == 0 and f"models.generate = {placed}" in r.stdout
    r = home.install("--rollback")
    assert r.returncode == 0, r.stderr
    assert "restored exactly, byte for byte" in r.stdout
    assert home.index.read_bytes() == before and not placed.exists()


def test_rollback_after_qmd_rewrote_the_index_keeps_what_it_added(tiny_gguf, home):
    home.qmd("collection", "add", home.root / "vault", "--name", "vault")
    before = yaml.safe_load(home.index.read_text())
    assert home.install("--model", tiny_gguf).returncode == 0
    (home.root / "notes").mkdir()
    home.qmd("collection", "add", home.root / "notes", "--name", "notes")  # QMD rewrites the whole file
    r = home.install("--rollback")
    assert r.returncode == 0, r.stderr
    assert "QMD or the user rewrote it since the install" in r.stdout and "only models.generate set back" in r.stdout
    after = yaml.safe_load(home.index.read_text())
    assert after["models"] == before["models"] and set(after["collections"]) == {"vault", "notes"}


def test_without_an_index_one_is_created_and_rollback_removes_it(tiny_gguf, home):
    assert not home.index.exists()
    r = home.install("--model", tiny_gguf)
    assert r.returncode == 0, r.stderr
    assert "created" in r.stdout and "QMD adds its default embed and rerank" in r.stdout
    placed = next(home.models.glob("*.gguf"))
    home.qmd("collection", "add", home.root / "vault", "--name", "vault")  # QMD fills in the other models
    data = yaml.safe_load(home.index.read_text())
    assert data["models"]["generate"] == str(placed) and data["models"]["embed"].startswith("hf:")
    home.qmd("query", "--no-rerank", QUERY)
    assert home.ran() == [str(placed)]
    r = home.install("--rollback")
    assert r.returncode == 0, r.stderr
    assert "only models.generate removed" in r.stdout  # it kept the collection QMD added
    data = yaml.safe_load(home.index.read_text())
    assert "generate" not in data["models"] and "vault" in data["collections"] and not placed.exists()

    assert home.install("--model", tiny_gguf).returncode == 0
    home.qmd("status")  # QMD only fills in its defaults: rollback removes the file again
    home.index.unlink()
    assert home.install("--model", tiny_gguf).returncode == 0
    home.qmd("status")
    r = home.install("--rollback")
    assert "QMD only filled in its default models" in r.stdout and not home.index.exists()


def test_a_project_index_yaml_is_preferred_and_needs_qmd_trust(tiny_gguf, home):
    project = home.root / "vault"
    home.qmd("init", cwd=project)
    qmd_dir = project / ".qmd"
    os.replace(qmd_dir / "index.yml", qmd_dir / "index.yaml")
    (qmd_dir / "index.yml").write_text("collections: {}\n")  # QMD reads index.yaml when both exist; so do we
    home.qmd("collection", "add", ".", "--name", "proj", cwd=project)
    config = qmd_dir / "index.yaml"
    home.local_models(tiny_gguf, config)
    home.qmd("trust", cwd=project)
    before, decoy = config.read_bytes(), (qmd_dir / "index.yml").read_bytes()

    r = home.install("--model", tiny_gguf, "--project", project / "Recipes")  # found upward, as QMD does
    assert r.returncode == 0, r.stderr
    placed = next(home.models.glob("*.gguf"))
    assert yaml.safe_load(config.read_text())["models"]["generate"] == str(placed)
    assert f"approve the change with: cd {project} && qmd trust" in r.stdout
    assert (qmd_dir / "index.yml").read_bytes() == decoy and not home.index.exists()

    trusted = home.qmd("trust", cwd=project).stdout
    assert f"generate: {placed}" in trusted
    home.qmd("query", "--no-rerank", QUERY, cwd=project)
    assert home.ran() == [str(placed)]

    r = home.install("--rollback")
    assert r.returncode == 0, r.stderr
    assert config.read_bytes() == before and (qmd_dir / "index.yml").read_bytes() == decoy
    assert f"approve what it holds now with: cd {project} && qmd trust" in r.stdout  # its local embed/rerank


def test_qmd_pull_refresh_deletes_a_model_kept_in_its_own_cache(tiny_gguf, home):
    """Why our GGUFs live outside QMD's cache: pull deletes every file there whose name contains the model's."""
    home.qmd("collection", "add", home.root / "vault", "--name", "vault")
    home.local_models(tiny_gguf, home.index)
    home.cache.mkdir(parents=True, exist_ok=True)
    inside = home.cache / "qmd-query-expansion-q4_k_m-0123456789ab.gguf"
    shutil.copy(tiny_gguf, inside)
    data = yaml.safe_load(home.index.read_text())
    data["models"]["generate"] = str(inside)
    home.index.write_text(yaml.safe_dump(data))
    r = home.qmd("pull", "--refresh", check=False)
    assert not inside.exists() and r.returncode != 0  # deleted, then not found
    r = home.install("--model", tiny_gguf, "--models-dir", home.cache)
    assert r.returncode == 1 and "inside QMD's model cache" in r.stderr
    r = home.install("--check")
    assert r.returncode == 1 and f"points at {inside}, which is gone" in r.stderr


def test_rollback_refuses_to_point_qmd_at_a_model_that_is_gone(tiny_gguf, home):
    home.qmd("collection", "add", home.root / "vault", "--name", "vault")
    old = home.root / "old.gguf"
    shutil.copy(tiny_gguf, old)
    data = yaml.safe_load(home.index.read_text())
    data["models"]["generate"] = str(old)
    home.index.write_text(yaml.safe_dump(data))
    assert home.install("--model", tiny_gguf).returncode == 0
    old.unlink()
    r = home.install("--rollback")
    assert r.returncode == 1 and f"would point QMD at {old}, which is gone" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = home.install("--rollback", "--to-default")
    assert r.returncode == 0, r.stderr
    assert "generate" not in yaml.safe_load(home.index.read_text())["models"]
