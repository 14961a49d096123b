"""What every benchmark's results file needs: the machine it ran on, and JSON-safe values.

No jax here, so that ``bench_analysis.py`` can call it before importing jax."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine_info() -> dict:
    """CPU count, CPU model, RAM, platform, Python, and the git revision (flagged if src/ is modified)."""
    info = {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["nproc_available"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    for path, key, field in (("/proc/cpuinfo", "model name", "cpu"), ("/proc/meminfo", "MemTotal", "ram_gib")):
        try:
            with open(path) as f:
                for ln in f:
                    if ln.startswith(key):
                        v = ln.split(":", 1)[1].strip()
                        info[field] = round(int(v.split()[0]) / 2**20, 1) if field == "ram_gib" else v
                        break
        except OSError:
            pass
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True).stdout.strip()
        info["git"] = rev + (" (src/ modified)" if dirty else "")
    except OSError:
        pass
    return info


def json_safe(o):
    """``o`` with numpy arrays and scalars as plain Python values and non-finite floats as None."""
    import numpy as np

    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.ndarray):
        return json_safe(o.tolist())
    if isinstance(o, (np.floating, float)):
        v = float(o)
        return v if np.isfinite(v) else None
    if isinstance(o, (np.integer, np.bool_)):
        return o.item()
    return o
