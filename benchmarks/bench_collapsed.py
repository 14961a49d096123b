"""Collapsed NUTS (the Gaussian block integrated out) against NUTS on the original and the offsets.

    python -m benchmarks.bench_collapsed --models eight_schools radon_mn tensor_small \\
        --chains 2 --warmup 300 --samples 300 [--gibbs]

Per model: NUTS on the original model and on ``autoreparam.reparameterize(model)`` (the
harness's ``run_nuts``: warm-up timed apart, the compile of the sampling loop measured by a
2-draw run and subtracted), collapsed NUTS (``CollapsedPosterior`` with the block the analysis
finds, timed the same way; the z draws and deterministic sites are added to its sampling time,
their compile measured apart on one draw) and, with ``--gibbs``, HMC-within-Gibbs (``gibbs_mcmc``: NUTS on theta,
exact z draws; wall time of warm-up plus sampling, compile included). min-ESS is over every
element of every latent site of the original model; gradients are the leapfrog steps of the
sampling phase (one collapsed gradient costs D Hessian-vector products and a D x D Cholesky).
Writes ``benchmarks/results/collapsed.md`` and ``collapsed.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS

import autoreparam
from autoreparam.collapsed import CollapsedPosterior, _find_block, gibbs_mcmc

from .harness import latent_sites, load_avg, run_nuts
from .machine import json_safe
from .models import HERE, MODELS

RESULTS = HERE / "results"


def diagnostics(samples_by_chain: dict, sites, seconds: float, gradients: float, divergences: int) -> dict:
    draws = {s: np.asarray(samples_by_chain[s], np.float64) for s in sites}
    ess = {s: np.asarray(effective_sample_size(draws[s])).reshape(-1) for s in sites}
    rhat = {s: np.asarray(split_gelman_rubin(draws[s])).reshape(-1) for s in sites}
    ess_site = min(sites, key=lambda s: np.nanmin(ess[s]))
    rhat_site = max(sites, key=lambda s: np.nanmax(rhat[s]))
    min_ess = float(np.nanmin(ess[ess_site]))
    return {"min_ess": min_ess, "min_ess_site": ess_site, "max_rhat": float(np.nanmax(rhat[rhat_site])),
            "max_rhat_site": rhat_site, "divergences": int(divergences), "sampling_seconds": seconds,
            "gradients": float(gradients), "min_ess_per_s": min_ess / seconds,
            "min_ess_per_1k_grads": 1000 * min_ess / gradients}


def run_collapsed(model, args, kwargs, block, chains, warmup, samples, seed, sites) -> dict:
    t0 = time.perf_counter()
    post = CollapsedPosterior(model, block, args, kwargs)
    t_setup = time.perf_counter() - t0
    mcmc = MCMC(NUTS(potential_fn=post.potential_fn), num_warmup=warmup, num_samples=samples,
                num_chains=chains, chain_method="sequential", progress_bar=False)
    k_init, k_w, k_s, k_z = jax.random.split(jax.random.PRNGKey(seed), 4)
    init = post.init_params(k_init, chains if chains > 1 else None)
    t0 = time.perf_counter()
    mcmc.warmup(k_w, init_params=init, collect_warmup=False)
    jax.block_until_ready(mcmc.post_warmup_state)
    t_warm = time.perf_counter() - t0
    mcmc.num_samples = 2
    t0 = time.perf_counter()
    mcmc.run(k_s, extra_fields=("diverging", "num_steps"))
    jax.block_until_ready(mcmc.get_samples())
    t_overhead = time.perf_counter() - t0
    mcmc.num_samples = samples
    t0 = time.perf_counter()
    mcmc.run(k_s, extra_fields=("diverging", "num_steps"))
    jax.block_until_ready(mcmc.get_samples())
    t_gross = time.perf_counter() - t0
    t_samp = max(t_gross - t_overhead, 0.05 * t_gross)
    theta = post.constrain(mcmc.get_samples(group_by_chain=True))
    t0 = time.perf_counter()  # the compile of the draws, apart (like the sampling loop's above)
    jax.block_until_ready(post.complete(k_z, {k: v[:1, :1] for k, v in theta.items()}))
    t_complete_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    draws = post.complete(k_z, theta)
    jax.block_until_ready(draws)
    t_complete = time.perf_counter() - t0
    extra = mcmc.get_extra_fields()
    r = diagnostics(draws, sites, t_samp + t_complete, np.sum(extra["num_steps"]), np.sum(extra["diverging"]))
    r.update(setup_seconds=t_setup, warmup_seconds=t_warm, complete_seconds=t_complete,
             complete_compile_seconds=t_complete_compile, sampling_overhead_seconds=t_overhead,
             mean_tree_size=float(np.mean(extra["num_steps"])), load_after=load_avg())
    return r


def run_gibbs(model, args, kwargs, block, chains, warmup, samples, seed, sites) -> dict:
    result = gibbs_mcmc(model, *args, block=block, num_warmup=warmup, num_samples=samples, num_chains=chains,
                        rng_key=seed, progress_bar=False, **kwargs)
    r = diagnostics(result.get_samples(group_by_chain=True), sites, result.seconds, result.num_gradients,
                    result.divergences)
    r.update(note="wall time of warm-up + sampling, compile included", load_after=load_avg())
    return r


def from_harness(r: dict, chains: int, samples: int) -> dict:
    grads = r["mean_tree_size"] * chains * samples
    keep = ("min_ess", "min_ess_site", "max_rhat", "max_rhat_site", "divergences", "sampling_seconds",
            "warmup_seconds", "mean_tree_size", "load_after")
    out = {k: r[k] for k in keep}
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
        ("collapsed NUTS", lambda: run_collapsed(model, args, kwargs, block, chains, warmup, samples, seed, sites)),
    ]
    if gibbs:
        methods.append(("Gibbs", lambda: run_gibbs(model, args, kwargs, block, chains, warmup, samples, seed,
                                                   sites)))
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
             "sampling (compile excluded; collapsed adds the time of its z draws; "
             "Gibbs is wall time incl. warm-up and compile); gradients = leapfrog steps after warm-up.", "",
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
