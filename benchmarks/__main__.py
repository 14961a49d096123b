"""``python -m benchmarks [--quick] [--models ...] [--jobs N]``: run the harness and publish its results.
(``python -m benchmarks --cold-start`` runs the cold-start benchmark, ``benchmarks/cold_start.py``, instead.)

Run from the repository root. Writes ``benchmarks/results/harness.json`` (``harness_quick.json``
with ``--quick``), the plots ``benchmarks/plots/elbo_vs_steps.png`` and
``benchmarks/plots/sd_ratio_per_site.png`` (``*_quick.png``), and the markdown tables
(``benchmarks/results/harness.md`` / ``harness_quick.md``, also printed), which are pasted into
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse(argv):
    from .models import MODELS

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps, short NUTS (CI; < 2 min)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="MODEL",
                   help=f"models to run (default: all of {', '.join(MODELS)})")
    from .harness import METHODS

    p.add_argument("--methods", nargs="+", choices=METHODS, default=None, metavar="METHOD",
                   help=f"run only these methods (default: all of {', '.join(METHODS)}); the results go to the "
                        "*_subset files")
    p.add_argument("--reference-from", type=Path, default=None, metavar="JSON",
                   help="reuse the reference posteriors of a previous results file (e.g. "
                        "benchmarks/results/harness.json) instead of running the long NUTS references again")
    p.add_argument("--jobs", type=int, default=None,
                   help="models run in this many child processes at once (default: 2, or 1 on a 1-CPU "
                        "machine; 1 runs everything in this process). The methods of one model always share "
                        "a process, so their timings are comparable")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default benchmarks/results/harness[_quick][_subset].json)")
    p.add_argument("--plots", type=Path, default=None, help="plot directory (default benchmarks/plots)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument("--rebuild", action="store_true",
                   help="run nothing: rewrite the markdown and the plots from the existing results JSON")
    p.add_argument("--cold-start", action="store_true",
                   help="run only the cold-start benchmark (python -m benchmarks.cold_start, a few minutes): "
                        "CPU time of a cold 'autoreparam analyze' per example, and the per-gradient cost of "
                        "the reparameterized models")
    p.add_argument("--seeds", type=int, default=None,
                   help="VI seeds per method (default: 3 in full mode, 1 in quick mode); the config JSON records it")
    p.add_argument("--vi-models", nargs="+", choices=list(MODELS), default=None, metavar="MODEL",
                   help="fit the VI methods other than the hybrid only on these models (the others list them as "
                        "skipped; the hybrid and the MCMC methods run on every model). CI's quick run uses it: "
                        "those methods' harness code is the same for every model")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first VI seed (default 0): --first-seed 1 --seeds 1 runs seed 1 alone")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# Quick mode is dominated by XLA's CPU compile time: unoptimised code without the new fusion emitters
# compiles about twice as fast (measured on the tensor model). An unknown XLA flag aborts the
# process, so each set is tried in a child first; the children of --jobs inherit the environment.
QUICK_XLA_FLAGS = (["--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"],
                   ["--xla_backend_optimization_level=0"])


def quick_xla_flags() -> None:
    base = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in base:
        return
    for flags in QUICK_XLA_FLAGS:
        env = dict(os.environ, XLA_FLAGS=" ".join([base, *flags]).strip())
        probe = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; (jnp.zeros(2) + 1).block_until_ready()"],
                               env=env, capture_output=True)
        if probe.returncode == 0:
            os.environ["XLA_FLAGS"] = env["XLA_FLAGS"]
            return


# Rough relative costs, for splitting the models between --jobs workers (longest first).
COST = {"full": {"tensor_small": 7, "tensor_large": 16, "radon_mn": 1.5, "eight_schools": 1, "crossed_logistic": 4},
        "quick": {"tensor_small": 5, "tensor_large": 5, "radon_mn": 2, "eight_schools": 3, "crossed_logistic": 2}}


def partition(models, jobs, mode):
    """Models split into at most ``jobs`` groups of similar total cost; in quick mode the models of
    one example file share a group (and so a process and its compilation cache)."""
    from .models import MODELS

    units = {}
    for m in models:
        key = MODELS[m].example if mode == "quick" else m
        units.setdefault(key, []).append(m)
    cost = lambda unit: sum(COST[mode].get(m, 1) for m in unit)  # noqa: E731
    groups = [[] for _ in range(min(jobs, len(units)))]
    for unit in sorted(units.values(), key=cost, reverse=True):
        min(groups, key=lambda g: cost(g)).extend(unit)
    return [g for g in groups if g]


def main(argv=None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    if ns.cold_start:
        from .cold_start import main as cold_start

        return cold_start([])
    mode = "quick" if ns.quick else "full"
    if ns.jobs is None:
        ns.jobs = min(2, os.cpu_count() or 1)
    if ns.quick and not ns.worker and "jax" not in sys.modules:
        quick_xla_flags()
    from . import harness

    harness.use_compilation_cache()  # before the first compile (see harness._timed_mcmc)
    if ns.seeds is not None:
        if ns.seeds < 1:
            print(f"python -m benchmarks: --seeds {ns.seeds}: expected a positive integer", file=sys.stderr)
            return 2
        harness.CONFIGS[mode]["seeds"] = ns.seeds
    if ns.first_seed < 0:
        print(f"python -m benchmarks: --first-seed {ns.first_seed}: expected an integer >= 0", file=sys.stderr)
        return 2
    harness.CONFIGS[mode]["first_seed"] = ns.first_seed
    if ns.vi_models is not None:
        harness.CONFIGS[mode]["vi_models"] = tuple(ns.vi_models)
    reference = None
    if ns.reference_from is not None:
        if not ns.reference_from.is_file():
            print(f"python -m benchmarks: --reference-from {ns.reference_from}: no such file", file=sys.stderr)
            return 2
        reference = json.loads(ns.reference_from.read_text())
        reference["_path"] = str(ns.reference_from)
        missing = [m for m in ns.models if m not in reference.get("models", {})
                   or "reference_moments" not in reference["models"][m]]
        if missing or reference.get("mode") != mode:
            print(f"python -m benchmarks: --reference-from {ns.reference_from}: no {mode}-mode reference for "
                  f"{', '.join(missing) or 'these models'}", file=sys.stderr)
            return 2
    if ns.worker:
        harness.model_worker(ns.worker.split(","), mode, ns.worker_out, ns.methods, reference)
        return 0

    from .report import markdown, plots

    from .models import MODELS

    # Only a run of every model is "the" result: a subset goes to its own file, never over it.
    subset = set(ns.models) != set(MODELS) or ns.methods is not None or ns.vi_models is not None
    out = ns.out or HERE / "results" / f"harness{'_quick' if ns.quick else ''}{'_subset' if subset else ''}.json"
    if ns.rebuild:
        if not out.exists():
            print(f"python -m benchmarks: --rebuild: no results file {out}; run the benchmark first",
                  file=sys.stderr)
            return 2
        payload = json.loads(out.read_text())
        for m in payload["models"].values():  # the summaries again, with this version's definitions
            if "failed" not in m:
                harness.summarize(m)
        publish(payload, out, ns, markdown, plots)
        return 0

    t0 = time.perf_counter()
    machine = harness.machine_info()
    harness.log(f"{mode} run of {', '.join(ns.models)} on {machine.get('nproc')} CPUs ({machine.get('cpu')}), "
                f"{ns.jobs} job(s)")
    results = {}
    if ns.jobs <= 1:
        for name in ns.models:
            results[name] = harness.run_one(name, mode, ns.methods, reference)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ)
            if ns.quick and "JAX_COMPILATION_CACHE_DIR" not in env:
                # Quick mode runs both tensor models at the same tiny size in one worker, so the second
                # one finds its compiled programs in this run's (temporary) compilation cache.
                env.update(JAX_COMPILATION_CACHE_DIR=str(Path(tmp) / "jax_cache"),
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
            procs = []
            for i, group in enumerate(partition(ns.models, ns.jobs, mode)):
                path = Path(tmp) / f"worker{i}.json"
                cmd = [sys.executable, "-m", "benchmarks", "--worker", ",".join(group), "--worker-out", str(path)]
                if ns.seeds is not None:
                    cmd += ["--seeds", str(ns.seeds)]
                cmd += ["--first-seed", str(ns.first_seed)]
                cmd += ["--vi-models", *ns.vi_models] if ns.vi_models else []
                cmd += ["--quick"] if ns.quick else []
                cmd += ["--methods", *ns.methods] if ns.methods else []
                cmd += ["--reference-from", str(ns.reference_from)] if ns.reference_from else []
                harness.log(f"worker {i}: {', '.join(group)}")
                procs.append((group, subprocess.Popen(cmd, cwd=str(HERE.parent), env=env), path))
            for group, proc, path in procs:
                proc.wait()
                got = json.loads(path.read_text()) if path.exists() else {}
                for name in group:
                    results[name] = got.get(name) or {
                        "name": name, "failed": {"error": f"worker exited with {proc.returncode}", "where": None}}
    results = {name: results[name] for name in ns.models}
    machine["load_at_end"] = harness.load_avg()
    total = time.perf_counter() - t0
    payload = {
        "benchmark": "autoreparam against plain guides, VIP and NUTS (benchmarks/harness.py)",
        "command": " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": mode, "config": harness.CONFIGS[mode],
        "lr": harness.LR, "nat": harness.NAT, "methods": harness.METHOD_NOTES, "jobs": max(ns.jobs, 1),
        "methods_run": ns.methods,
        "machine": machine, "total_seconds": total, "cpu_seconds": harness.cpu_seconds(),
        "models": results,
    }
    payload = harness.json_safe(payload)
    publish(payload, out, ns, markdown, plots)
    harness.log(f"total {total:.0f} s")
    failed = [n for n, m in results.items() if "failed" in m]
    return 1 if failed else 0


def publish(payload, out, ns, markdown, plots) -> None:
    """Write the results JSON, its markdown tables (also printed) and the plots; after a complete full
    run with the default ``--out``, paste the tables into the READMEs.

    The JSON is written first, so that a bug in the formatting cannot lose a long run; ``--rebuild``
    then republishes it."""
    from .models import MODELS

    subset = set(payload["models"]) != set(MODELS) or payload.get("methods_run") is not None \
        or payload["config"].get("vi_models") is not None
    suffix = ("_quick" if payload["mode"] == "quick" else "") + ("_subset" if subset else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    text = markdown(payload)
    payload["report_markdown"] = text
    out.write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    if not ns.no_plots:
        pdir = ns.plots or HERE / "plots"
        pdir.mkdir(parents=True, exist_ok=True)
        for p in plots(payload, pdir, suffix):
            print(f"wrote {p}", file=sys.stderr)
    print(text)
    print(f"wrote {out}", file=sys.stderr)
    complete = all(name in payload["models"] and "failed" not in payload["models"][name] for name in MODELS) \
        and not subset
    if payload["mode"] == "full" and ns.out is None and complete:
        summary = text.split("### Summary\n\n", 1)[1].split("\n\n", 1)[0]
        for readme, block in ((HERE / "README.md", text.replace("### ", "#### ")),
                              (HERE.parent / "README.md", summary)):
            if paste(readme, block):
                print(f"updated {readme}", file=sys.stderr)


BEGIN, END = "<!-- harness results: begin (python -m benchmarks writes this) -->", "<!-- harness results: end -->"


def paste(path: Path, block: str) -> bool:
    """Replace what stands between the BEGIN and END markers of ``path`` with ``block``."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    if END not in rest:  # the end marker stands before the begin marker: leave the file alone
        return False
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{block.strip()}\n{END}{tail}")
    return True


if __name__ == "__main__":
    sys.exit(main())
