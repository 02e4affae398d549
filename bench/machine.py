"""What a timing depends on, recorded beside it: CPU model, cores, whether the CPU has bf16
instructions (AMX or AVX512-BF16), torch version, load.

Imported by the bench scripts that write JSON under ``data/bench/`` (run from the repository
root, ``bench/`` is on ``sys.path`` as the script's own folder).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess

import torch

from minigpt.train import cpu_has_bf16


def cpu_model() -> str:
    """The CPU's model name from ``lscpu`` (or ``platform.processor()`` without it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return platform.processor() or "unknown"


def machine() -> dict:
    """The machine a timing ran on, and how busy it was when it started."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "bf16_instructions": cpu_has_bf16(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def summary(values: list[float], digits: int = 4) -> dict:
    """Median and spread (min, max) of repeated measurements, with their count."""
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "n": len(values)}
