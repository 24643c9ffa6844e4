"""`python -m qmd_unsloth`: lists the stages, one line each."""

from __future__ import annotations

import ast
import sys
from importlib.util import find_spec
from pathlib import Path

# Pipeline order.  Each is run as `python -m qmd_unsloth.<stage> --help`.
STAGES = ("data", "generate", "reward", "sft", "grpo", "smoke", "export", "eval", "bench", "hub")


def describe(stage: str) -> str | None:
    """The first line of the stage module's docstring, read without importing it (no torch at start-up)."""
    spec = find_spec(f"qmd_unsloth.{stage}")
    if spec is None or not spec.origin:
        return None
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text()))
    return doc.strip().splitlines()[0] if doc else ""


def main(argv: list[str] | None = None) -> int:
    print("qmd_unsloth stages (python -m qmd_unsloth.<stage> --help):")
    for stage in STAGES:
        line = describe(stage)
        if line is not None:
            print(f"  {stage:<8} {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
