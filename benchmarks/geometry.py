"""``python -m benchmarks.geometry [--quick] [--models ...]``: NUTS on the geometry models.

For every model of ``benchmarks/geometry_models.py``: NUTS on the original, on
``autoreparam.reparameterize(model)`` (with the conditioning guard) and, where the guard changed
the plan, on the unguarded plan. Writes ``benchmarks/results/geometry[_quick][_subset].json`` and
``.md`` (never the harness's results).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    from .models import GEOMETRY_MODELS

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.geometry", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes and chains (a plumbing check)")
    p.add_argument("--models", nargs="+", choices=list(GEOMETRY_MODELS), default=list(GEOMETRY_MODELS))
    p.add_argument("--out", type=Path, default=None)
    ns = p.parse_args(argv)
    from . import harness

    mode = "quick" if ns.quick else "full"
    subset = set(ns.models) != set(GEOMETRY_MODELS)
    out = ns.out or HERE / "results" / f"geometry{'_quick' if ns.quick else ''}{'_subset' if subset else ''}.json"
    command = " ".join(["python -m benchmarks.geometry", *argv])
    results, t0 = {}, time.perf_counter()
    machine = harness.machine_info()
    for name in ns.models:
        results[name] = harness.run_geometry_model(name, mode)
    payload = harness.json_safe({"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "mode": mode, "machine": machine, "total_seconds": time.perf_counter() - t0,
                                 "models": results})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    text = harness.geometry_markdown(results, command)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
