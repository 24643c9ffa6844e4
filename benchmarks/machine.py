"""Shared by the CPU benchmarks (not a benchmark itself): what machine a figure was measured on.

Every result file names its machine: CPU model and cores, the load average when the run started (the project's
machines are shared, so a figure taken at load 10 is not one taken at load 1), Python, and the GPU when one was used.
Result files are named ``<benchmark>-<tag>.json``: ``cpu`` for a CPU run, the GPU's short name otherwise.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(gpu: str | None = None, cores_used: int | None = None) -> dict:
    """The machine of a run: CPU model, cores (and how many the benchmark used), load average at start, Python."""
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_at_start": round(os.getloadavg()[0], 2),
           "python": platform.python_version(), "gpu": gpu}
    if cores_used is not None:
        out["cores_used"] = cores_used
    return out


def tag(gpu: str | None = None) -> str:
    """``cpu``, or a GPU's short name (``NVIDIA H100 80GB HBM3`` -> ``h100``, ``NVIDIA GeForce RTX 4090`` ->
    ``rtx4090``) for result file names."""
    if not gpu:
        return "cpu"
    m = re.search(r"\b([A-Z]+) ?(\d+[A-Za-z]*)\b", gpu.replace("NVIDIA", ""))
    return (m.group(1) + m.group(2) if m else re.sub(r"\W+", "-", gpu)).lower()
