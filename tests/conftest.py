import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


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
