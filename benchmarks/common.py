"""What every benchmark records with its numbers: the date and the machine, written as JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def write_results(path: Path, results: dict) -> None:
    """Results with today's date and the machine, as indented JSON at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": machine(), **results}, indent=2))
    print(f"wrote {path}")
