"""Collapsed NUTS (the Gaussian block integrated out) against NUTS on the original and the offsets.

    python -m benchmarks.bench_collapsed --models eight_schools radon_mn tensor_small \\
        --chains 2 --warmup 300 --samples 300 [--gibbs]

Per model: NUTS on the original model and on ``autoreparam.reparameterize(model)`` (the
harness's ``run_nuts``: warm-up timed apart, sampling time from second runs of the sampling loop
loaded from the compilation cache, t(N draws) - t(2 draws)), collapsed NUTS (the harness's
``run_collapsed``: ``CollapsedPosterior`` on the block the analysis finds, timed the same way,
plus its z draws and deterministic sites, whose compile is measured apart on one draw) and, with
``--gibbs``, HMC-within-Gibbs (``run_gibbs``: NUTS on theta, exact z draws; timed the same way).
min-ESS is over every element of every latent site of the original model; gradients are the
leapfrog steps of the sampling phase (one collapsed gradient costs one run of the model, the sparse
assembly of H and a Cholesky of its Schur complement, or, where the sparse assembly does not
apply, D Hessian-vector products and a D x D Cholesky; and their backward pass).
Writes ``benchmarks/results/collapsed.md`` and ``collapsed.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import autoreparam
from autoreparam.collapsed import _find_block

from .harness import latent_sites, run_collapsed, run_gibbs, run_nuts, use_compilation_cache
from .machine import json_safe
from .models import HERE, MODELS

RESULTS = HERE / "results"


def from_harness(r: dict, chains: int, samples: int) -> dict:
    grads = r["mean_tree_size"] * chains * samples
    keep = ("min_ess", "min_ess_site", "max_rhat", "max_rhat_site", "divergences", "sampling_seconds",
            "warmup_seconds", "mean_tree_size", "load_after", "sampling_overhead_seconds", "setup_seconds",
            "complete_seconds", "complete_compile_seconds", "sampling_seconds_timed_on", "sampling_seconds_gross")
    out = {k: r[k] for k in keep if k in r}
    out.update(gradients=grads, min_ess_per_s=r["min_ess_per_s"], min_ess_per_1k_grads=1000 * r["min_ess"] / grads)
    return out


def run_model(name, chains, warmup, samples, gibbs, seed=0) -> dict:
    spec = MODELS[name]
    args, kwargs = spec.inputs("full")
    model = spec.module.model
    sites = list(latent_sites(model, args, kwargs))
    t0 = time.perf_counter()
    block = _find_block(model, args, kwargs, "bench_collapsed")  # one line and a stop when there is none
    summary = {"sites": [{"name": s.name, "shape": list(s.shape)} for s in block.sites], "size": block.size,
               "theta": list(block.theta), "exact": block.exact}
    out = {"name": name, "block": summary, "block_seconds": time.perf_counter() - t0, "methods": {}}
    print(f"{name}: block {block.names} (size {block.size}), theta {block.theta}", flush=True)
    methods = [
        ("NUTS original", lambda: from_harness(
            run_nuts(model, args, kwargs, chains, warmup, samples, seed, sites), chains, samples)),
        ("NUTS offsets", lambda: from_harness(
            run_nuts(autoreparam.reparameterize(model), args, kwargs, chains, warmup, samples, seed, sites),
            chains, samples)),
        ("collapsed NUTS", lambda: from_harness(
            run_collapsed(model, args, kwargs, block, chains, warmup, samples, seed, sites), chains, samples)),
    ]
    if gibbs:
        methods.append(("Gibbs", lambda: from_harness(
            run_gibbs(model, args, kwargs, block, chains, warmup, samples, seed, sites), chains, samples)))
    for label, run in methods:
        try:
            r = run()
        except Exception as exc:  # a failed method is reported, the others still run
            r = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        out["methods"][label] = r
        if "error" in r:
            print(f"{name}: {label}: ERROR {r['error']}", flush=True)
        else:
            print(f"{name}: {label}: min ESS {r['min_ess']:.0f} ({r['min_ess_site']}), {r['min_ess_per_s']:.1f}/s, "
                  f"{r['min_ess_per_1k_grads']:.1f}/1k grads, {r['divergences']} div, R-hat {r['max_rhat']:.3f}",
                  flush=True)
    return out


def markdown(results: list, command: str) -> str:
    lines = [f"`{command}`", "",
             "min-ESS over every element of every latent site of the original model; per second of "
             "sampling (compile excluded; collapsed adds the time of its z draws); gradients = leapfrog steps "
             "after warm-up.", "",
             "| model | block (size) | method | min ESS (site) | min-ESS/s | x orig /s | min-ESS/1k grads | "
             "divergences | max R-hat |", "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        orig = res["methods"].get("NUTS original", {})
        block = f"{', '.join(s['name'] for s in res['block']['sites'])} ({res['block']['size']})"
        for label, r in res["methods"].items():
            if "error" in r:
                lines.append(f"| {res['name']} | {block} | {label} | error: {r['error']} | | | | | |")
                continue
            ratio = r["min_ess_per_s"] / orig["min_ess_per_s"] if "min_ess_per_s" in orig else float("nan")
            lines.append(f"| {res['name']} | {block} | {label} | {r['min_ess']:.0f} ({r['min_ess_site']}) | "
                         f"{r['min_ess_per_s']:.1f} | x{ratio:.1f} | {r['min_ess_per_1k_grads']:.1f} | "
                         f"{r['divergences']} | {r['max_rhat']:.3f} ({r['max_rhat_site']}) |")
            block = ""
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["eight_schools", "radon_mn", "tensor_small"])
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--gibbs", action="store_true", help="also run HMC-within-Gibbs with exact z draws")
    a = p.parse_args(argv)
    use_compilation_cache()  # before the first compile (see harness._timed_mcmc)
    command = "python -m benchmarks.bench_collapsed " + " ".join(argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    results = []
    for name in a.models:  # written after every model, so an interrupted run keeps what it measured
        results.append(run_model(name, a.chains, a.warmup, a.samples, a.gibbs))
        (RESULTS / "collapsed.json").write_text(
            json.dumps(json_safe({"command": command, "results": results}), indent=1,
                       default=lambda o: np.asarray(o).tolist()))  # JAX scalars
        text = markdown(results, command)
        (RESULTS / "collapsed.md").write_text("# Collapsed NUTS\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
