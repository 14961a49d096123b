"""The harness's hybrid fit of one model and seed, then its final draws plain and with pooled SIR of theta.

    python -m benchmarks.bench_hybrid_sir --model tensor_large --seed 1 --pool 2000 --draws 4000 --out FILE.json

The fit is the harness's (``HybridMethod``: ``AutoHybrid``, ``NaturalGradient``, ``HybridELBO(4)``, 2,000
steps in 40 compiled chunks with the same keys, so the same q(theta) for a seed), without its checkpoint
ELBOs and draws; the moments of the final draws are compared with the reference of ``--reference-from``
as the harness does. For the CG path, where the harness's checkpoint draws with resampling cost several
times the steps, this gives the end-of-run figures at a fraction of the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import SVI

import autoreparam
from autoreparam.fit import inputs_for_float64

from .harness import HYBRID_PARTICLES, HYBRID_STEPS, CONFIGS, TARGETS, DEFAULT_TARGET, compare, latent_sites, load_avg
from .machine import json_safe
from .models import MODELS


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tensor_large", choices=list(MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=autoreparam.hybrid.CG_THETA_POOL, help="proposals of theta in the pool")
    p.add_argument("--draws", type=int, default=CONFIGS["full"]["draws"])
    p.add_argument("--reference-from", default="benchmarks/results/harness.json")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    spec = MODELS[a.model]
    model = spec.module.model
    args, kwargs = spec.inputs("full")
    sites = latent_sites(model, args, kwargs)
    prev = json.load(open(a.reference_from))["models"][spec.name]
    ref = {s: {"mean": np.asarray(v["mean"], np.float64).reshape(sites[s]),
               "sd": np.asarray(v["sd"], np.float64).reshape(sites[s])} for s, v in prev["reference_moments"].items()}
    out = {"command": "python -m benchmarks.bench_hybrid_sir " + " ".join(argv or sys.argv[1:]),
           "model": a.model, "seed": a.seed, "pool": a.pool, "draws": a.draws, "load_at_start": load_avg()}
    n_ck = CONFIGS["full"]["checkpoints"]
    chunk = HYBRID_STEPS["full"] // n_ck
    with jax.enable_x64(True):
        args, kwargs = inputs_for_float64((tuple(args), dict(kwargs)))
        t, c = time.perf_counter(), cpu()
        guide = autoreparam.AutoHybrid(model)
        svi = SVI(model, guide, autoreparam.NaturalGradient(guide), autoreparam.HybridELBO(HYBRID_PARTICLES))
        state = svi.init(jax.random.PRNGKey(a.seed), *args, **kwargs)
        out["setup_seconds"], out["setup_cpu"] = time.perf_counter() - t, cpu() - c
        t, c = time.perf_counter(), cpu()
        out["exact_marginal"] = guide.exact_marginal
        out["marginal_setup_seconds"], out["marginal_setup_cpu"] = time.perf_counter() - t, cpu() - c
        out["precision_note"] = guide.conditional.precision_note

        def run_chunk(state, key):
            state, losses = jax.lax.scan(lambda st, _: svi.stable_update(st, *args, **kwargs), state, None,
                                         length=chunk)
            return state, losses, svi.get_params(state)

        def draws(pool):
            def fn(params, key):
                d, info = guide.sample_posterior(key, params, *args, sample_shape=(a.draws,), theta_pool=pool,
                                                 return_info=True, **kwargs)
                mom = {s: (jnp.mean(v, 0), jnp.std(v, 0)) for s, v in d.items() if s in sites}
                return mom, info.get("pool_ess", jnp.nan)
            return fn

        t, c = time.perf_counter(), cpu()
        key = jax.random.PRNGKey(0)
        params0 = svi.get_params(state)
        compiled_chunk = jax.jit(run_chunk).lower(state, key).compile()
        out["compile_seconds"], out["compile_cpu"] = time.perf_counter() - t, cpu() - c
        # The harness's key sequence: (key, k1, k2) per checkpoint, then one more split for its draws.
        key = jax.random.PRNGKey(10_000 + a.seed)
        t, c = time.perf_counter(), cpu()
        for _ in range(n_ck):
            key, k1, _k2 = jax.random.split(key, 3)
            state, losses, params = compiled_chunk(state, k1)
            jax.block_until_ready(params)
            key, _k = jax.random.split(key)
        out["svi_seconds"], out["svi_cpu"] = time.perf_counter() - t, cpu() - c
        out["load_after_svi"] = load_avg()
        for label, pool in (("sir", a.pool), ("plain", None)):
            t, c = time.perf_counter(), cpu()
            fn = jax.jit(draws(pool))
            mom, ess = fn(params, jax.random.PRNGKey(20_000 + a.seed))
            mom = {s: (np.asarray(m, np.float64), np.asarray(sd, np.float64)) for s, (m, sd) in mom.items()}
            summary = compare(mom, ref)
            lo, hi, err = TARGETS.get(a.model, DEFAULT_TARGET)
            s = summary["summary"]
            out[label] = {"seconds_with_compile": time.perf_counter() - t, "cpu_with_compile": cpu() - c,
                          "pool_ess": float(ess), "compare": summary,
                          "target_met": bool(lo <= s["sd_ratio_min_site"] and s["sd_ratio_max_site"] <= hi
                                             and s["mean_err_worst"] <= err)}
            print(f"{label}: worst sd ratio {s['sd_ratio_worst']:.3f} ({s['sd_ratio_worst_site']}), worst mean err "
                  f"{s['mean_err_worst']:.3f} ({s['mean_err_worst_site']}), pool ESS {float(ess):.0f}, "
                  f"{out[label]['seconds_with_compile']:.0f} s", flush=True)
    out["load_at_end"] = load_avg()
    with open(a.out, "w") as f:
        json.dump(json_safe(out), f, indent=1)


if __name__ == "__main__":
    main()
