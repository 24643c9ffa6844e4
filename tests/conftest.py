import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Installs (qmd_install) must never touch the developer's own ~/.local/share or ~/.config/qmd: folders per session.
if "QMD_UNSLOTH_TEST_HOME" not in os.environ:
    import tempfile as _tempfile

    os.environ["QMD_UNSLOTH_TEST_HOME"] = _home = _tempfile.mkdtemp(prefix="qmd-unsloth-test-")
    os.environ["XDG_DATA_HOME"], os.environ["XDG_CONFIG_HOME"] = f"{_home}/data", f"{_home}/config"

REPO = Path(__file__).resolve().parent.parent


def as_in_a_terminal() -> None:
    """preexec_fn for a child that a test interrupts with SIGINT: Ctrl-C's default action, as in a terminal.  A shell
    runs background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored, so a test suite started in
    the background (`bash .ci/run &`) would otherwise send a Ctrl-C its child never sees."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_module(*args, env=None, timeout=600):
    """Runs `python -m ...` as a user would; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, env=full_env,
                          timeout=timeout)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny offline Qwen3 model (built once per machine, cached)."""
    from qmd_unsloth.tiny import ensure

    return ensure()


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model, tmp_path_factory):
    """The tiny model exported to a verified Q4_K_M GGUF (once per test session); skipped without llama.cpp."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: bash scripts/install_llama_cpp.sh")
    from qmd_unsloth import config as C
    from qmd_unsloth.export import export
    from qmd_unsloth.llamacpp import DEFAULT_DIR, ToolsMissing, check

    try:
        check(DEFAULT_DIR)
    except ToolsMissing as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("gguf")
    export(C.load(C.ExportConfig, None, model=tiny_model, out=out))
    return out / "qmd-query-expansion-q4_k_m.gguf"
