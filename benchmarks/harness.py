"""The benchmark harness: every method on every model, against a reference posterior.

    python -m benchmarks                 # full run (JSON, plots, markdown table)
    python -m benchmarks --quick         # tiny sizes, few steps, short NUTS: every code path in < 2 min
    python -m benchmarks --models radon_mn eight_schools

Per model (``benchmarks/models.py``) the methods are:

- VI, all with ``AutoNormal``-family guides, ``Trace_ELBO``, ``numpyro.optim.Adam(LR)`` and the
  same number of steps: AutoNormal, AutoLowRankMultivariateNormal and AutoMultivariateNormal
  on the original model; AutoNormal with NumPyro's ``LocScaleReparam(centered=None)`` on every
  latent loc-scale site (the VIP baseline of Gorinova et al. 2020); AutoNormal on
  ``autoreparam.reparameterize(model)`` with ``init="zero"`` and with ``init="analytic"``.
- NUTS on the original model and on ``autoreparam.reparameterize(model)`` (analytic init).

Every VI method runs once per seed; seeds are interleaved across methods (seed 0 of every
method, then seed 1, ...) so that a change in the machine's load hits all methods alike, and
the table shows medians over seeds. The SVI steps run in jitted chunks that are compiled ahead
of time, so the step timings exclude compilation (reported separately).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal
from numpyro.infer.reparam import LocScaleReparam

import autoreparam
from autoreparam.fit import inputs_for_float64
from autoreparam.hybrid import CG_THETA_POOL

from .machine import json_safe, machine_info as base_machine_info
from .models import MODELS, ModelSpec, load_reference

LR = 1e-2
NAT = 1.0  # "reached" = within this many nats of the best ELBO of the model, and staying there
# A run whose final ELBO estimate is not finite, or so noisy that its standard error exceeds this
# many nats, has diverged (a guide that blew up in float32): its ELBO and moments mean nothing.
DIVERGED_SE = 1000.0

CONFIGS = {
    "full": dict(seeds=3, checkpoints=40, ckpt_particles=256, final_particles=4096, draws=4000,
                 nuts_chains=4, nuts_warmup=500, nuts_samples=500,
                 ref_chains=4, ref_warmup=1000, ref_samples=2000,
                 jit_eval=True, nuts_split=True, ref_from_nuts_method=False, block_models=None, vi_models=None),
    # Quick mode exercises every code path at a size where compilation dominates, so it compiles
    # less: the ELBO and the posterior draws run eagerly (after the first model they are cheap),
    # NUTS warmup and sampling run in one call (one compile; ESS/s then includes the warmup), and
    # the reference of the synthetic models is the "NUTS" method's own run (a plumbing check only:
    # quick-mode numbers mean nothing).
    "quick": dict(seeds=1, checkpoints=4, ckpt_particles=16, final_particles=64, draws=200,
                  nuts_chains=2, nuts_warmup=30, nuts_samples=30,
                  ref_chains=2, ref_warmup=30, ref_samples=30,
                  jit_eval=False, nuts_split=False, ref_from_nuts_method=True,
                  # Collapsed NUTS and Gibbs compile for 5-25 s CPU per model: one model exercises them.
                  block_models=("eight_schools",),
                  # None: every model. ``--vi-models`` narrows it (CI): the VI methods but the hybrid are one class
                  # (VIMethod) whatever the model, and their compiles are 40% of a model's quick run.
                  vi_models=None),
}

VI_METHODS = ["AutoNormal", "AutoLowRankMVN", "AutoMVN", "VIP AutoNormal",
              "autoreparam zero", "autoreparam analytic", "hybrid"]
NUTS_METHODS = ["NUTS", "NUTS autoreparam", "NUTS collapsed", "Gibbs"]
BLOCK_METHODS = ("NUTS collapsed", "Gibbs")  # need the model's Gaussian block
METHODS = VI_METHODS + NUTS_METHODS
METHOD_NOTES = {
    "AutoNormal": "AutoNormal on the original model",
    "AutoLowRankMVN": "AutoLowRankMultivariateNormal (NumPyro's default rank) on the original model",
    "AutoMVN": "AutoMultivariateNormal on the original model",
    "VIP AutoNormal": "AutoNormal, LocScaleReparam(centered=None) on every latent loc-scale site (VIP)",
    "autoreparam zero": "AutoNormal on autoreparam.reparameterize(model, init='zero') (learned offsets from 0)",
    "autoreparam analytic": "AutoNormal on autoreparam.reparameterize(model) (init='analytic')",
    "hybrid": "autoreparam.AutoHybrid on the original model: q(theta) mean-field Gaussian, NaturalGradient "
              "(decaying_step_size(), 4 theta draws per step), the Gaussian block drawn from its conditional "
              "(float64); HybridELBO (Laplace blocks: 16 importance-weighted z draws per theta draw)",
    "NUTS": "NUTS on the original model",
    "NUTS autoreparam": "NUTS on autoreparam.reparameterize(model) (analytic xi)",
    "NUTS collapsed": "NUTS on theta with the Gaussian block integrated out (autoreparam.CollapsedPosterior, exact "
                      "blocks that autoreparam.choose_mcmc collapses), then one exact z draw per draw; the draws' "
                      "time is part of the sampling time",
    "Gibbs": "HMC-within-Gibbs (autoreparam.collapsed.gibbs_kernel): NUTS on theta given z, z drawn exactly given "
             "theta (exact blocks; float64)",
}
LOC_SCALE = (dist.Normal, dist.Cauchy, dist.Laplace, dist.Logistic, dist.StudentT, dist.Gumbel, dist.SoftLaplace)


def load_avg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_avg()}] {msg}", file=sys.stderr, flush=True)


def block(x):
    return jax.block_until_ready(x)


def machine_info() -> dict:
    info = base_machine_info()
    info.update(jax=jax.__version__, numpyro=numpyro.__version__, numpy=np.__version__, load_at_start=load_avg())
    return info


# The hybrid's budget: the targets are to be met within 2,000 steps; its value at each
# checkpoint is the hybrid ELBO where the conditional is dense (log det H by Cholesky) and otherwise the
# joint surrogate E[log p(y, z, theta) - log q(theta)], which is no ELBO and is left out of "best ELBO".
HYBRID_STEPS = {"full": 2000, "quick": 200}
HYBRID_PARTICLES = 4
HYBRID_BLOCK_DRAWS = None  # HybridELBO's default: 1 z draw per theta draw (exact blocks), LAPLACE_BLOCK_DRAWS (Laplace)
HYBRID_CKPT_DRAWS = {"full": 400, "quick": 50}
HYBRID_SIR = 4
# CG path with a sparse exact marginal: pooled SIR (``theta_pool``), one proposal per draw at the checkpoints
# (HYBRID_CKPT_DRAWS), and fit_hybrid's rule for the final draws (HYBRID_SIR per draw, at most CG_THETA_POOL).
# There a checkpoint's draws cost about 20 s of CPU on tensor_large (400 CG draws and 400 eliminations of the
# sparse H, 22 and 24 ms each), 2.5x its 50 SVI steps: the moments are drawn at every HYBRID_CG_CKPT_EVERY-th
# checkpoint only (and the last), and the targets are read at those.
HYBRID_CG_CKPT_EVERY = 4
TARGETS = {"crossed_logistic": (0.8, 1.2, 0.25)}  # model -> (sd ratio low, high, max mean err in ref sds)
DEFAULT_TARGET = (0.85, 1.15, 0.15)


# -- model variants ---------------------------------------------------------------------------
def _unwrap(fn):
    while isinstance(fn, (dist.ExpandedDistribution, dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def vip(model):
    """NumPyro's ``LocScaleReparam(centered=None)`` (learned centredness) on every latent loc-scale site."""
    def config(msg):
        if msg["type"] != "sample" or msg.get("is_observed") or msg["name"].endswith("_decentered"):
            return None
        return LocScaleReparam(centered=None) if isinstance(_unwrap(msg["fn"]), LOC_SCALE) else None
    return handlers.reparam(model, config=config)


def latent_sites(model, args, kwargs) -> dict:
    tr = handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs)
    return {n: tuple(s["value"].shape) for n, s in tr.items()
            if s["type"] == "sample" and not s["is_observed"]}


def vip_sites(model, args, kwargs) -> list:
    tr = handlers.trace(handlers.seed(vip(model), 0)).get_trace(*args, **kwargs)
    return [n[: -len("_centered")] for n, s in tr.items() if s["type"] == "param" and n.endswith("_centered")]


# -- NUTS ---------------------------------------------------------------------------------------
def run_nuts(model, args, kwargs, chains, warmup, samples, seed, sites, split=True):
    """Chains one after another; warmup (with the compile) and sampling are timed separately.

    With ``split=False`` one call does both (one compile instead of two): the sampling time then
    includes warmup and compilation, and the warmup time is reported as 0."""
    mcmc, timing = _timed_mcmc(NUTS(model), args, kwargs, chains, warmup, samples, seed, split)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    return mcmc_summary(mcmc.get_samples(group_by_chain=True), extra["num_steps"], extra["diverging"], sites,
                        timing, chains=chains, warmup=warmup, samples=samples, seed=seed, split=split)


# Sampling shorter than this (after tracing and loading are subtracted) is timed on a longer run.
MIN_TIMED_SECONDS = 1.0


def use_compilation_cache() -> None:
    """JAX's persistent compilation cache in a fresh directory, for every compile however short (``_timed_mcmc``
    relies on it). Call it before the first compile of the process: JAX decides once whether the cache is on."""
    import tempfile

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="autoreparam_bench_jax_cache_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _timed_mcmc(kernel, args, kwargs, chains, warmup, samples, seed, split, init_params=None, prefix=""):
    """An MCMC run of ``kernel``, chains one after another, and its timings (see ``run_nuts``)."""
    fields = (prefix + "diverging", prefix + "num_steps")
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=samples, num_chains=chains,
                chain_method="sequential", progress_bar=False)
    k_w, k_s = jax.random.split(jax.random.PRNGKey(seed))

    def timed_run(num_samples, init=None):
        mcmc.num_samples = num_samples
        t0 = time.perf_counter()
        mcmc.run(k_s, *args, **kwargs, extra_fields=fields, init_params=init)
        block(mcmc.get_samples())
        return time.perf_counter() - t0

    if not split:
        t_gross = timed_run(samples, init_params)
        return mcmc, {"warmup_seconds": 0.0, "sampling_seconds": t_gross, "sampling_seconds_gross": t_gross,
                      "sampling_overhead_seconds": 0.0}
    t0 = time.perf_counter()
    mcmc.warmup(k_w, *args, **kwargs, collect_warmup=False, init_params=init_params)
    block(mcmc.post_warmup_state)
    t_warm = time.perf_counter() - t0
    # NumPyro traces and compiles its sampling loop inside every `run` (a new closure each time: about
    # 1 s for eight schools, 10 s for collapsed NUTS, against 0.3 s of sampling). With the persistent
    # compilation cache (``use_compilation_cache``) a second run of the same length loads the compiled
    # loop, so each length runs once to compile and the sampling time is t(N draws) - t(2 draws), from
    # second runs from the same warmed-up state: tracing and loading cancel out, sampling is left. Each
    # length is timed twice and the faster kept: on a loaded machine tracing and loading (1-1.5 s for
    # collapsed NUTS on radon) vary by more than a second between two runs of the same length.
    timed_run(2)
    t_overhead = min(timed_run(2), timed_run(2))
    timed_run(samples)
    t_gross = min(timed_run(samples), timed_run(samples))
    timing = {"warmup_seconds": t_warm, "sampling_seconds_gross": t_gross, "sampling_overhead_seconds": t_overhead}
    # The difference must stand out of that noise: at least MIN_TIMED_SECONDS and at least the overhead.
    enough = max(MIN_TIMED_SECONDS, t_overhead)
    if t_gross - t_overhead < enough:
        # Below the noise of tracing and loading (eight schools: 0.03 s of sampling against 0.6 s):
        # time a longer run from the same state and scale it to ``samples`` draws. The draws and
        # their diagnostics stay those of the ``samples``-draw run, which is run again last.
        longer = samples * int(np.ceil(min(100.0, enough / max(t_gross - t_overhead, 0.01 * enough))))
        timed_run(longer)
        t_longer = min(timed_run(longer), timed_run(longer))
        timing["sampling_seconds_timed_on"] = longer
        t_samp = max(t_longer - t_overhead, 0.05 * t_longer) * samples / longer
        timed_run(samples)
    else:
        t_samp = t_gross - t_overhead
    return mcmc, {**timing, "sampling_seconds": t_samp}


def mcmc_summary(draws_by_chain, num_steps, diverging, sites, timing, **config) -> dict:
    """min-ESS (over every element of every site in ``sites``), R-hat, divergences and timings of one MCMC run."""
    draws = {s: np.asarray(draws_by_chain[s], dtype=np.float64) for s in sites}
    ess = {s: np.asarray(effective_sample_size(draws[s])).reshape(-1) for s in sites}
    rhat = {s: np.asarray(split_gelman_rubin(draws[s])).reshape(-1) for s in sites}
    ess_site = min(sites, key=lambda s: np.nanmin(ess[s]))
    rhat_site = max(sites, key=lambda s: np.nanmax(rhat[s]))
    min_ess = float(np.nanmin(ess[ess_site]))
    steps = np.asarray(num_steps)
    pooled = {s: v.reshape((-1,) + v.shape[2:]) for s, v in draws.items()}
    t_samp, t_gross, t_warm = timing["sampling_seconds"], timing["sampling_seconds_gross"], timing["warmup_seconds"]
    return {
        **{k: config[k] for k in ("chains", "warmup", "samples", "seed")}, "split_warmup": config["split"],
        **timing,
        "divergences": int(np.asarray(diverging).sum()),
        "mean_tree_size": float(steps.mean()), "max_tree_size": int(steps.max()),
        "min_ess": min_ess, "min_ess_site": ess_site,
        "min_ess_by_site": {s: float(np.nanmin(ess[s])) for s in sites},
        "max_rhat": float(np.nanmax(rhat[rhat_site])), "max_rhat_site": rhat_site,
        "min_ess_per_s": min_ess / t_samp,
        "min_ess_per_s_gross": min_ess / t_gross,
        "min_ess_per_s_incl_warmup": min_ess / (t_warm + t_gross),
        "load_after": load_avg(),
        "_moments": {s: (pooled[s].mean(0), pooled[s].std(0, ddof=1)) for s in sites},
    }


def run_collapsed(model, args, kwargs, block_, chains, warmup, samples, seed, sites, split=True):
    """Collapsed NUTS (``CollapsedPosterior``: NUTS on theta, the block integrated out), timed like ``run_nuts``,
    plus the exact z draws and deterministic sites (``complete``), whose time (the faster of two calls) is
    added to the sampling time (with ``split``, their compile is measured apart on one draw and left out)."""
    from autoreparam.collapsed import CollapsedPosterior

    t0 = time.perf_counter()
    post = CollapsedPosterior(model, block_, args, kwargs)
    t_setup = time.perf_counter() - t0
    k_init, k_z = jax.random.split(jax.random.PRNGKey(10_000 + seed))
    init = post.init_params(k_init, chains if chains > 1 else None)
    mcmc, timing = _timed_mcmc(NUTS(potential_fn=post.potential_fn), (), {}, chains, warmup, samples, seed, split,
                               init_params=init)
    theta = post.constrain(mcmc.get_samples(group_by_chain=True))
    t_compile = 0.0
    if split:
        t0 = time.perf_counter()
        block(post.complete(k_z, {k: v[:1, :1] for k, v in theta.items()}))
        t_compile = time.perf_counter() - t0
    t_complete = float("inf")
    for _ in range(2):  # the faster of two calls, as for the sampling loop (milliseconds, against load spikes)
        t0 = time.perf_counter()
        draws = block(post.complete(k_z, theta))
        t_complete = min(t_complete, time.perf_counter() - t0)
    timing = {**timing, "sampling_seconds": timing["sampling_seconds"] + t_complete,
              "sampling_seconds_gross": timing["sampling_seconds_gross"] + t_complete}
    extra = mcmc.get_extra_fields(group_by_chain=True)
    r = mcmc_summary(draws, extra["num_steps"], extra["diverging"], sites, timing, chains=chains, warmup=warmup,
                     samples=samples, seed=seed, split=split)
    r.update(setup_seconds=t_setup, complete_seconds=t_complete, complete_compile_seconds=t_compile,
             block_size=block_.size, theta=list(block_.theta))
    return r


def run_gibbs(model, args, kwargs, block_, chains, warmup, samples, seed, sites, split=True):
    """HMC-within-Gibbs (``autoreparam.collapsed.gibbs_kernel``: NUTS on theta given z, z drawn exactly given
    theta), timed like ``run_nuts``, in float64 throughout (the exact draws need float64 random bits)."""
    from autoreparam.collapsed import gibbs_kernel

    with jax.enable_x64(True):
        t0 = time.perf_counter()
        kernel, args, kwargs = gibbs_kernel(model, block_, args, kwargs)
        t_setup = time.perf_counter() - t0
        mcmc, timing = _timed_mcmc(kernel, args, kwargs, chains, warmup, samples, seed, split, prefix="hmc_state.")
        extra = mcmc.get_extra_fields(group_by_chain=True)
        r = mcmc_summary(mcmc.get_samples(group_by_chain=True), extra["hmc_state.num_steps"],
                         extra["hmc_state.diverging"], sites, timing, chains=chains, warmup=warmup, samples=samples,
                         seed=seed, split=split)
    r.update(setup_seconds=t_setup, block_size=block_.size, theta=list(block_.theta))
    return r


# -- comparison against the reference -----------------------------------------------------------
def compare(moments: dict, ref: dict) -> dict:
    """Per site: mean error |mean - ref mean| / ref sd and sd ratio sd / ref sd (median, min, max over
    the site's elements); summary: worst site and median over sites of the per-site medians."""
    sites = {}
    for s, r in ref.items():
        m, sd = (np.asarray(v, dtype=np.float64).reshape(np.shape(r["mean"])) for v in moments[s])
        err = np.ravel(np.abs(m - r["mean"]) / r["sd"])
        ratio = np.ravel(sd / r["sd"])
        sites[s] = {"size": int(err.size),
                    "mean_err": float(np.median(err)), "mean_err_max": float(err.max()),
                    "sd_ratio": float(np.median(ratio)), "sd_ratio_min": float(ratio.min()),
                    "sd_ratio_max": float(ratio.max())}
    worst_err = max(sites, key=lambda s: sites[s]["mean_err"])
    worst_sd = max(sites, key=lambda s: abs(np.log(sites[s]["sd_ratio"])))
    return {"sites": sites, "summary": {
        "mean_err_worst": sites[worst_err]["mean_err"], "mean_err_worst_site": worst_err,
        "mean_err_median": float(np.median([v["mean_err"] for v in sites.values()])),
        "sd_ratio_worst": sites[worst_sd]["sd_ratio"], "sd_ratio_worst_site": worst_sd,
        "sd_ratio_median": float(np.median([v["sd_ratio"] for v in sites.values()])),
        "sd_ratio_min_site": min(v["sd_ratio"] for v in sites.values()),
        "sd_ratio_max_site": max(v["sd_ratio"] for v in sites.values()),
        "mean_err_max_element": max(v["mean_err_max"] for v in sites.values()),
        "sd_ratio_min_element": min(v["sd_ratio_min"] for v in sites.values()),
        "sd_ratio_max_element": max(v["sd_ratio_max"] for v in sites.values()),
    }}


# -- VI -------------------------------------------------------------------------------------------
GUIDES = {"AutoNormal": AutoNormal, "AutoLowRankMVN": AutoLowRankMultivariateNormal,
          "AutoMVN": AutoMultivariateNormal, "VIP AutoNormal": AutoNormal,
          "autoreparam zero": AutoNormal, "autoreparam analytic": AutoNormal}


class VIMethod:
    """One guide on one model variant: chunked SVI, checkpoint ELBOs, final ELBO and moments.

    Full mode compiles three functions once (ahead of time, timed) and reuses them for every seed:
    a chunk of SVI steps (returning the constrained params), a P-particle ELBO and the posterior
    draws. Quick mode fuses all three into the chunk function (one compile per method; the final
    ELBO is then the last checkpoint's and the moments come from the last chunk).
    """

    def __init__(self, name, model, args, kwargs, sites, steps, cfg):
        self.name, self.model, self.sites, self.cfg = name, model, list(sites), cfg
        self.args, self.kwargs = args, kwargs
        self.guide = GUIDES[name](model)
        self.svi = SVI(model, self.guide, numpyro.optim.Adam(LR), Trace_ELBO())
        n_ck = cfg["checkpoints"]
        self.chunk = max(1, steps // n_ck)
        self.steps = self.chunk * n_ck
        self.fused = not cfg["jit_eval"]
        svi, chunk, fused = self.svi, self.chunk, self.fused
        elbo = Trace_ELBO()
        P, D = cfg["ckpt_particles"], cfg["draws"]
        guide = self.guide

        def elbo_particles(params, key):
            keys = jax.random.split(key, P)
            return -jax.vmap(lambda k: elbo.loss(k, params, model, guide, *args, **kwargs))(keys)

        def draws(params, key):
            pred = Predictive(model, guide=guide, params=params, num_samples=D, return_sites=self.sites,
                              parallel=True)
            out = pred(key, *args, **kwargs)
            return {s: (jnp.mean(out[s], 0), jnp.std(out[s], 0)) for s in self.sites}

        def run_chunk(state, key):
            def body(s, _):
                s, loss = svi.update(s, *args, **kwargs)
                return s, loss
            state, losses = jax.lax.scan(body, state, None, length=chunk)
            params = svi.get_params(state)
            if not fused:
                return state, losses, params, None, None
            k1, k2 = jax.random.split(key)
            return state, losses, params, elbo_particles(params, k1), draws(params, k2)

        t0 = time.perf_counter()
        self.state0 = state0 = self.svi.init(jax.random.PRNGKey(0), *args, **kwargs)  # = seed 0's start
        key = jax.random.PRNGKey(0)
        self.run_chunk = jax.jit(run_chunk).lower(state0, key).compile()
        if not fused:
            params0 = self.svi.get_params(state0)
            self.elbo_fn = jax.jit(elbo_particles).lower(params0, key).compile()
            self.draws_fn = jax.jit(draws).lower(params0, key).compile()
        self.compile_seconds = time.perf_counter() - t0

    def run(self, seed):
        cfg = self.cfg
        state = self.state0 if seed == 0 else self.svi.init(jax.random.PRNGKey(seed), *self.args, **self.kwargs)
        key = jax.random.PRNGKey(10_000 + seed)
        steps, t_run = 0, 0.0
        ckpts = []  # (step, seconds of SVI so far, ELBO mean, ELBO se)
        train = []  # mean training ELBO per chunk
        params = e = mom = None
        for _ in range(cfg["checkpoints"]):
            key, k = jax.random.split(key)
            t0 = time.perf_counter()
            state, losses, params, e, mom = self.run_chunk(state, k)
            block(params)
            t_run += time.perf_counter() - t0  # quick mode (fused): includes the evaluation
            steps += self.chunk
            if not self.fused:
                key, k = jax.random.split(key)
                e = self.elbo_fn(params, k)
            e = np.asarray(e, dtype=np.float64)
            ckpts.append((steps, t_run, *_mean_se(e)))
            train.append(-float(np.mean(np.asarray(losses))))
        if not self.fused:
            e, key = _final_elbo(self.elbo_fn, params, key, cfg)
            key, k = jax.random.split(key)
            mom = self.draws_fn(params, k)
        moments = _as_moments(mom)
        finite = bool(np.all(np.isfinite(e)))
        mean, se = _mean_se(e)
        diverged = not finite or not (se <= DIVERGED_SE or e.size == 1)
        return {"seed": seed, "steps": steps, "svi_seconds": t_run,
                "seconds_per_1000_steps": 1000 * t_run / steps,
                "elbo": mean, "elbo_se": se, "elbo_finite": finite, "diverged": diverged,
                "elbo_particles": int(e.size), "checkpoints": ckpts, "train_elbo": train,
                "load_after": load_avg(), "_moments": moments, "_params": params}


def _final_elbo(elbo_fn, params, key, cfg):
    """The final ELBO particles (``final_particles`` in batches of ``ckpt_particles``) and the next key."""
    es = []
    for _ in range(max(1, cfg["final_particles"] // cfg["ckpt_particles"])):
        key, k = jax.random.split(key)
        es.append(np.asarray(elbo_fn(params, k), dtype=np.float64))
    return np.concatenate(es), key


def _as_moments(mom: dict) -> dict:
    """``{site: (mean, sd)}`` as float64 numpy arrays."""
    return {s: (np.asarray(m, np.float64), np.asarray(sd, np.float64)) for s, (m, sd) in mom.items()}


def _mean_se(e):
    e = np.asarray(e, dtype=np.float64)
    if not np.all(np.isfinite(e)):
        return float("nan"), float("nan")
    return float(e.mean()), float(e.std(ddof=1) / np.sqrt(e.size)) if e.size > 1 else float("nan")


class HybridMethod:
    """``autoreparam.AutoHybrid`` with ``NaturalGradient`` and ``HybridELBO``, run like ``VIMethod`` (chunked,
    compiled ahead of time) but in float64 (the conditional's CG needs it; the other methods stay float32),
    for ``HYBRID_STEPS`` steps, with posterior moments at every checkpoint (``HYBRID_CKPT_DRAWS`` draws) so
    that the steps to the targets can be read off."""

    name = "hybrid"

    def __init__(self, model, args, kwargs, sites, mode, cfg):
        self.model, self.sites, self.cfg, self.mode = model, list(sites), cfg, mode
        n_ck = cfg["checkpoints"]
        self.chunk = max(1, HYBRID_STEPS[mode] // n_ck)
        self.steps = self.chunk * n_ck
        with jax.enable_x64(True):
            self.args, self.kwargs = args, kwargs = inputs_for_float64((tuple(args), dict(kwargs)))
            t0 = time.perf_counter()
            self.guide = guide = autoreparam.AutoHybrid(model)
            self.loss = loss = autoreparam.HybridELBO(HYBRID_PARTICLES, block_draws=HYBRID_BLOCK_DRAWS)
            self.svi = svi = SVI(model, guide, autoreparam.NaturalGradient(guide), loss)
            self.state0 = state0 = svi.init(jax.random.PRNGKey(0), *args, **kwargs)
            self.setup_seconds = time.perf_counter() - t0  # the analysis, the block and its conditional
            # self.exact: the ELBO is exact (and evaluated at checkpoints) where the block is factorised anyway;
            # self.resample: log p(y, theta) exists for resampling theta (on the CG path: the sparse precision).
            self.exact = bool(guide.conditional.dense)
            t0 = time.perf_counter()
            self.resample = guide.exact_marginal
            self.marginal_setup_seconds = time.perf_counter() - t0
            final_pool = None if self.exact or not self.resample else \
                min(HYBRID_SIR * cfg["draws"], CG_THETA_POOL)
            self.pools = {"checkpoint": None if self.exact or not self.resample else HYBRID_CKPT_DRAWS[mode],
                          "final": final_pool}
            chunk, P = self.chunk, cfg["ckpt_particles"]
            elbo = autoreparam.HybridELBO(1)

            # On the CG path a particle carries data-sized intermediates: batches of 16, not P lanes at once.
            particle_batch = None if guide.conditional.dense else 16

            def elbo_particles(params, key):
                keys = jax.random.split(key, P)
                return -jax.lax.map(lambda k: elbo.loss(k, params, model, guide, *args, **kwargs), keys,
                                    batch_size=particle_batch)

            def draws(num, resample=0, pool=None):
                batch = min(num, 100)

                def fn(params, key):
                    if pool is not None:  # one pool for all the draws (CG path): one call
                        out, info = guide.sample_posterior(key, params, *args, sample_shape=(num,), theta_pool=pool,
                                                           return_info=True, **kwargs)
                        out = {s: v for s, v in out.items() if s in self.sites}
                        return {s: (jnp.mean(v, 0), jnp.std(v, 0)) for s, v in out.items()}, info["pool_ess"]
                    keys = jax.random.split(key, num // batch)
                    out = jax.lax.map(lambda k: guide.sample_posterior(k, params, *args, sample_shape=(batch,),
                                                                       resample_theta=resample, **kwargs), keys)
                    out = {s: v.reshape((-1,) + v.shape[2:]) for s, v in out.items() if s in self.sites}
                    return {s: (jnp.mean(v, 0), jnp.std(v, 0)) for s, v in out.items()}, jnp.nan
                return fn

            def run_chunk(state, key):
                def body(st, _):
                    return svi.stable_update(st, *args, **kwargs)  # a non-finite step is skipped
                state, losses = jax.lax.scan(body, state, None, length=chunk)
                return state, losses, svi.get_params(state)

            t0 = time.perf_counter()
            key = jax.random.PRNGKey(0)
            params0 = svi.get_params(state0)
            self.run_chunk = jax.jit(run_chunk).lower(state0, key).compile()
            self.elbo_fn = jax.jit(elbo_particles).lower(params0, key).compile()
            # The hybrid's posterior is what fit_hybrid returns: theta resampled by p(y, theta) / q(theta)
            # (SIR, HYBRID_SIR proposals per draw) where log p(y, theta) exists, plain draws of q elsewhere;
            # the plain draws are measured too where they differ.
            sir = HYBRID_SIR if self.exact else 0
            self.ckpt_draws_fn = jax.jit(draws(HYBRID_CKPT_DRAWS[mode], sir, self.pools["checkpoint"])) \
                .lower(params0, key).compile()
            self.draws_fn = jax.jit(draws(cfg["draws"], sir, self.pools["final"])).lower(params0, key).compile()
            self.draws_plain_fn = jax.jit(draws(cfg["draws"])).lower(params0, key).compile() if self.resample else None
            self.compile_seconds = time.perf_counter() - t0

    def run(self, seed):
        cfg = self.cfg
        with jax.enable_x64(True):
            state = self.state0 if seed == 0 else self.svi.init(jax.random.PRNGKey(seed), *self.args, **self.kwargs)
            key = jax.random.PRNGKey(10_000 + seed)
            steps, t_run = 0, 0.0
            ckpts, train, ckpt_moments, ckpt_ess = [], [], [], []
            for _ in range(cfg["checkpoints"]):
                key, k1, k2 = jax.random.split(key, 3)
                t0 = time.perf_counter()
                state, losses, params = self.run_chunk(state, k1)
                block(params)
                t_run += time.perf_counter() - t0
                steps += self.chunk
                # On the CG path the loss is no ELBO (no log det H): nothing to evaluate at checkpoints.
                ckpts.append((steps, t_run, *(_mean_se(np.asarray(self.elbo_fn(params, k2), np.float64))
                                              if self.exact else (None, None))))
                train.append(-float(np.mean(np.asarray(losses))))
                key, k = jax.random.split(key)
                i = len(ckpts)
                if self.pools["checkpoint"] is None or i % HYBRID_CG_CKPT_EVERY == 0 or i == cfg["checkpoints"]:
                    mom, ess = self.ckpt_draws_fn(params, k)
                    ckpt_moments.append(_as_moments(mom))
                    ckpt_ess.append(float(ess))
                else:  # no draws here (CG path with resampling): target_reach skips it
                    ckpt_moments.append(None)
                    ckpt_ess.append(None)
            # On the CG path the value is the joint surrogate, no ELBO: one batch of particles is enough for it.
            e, key = _final_elbo(self.elbo_fn, params, key,
                                 cfg if self.exact else {**cfg, "final_particles": cfg["ckpt_particles"]})
            key, k = jax.random.split(key)
            t0 = time.perf_counter()
            mom, pool_ess = self.draws_fn(params, k)
            moments = _as_moments(mom)
            draw_seconds = time.perf_counter() - t0
            plain = None
            if self.draws_plain_fn is not None:
                key, k = jax.random.split(key)
                plain = _as_moments(self.draws_plain_fn(params, k)[0])
            # CG iterations per draw, at the median of q(theta) (0 on the dense path: a Cholesky, no CG).
            theta = {n: v for n, v in self.guide.median(params).items() if n in self.guide.theta_names}
            key, k = jax.random.split(key)
            _, info = self.guide.conditional.sample(k, theta, 8, return_info=True)
            cg = np.asarray(info["iterations"], dtype=np.float64)
        finite = bool(np.all(np.isfinite(e)))
        mean, se = _mean_se(e)
        return {"seed": seed, "steps": steps, "svi_seconds": t_run, "seconds_per_1000_steps": 1000 * t_run / steps,
                "elbo": mean if self.exact else None, "elbo_se": se if self.exact else None,
                "elbo_kind": "hybrid ELBO (exact log p(y, theta))" if self.exact else
                             "joint surrogate E[log p(y,z,theta) - log q(theta)] (no ELBO: CG path, no log det H)",
                "surrogate": None if self.exact else mean,
                "elbo_finite": finite, "diverged": not finite, "elbo_particles": int(e.size), "checkpoints": ckpts,
                "train_elbo": train, "load_after": load_avg(), "dense": bool(self.guide.conditional.dense), "laplace": not self.guide.block.exact,
                "block_size": int(self.guide.conditional.size), "theta": list(self.guide.theta_names),
                "block_draws": self.loss.draws_per_theta(self.guide),
                "cg_iterations_per_draw": float(cg.mean()), "cg_iterations_max": float(cg.max()),
                "mode_cg_iterations": float(np.asarray(info["mode_iterations"])),
                "_moments": moments, "_plain_moments": plain, "resample_theta": HYBRID_SIR if self.exact else 0,
                "theta_pool": self.pools["final"], "theta_pool_ess": float(pool_ess), "checkpoint_pool": self.pools["checkpoint"],
                "checkpoint_pool_ess": ckpt_ess, "final_draw_seconds": draw_seconds,
                "marginal_setup_seconds": self.marginal_setup_seconds,
                "_ckpt_moments": ckpt_moments, "_params": params}


def target_reach(name: str, run: dict, ref: dict) -> None:
    """Steps and seconds from which the worst-site sd ratio and mean error stay within the model's targets."""
    lo, hi, err = TARGETS.get(name, DEFAULT_TARGET)
    ok = []
    for mom in run.pop("_ckpt_moments"):
        if mom is None:  # a checkpoint without draws (HYBRID_CG_CKPT_EVERY): the targets are not read there
            ok.append(None)
            continue
        c = compare(mom, ref)["summary"]
        ok.append(lo <= c["sd_ratio_min_site"] and c["sd_ratio_max_site"] <= hi and c["mean_err_worst"] <= err)
    run["target"] = {"sd_ratio": [lo, hi], "mean_err": err}
    run["target_step"] = run["target_seconds"] = None
    for i, (step, secs, *_rest) in enumerate(run["checkpoints"]):
        if ok[i] and all(o is not False for o in ok[i:]):
            run["target_step"], run["target_seconds"] = step, secs
            break
    plain = run.pop("_plain_moments")
    if plain is not None:
        run["compare_plain"] = compare(plain, ref)
    c = run["compare"]["summary"]
    run["target_met_at_end"] = bool(lo <= c["sd_ratio_min_site"] and c["sd_ratio_max_site"] <= hi
                                    and c["mean_err_worst"] <= err)


def xi_summary(plan, params) -> list:
    """Learned xi per offset (mean over its elements), next to its initial value."""
    out = []
    for s in plan.sites:
        for off in s.offsets:
            init = np.asarray(off.init, dtype=np.float64)
            p = params.get(f"{s.name}_offset_{off.parent}") if params is not None else None
            learned = init if p is None else init + plan.xi_step * np.asarray(p, np.float64).ravel()
            out.append({"site": s.name, "parent": off.parent, "structure": off.structure,
                        "init_mean": float(init.mean()), "learned_mean": float(learned.mean()),
                        "learned_min": float(learned.min()), "learned_max": float(learned.max())})
    return out


# -- one model --------------------------------------------------------------------------------------
def run_model(spec: ModelSpec, mode: str, methods: list | None = None, reference: dict | None = None) -> dict:
    """Every method (or ``methods``) on one model. ``reference``: a results JSON (``--reference-from``)
    whose reference moments of this model are reused instead of running the NUTS reference again."""
    cfg = CONFIGS[mode]
    methods = METHODS if methods is None else [m for m in METHODS if m in methods]
    t_model = time.perf_counter()
    model = spec.module.model
    args, kwargs = spec.inputs(mode)
    sites = latent_sites(model, args, kwargs)
    n_obs = int(sum(np.size(v) for v in kwargs.values() if v is not None))
    log(f"{spec.name}: {spec.size(mode)}, {len(sites)} latent sites ({sum(int(np.prod(s)) for s in sites.values())} values)")
    out = {"name": spec.name, "description": spec.description, "size": spec.size(mode), "n_obs": n_obs,
           "latent_sites": {s: list(v) for s, v in sites.items()}, "reference_kind": spec.reference,
           "steps": None, "methods": {}, "errors": {}, "skipped": {}}

    # The analysis once, then both plans from the same report (what reparameterize(model, init=...) does);
    # skipped when no method of this run needs them (the hybrid runs its own analysis, inside its set-up).
    needs_plans = any(m in methods for m in ("autoreparam zero", "autoreparam analytic", "NUTS autoreparam")) \
        or (reference is None and spec.reference == "nuts" and spec.reference_model == "autoreparam")
    if needs_plans:
        t0 = time.perf_counter()
        report = autoreparam.analyze(model, *args, **kwargs)
        t_an = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan_an = report.make_plan(init="analytic")
        t_plan_an = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan_zero = report.make_plan(init="zero")
        t_plan_zero = time.perf_counter() - t0
        out["analysis"] = {"analyze_seconds": t_an, "plan_analytic_seconds": t_plan_an,
                           "plan_zero_seconds": t_plan_zero, "plan_analytic": str(plan_an),
                           "plan_zero": str(plan_zero), "pairs": len(report.additive()),
                           "funnels": [f.site for f in report.funnels]}
        log(f"{spec.name}: analysis {t_an:.1f} s, analytic plan {t_plan_an:.1f} s\n{plan_an}")
        variants = {"zero": autoreparam.reparameterize(model, plan_zero),
                    "analytic": autoreparam.reparameterize(model, plan_an)}
    else:
        t_an = t_plan_an = t_plan_zero = 0.0
        out["analysis"] = {"analyze_seconds": 0.0, "plan_analytic_seconds": 0.0, "plan_zero_seconds": 0.0,
                           "plan_analytic": "(no plan: no method of this run needs one)", "plan_zero": "",
                           "pairs": None, "funnels": []}
        variants = {}
    variants.update(original=model, vip=vip(model))
    out["vip_sites"] = vip_sites(model, args, kwargs)
    variant_of = {"AutoNormal": "original", "AutoLowRankMVN": "original", "AutoMVN": "original",
                  "VIP AutoNormal": "vip", "autoreparam zero": "zero", "autoreparam analytic": "analytic",
                  "NUTS": "original", "NUTS autoreparam": "analytic"}
    setup = {"autoreparam zero": t_an + t_plan_zero, "autoreparam analytic": t_an + t_plan_an,
             "NUTS autoreparam": t_an + t_plan_an}

    # Reference posterior.
    nuts_runs = {}
    on_reparam = spec.reference_model == "autoreparam"
    ref_kind = ("NUTS on autoreparam.reparameterize(model) (analytic xi; same posterior)" if on_reparam
                else "NUTS on the original model")
    if reference is not None:
        prev = reference["models"][spec.name]
        ref = {s: {"mean": np.asarray(v["mean"], np.float64).reshape(sites[s]),
                   "sd": np.asarray(v["sd"], np.float64).reshape(sites[s]), "mean_se": None}
               for s, v in prev["reference_moments"].items()}
        out["reference"] = {**prev["reference"], "kind": prev["reference"]["kind"]
                            + f" (reused from {reference.get('_path', 'a results file')}, {reference.get('created')})"}
    elif spec.reference == "nuts" and cfg["ref_from_nuts_method"]:
        meth = "NUTS autoreparam" if on_reparam else "NUTS"
        nuts_runs[meth] = _nuts_method(spec, meth, variants[variant_of[meth]], args, kwargs, cfg, sites, out)
        ref_run = nuts_runs[meth]
        ref = {s: {"mean": m, "sd": sd, "mean_se": None} for s, (m, sd) in ref_run["_moments"].items()}
        out["reference"] = {"kind": f"{ref_kind} (quick mode: the {meth} method's own run)", **_public(ref_run)}
    elif spec.reference == "nuts":
        log(f"{spec.name}: reference {ref_kind} ({cfg['ref_chains']} x {cfg['ref_samples']} after "
            f"{cfg['ref_warmup']})")
        ref_run = run_nuts(variants["analytic"] if on_reparam else model, args, kwargs, cfg["ref_chains"],
                           cfg["ref_warmup"], cfg["ref_samples"], seed=1000, sites=list(sites),
                           split=cfg["nuts_split"])
        ref = {s: {"mean": m, "sd": sd, "mean_se": sd / np.sqrt(max(ref_run["min_ess_by_site"][s], 1.0))}
               for s, (m, sd) in ref_run["_moments"].items()}
        out["reference"] = {"kind": ref_kind, **_public(ref_run)}
        log(f"{spec.name}: reference min ESS {ref_run['min_ess']:.0f} ({ref_run['min_ess_site']}), "
            f"max R-hat {ref_run['max_rhat']:.3f}, {ref_run['divergences']} divergences, "
            f"{ref_run['warmup_seconds'] + ref_run['sampling_seconds']:.0f} s")
    else:
        ref = load_reference(spec)
        missing = set(sites) - set(ref)
        assert not missing, f"{spec.name}: reference lacks {missing}"
        out["reference"] = {"kind": {"inference_gym": "inference_gym ground truth (CmdStan)",
                                     "posteriordb": "posteriordb reference draws (Stan)"}[spec.reference]}
    ref = {s: ref[s] for s in sites}
    out["reference_moments"] = {s: {"mean": np.ravel(r["mean"]).tolist(), "sd": np.ravel(r["sd"]).tolist()}
                                for s, r in ref.items()}

    # VI: compile every method, then seeds interleaved across methods.
    steps = spec.steps[mode]
    vi = {}
    for name in (m for m in VI_METHODS if m in methods):
        if name != "hybrid" and cfg["vi_models"] is not None and spec.name not in cfg["vi_models"]:
            out["skipped"][name] = f"this run fits it on {', '.join(cfg['vi_models'])} only (--vi-models)"
            continue
        try:
            if name == "hybrid":
                vi[name] = HybridMethod(model, args, kwargs, sites, mode, cfg)
                setup[name] = vi[name].setup_seconds
            else:
                vi[name] = VIMethod(name, variants[variant_of[name]], args, kwargs, sites, steps, cfg)
                out["steps"] = vi[name].steps
            log(f"{spec.name}: {name} compiled in {vi[name].compile_seconds:.1f} s")
        except Exception as exc:  # a method that cannot run is reported, not fatal
            out["errors"][name] = _error(exc)
            log(f"{spec.name}: {name} FAILED: {out['errors'][name]['error']}")
    runs = {name: [] for name in vi}
    first = cfg.get("first_seed", 0)
    for seed in range(first, first + cfg["seeds"]):
        for name, m in vi.items():
            try:
                r = m.run(seed)
                r["compare"] = compare(r.pop("_moments"), ref)
                if name == "hybrid":
                    target_reach(spec.name, r, ref)
                params = r.pop("_params")
                if name.startswith("autoreparam"):
                    r["xi"] = xi_summary(plan_an if name.endswith("analytic") else plan_zero, params)
                if name == "VIP AutoNormal":
                    r["centered"] = {s: float(np.mean(np.asarray(params[f"{s}_centered"])))
                                     for s in out["vip_sites"] if f"{s}_centered" in params}
                runs[name].append(r)
                log(f"{spec.name}: {name} seed {seed}: ELBO {_f(r['elbo'])} +- {_f(r['elbo_se'])}, "
                    f"{r['svi_seconds']:.1f} s, worst sd ratio {r['compare']['summary']['sd_ratio_worst']:.3f} "
                    f"({r['compare']['summary']['sd_ratio_worst_site']})")
            except Exception as exc:
                out["errors"][f"{name} seed {seed}"] = _error(exc)
                log(f"{spec.name}: {name} seed {seed} FAILED: {exc}")
    for name, m in vi.items():
        if runs[name]:
            out["methods"][name] = {"kind": "vi", "setup_seconds": setup.get(name, 0.0),
                                    "compile_seconds": m.compile_seconds, "chunk": m.chunk, "runs": runs[name]}

    # NUTS on both parameterizations, collapsed NUTS and Gibbs.
    choice = None
    for name in (m for m in NUTS_METHODS if m in methods):
        if name in BLOCK_METHODS:
            if choice is None:
                choice = autoreparam.choose_mcmc(model, *args, **kwargs)
                out["mcmc_choice"] = {"method": choice.method, "reason": choice.reason}
            r = _block_method(spec, name, choice, model, args, kwargs, cfg, sites, out)
        else:
            r = nuts_runs.get(name) or _nuts_method(spec, name, variants[variant_of[name]], args, kwargs, cfg, sites,
                                                    out)
        if r is None:
            continue
        r = dict(r)
        r["compare"] = compare(r.pop("_moments"), ref)
        out["methods"][name] = {"kind": "nuts", "setup_seconds": setup.get(name, 0.0), **r}

    summarize(out)
    out["seconds"] = time.perf_counter() - t_model
    log(f"{spec.name}: done in {out['seconds']:.0f} s")
    return out


def _f(x):
    return "-" if x is None else f"{x:.2f}"


def _logged_run(spec, name, out, detail, run):
    """``run()`` with its start and its min-ESS line logged; None (and an entry in errors) if it fails."""
    try:
        log(f"{spec.name}: {name} ({detail})")
        r = run()
        log(f"{spec.name}: {name}: min ESS {r['min_ess']:.0f} ({r['min_ess_site']}), "
            f"{r['min_ess_per_s']:.1f}/s, {r['divergences']} div, R-hat {r['max_rhat']:.3f}")
        return r
    except Exception as exc:
        out["errors"][name] = _error(exc)
        log(f"{spec.name}: {name} FAILED: {exc}")
        return None


def _nuts_method(spec, name, model, args, kwargs, cfg, sites, out):
    """One NUTS method (seed = its position in NUTS_METHODS); None (and an entry in errors) if it fails."""
    return _logged_run(spec, name, out, f"{cfg['nuts_chains']} x {cfg['nuts_samples']} after {cfg['nuts_warmup']}",
                       lambda: run_nuts(model, args, kwargs, cfg["nuts_chains"], cfg["nuts_warmup"],
                                        cfg["nuts_samples"], seed=NUTS_METHODS.index(name), sites=list(sites),
                                        split=cfg["nuts_split"]))


def _block_method(spec, name, choice, model, args, kwargs, cfg, sites, out):
    """Collapsed NUTS or Gibbs where the model's block allows it (else a reason in ``out["skipped"]``)."""
    block_ = choice.block
    if name == "NUTS collapsed" and choice.method != "collapsed":
        out["skipped"][name] = f"choose_mcmc picks NUTS on the offsets: {choice.reason}"
        return None
    if name == "Gibbs" and (block_ is None or not block_.exact):
        out["skipped"][name] = "needs an exact Gaussian block: " + choice.reason
        return None
    if cfg["block_models"] is not None and spec.name not in cfg["block_models"]:
        out["skipped"][name] = f"quick mode runs it on {', '.join(cfg['block_models'])} only"
        return None
    run = run_collapsed if name == "NUTS collapsed" else run_gibbs
    return _logged_run(spec, name, out, f"{cfg['nuts_chains']} x {cfg['nuts_samples']} after {cfg['nuts_warmup']}; "
                       f"block of {block_.size}",
                       lambda: run(model, args, kwargs, block_, cfg["nuts_chains"], cfg["nuts_warmup"],
                                   cfg["nuts_samples"], seed=NUTS_METHODS.index(name), sites=list(sites),
                                   split=cfg["nuts_split"]))


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


def _error(exc) -> dict:
    tb = traceback.extract_tb(exc.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(tb)
                  if "autoreparam" in f.filename and "benchmarks" not in f.filename), None)
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "where": where}


# -- summaries ------------------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def _median_or_none(xs):
    """Median over seeds with None (never reached) as +infinity; None if that median is infinite."""
    med = float(np.median([np.inf if x is None else x for x in xs]))
    return med if np.isfinite(med) else None


def summarize(out: dict) -> None:
    """Medians over seeds; the model's best ELBO; steps and seconds to within NAT of it.

    A diverged run counts as an ELBO of -infinity and as "never reached"; the moments summary
    is the median over the runs that did not diverge (None if every run diverged)."""
    vi = {k: v for k, v in out["methods"].items() if v["kind"] == "vi"}
    ok = lambda r: not r.get("diverged") and r["elbo"] is not None and np.isfinite(r["elbo"])  # noqa: E731
    # A hybrid run on the CG path reports no ELBO (no log det H): it has moments but takes no part in "best".
    no_elbo = lambda r: not r.get("diverged") and r["elbo"] is None and r.get("surrogate") is not None  # noqa: E731
    finals = {}
    for k, v in vi.items():
        if all(no_elbo(r) for r in v["runs"]):
            finals[k] = None
            continue
        med = float(np.median([r["elbo"] if ok(r) else -np.inf for r in v["runs"]]))
        finals[k] = med if np.isfinite(med) else None
    best = max((e for e in finals.values() if e is not None), default=None)
    out["best_elbo"] = best
    out["best_elbo_method"] = max((k for k in finals if finals[k] is not None), key=lambda k: finals[k],
                                  default=None)
    for name, v in vi.items():
        for r in v["runs"]:
            r["reach_step"], r["reach_seconds"] = None, None
            if best is None or not ok(r):
                continue
            # Reached = the first checkpoint from which the ELBO stays within NAT of the best to the
            # end: optimizer jitter (tens of nats on the large tensor model) must not count a lucky one.
            within = [e is not None and np.isfinite(e) and e >= best - NAT for _, _, e, _ in r["checkpoints"]]
            for i, (step, secs, _, _) in enumerate(r["checkpoints"]):
                if all(within[i:]):
                    r["reach_step"], r["reach_seconds"] = step, secs
                    break
        n = len(v["runs"])
        good = [r for r in v["runs"] if ok(r) or no_elbo(r)]
        reached = [r for r in v["runs"] if r["reach_step"] is not None]
        # The median over seeds, with "not reached" as +infinity.
        med_step = np.median([r["reach_step"] if r["reach_step"] is not None else np.inf for r in v["runs"]])
        med_secs = np.median([r["reach_seconds"] if r["reach_seconds"] is not None else np.inf for r in v["runs"]])
        S = lambda key: _median([r["compare"]["summary"][key] for r in good])  # noqa: E731
        mode = lambda xs: max(set(xs), key=xs.count) if xs else None  # noqa: E731
        v["summary"] = {
            "seeds": n, "diverged": n - len(good), "elbo": finals[name],
            "elbo_se": _median([r["elbo_se"] for r in good]),
            **({} if name != "hybrid" else {
                "target_step": _median_or_none([r["target_step"] for r in v["runs"]]),
                "target_seconds": _median_or_none([r["target_seconds"] for r in v["runs"]]),
                "target_met_at_end": sum(r["target_met_at_end"] for r in v["runs"]),
                "resample_theta": v["runs"][0].get("resample_theta", 0),
                "theta_pool": v["runs"][0].get("theta_pool"),
                "theta_pool_ess": [r.get("theta_pool_ess") for r in v["runs"]],
                **{f"plain_{key}": (_median([r["compare_plain"]["summary"][key] for r in good if r.get("compare_plain")])
                                    if not key.endswith("site") else
                                    next((r["compare_plain"]["summary"][key] for r in good if r.get("compare_plain")),
                                         None))
                   for key in ("sd_ratio_worst", "sd_ratio_worst_site", "mean_err_worst", "mean_err_worst_site")},
                "target": v["runs"][0]["target"],
                "cg_iterations_per_draw": _median([r["cg_iterations_per_draw"] for r in v["runs"]]),
                "dense": v["runs"][0]["dense"], "laplace": v["runs"][0].get("laplace"), "block_size": v["runs"][0]["block_size"],
                "theta": v["runs"][0]["theta"], "elbo_kind": v["runs"][0]["elbo_kind"],
                "surrogate": _median([r.get("surrogate") for r in v["runs"]])}),
            "elbo_min": min((r["elbo"] for r in good if r["elbo"] is not None), default=None),
            "elbo_max": max((r["elbo"] for r in good if r["elbo"] is not None), default=None),
            "gap_to_best": None if best is None or finals[name] is None else best - finals[name],
            "reached": len(reached), "reach_step": None if not np.isfinite(med_step) else float(med_step),
            "reach_seconds": None if not np.isfinite(med_secs) else float(med_secs),
            "seconds_per_1000_steps": _median([r["seconds_per_1000_steps"] for r in v["runs"]]),
            "svi_seconds": _median([r["svi_seconds"] for r in v["runs"]]),
            "mean_err_worst": S("mean_err_worst"),
            "mean_err_worst_site": mode([r["compare"]["summary"]["mean_err_worst_site"] for r in good]),
            "mean_err_median": S("mean_err_median"),
            "sd_ratio_worst": S("sd_ratio_worst"),
            "sd_ratio_worst_site": mode([r["compare"]["summary"]["sd_ratio_worst_site"] for r in good]),
            "sd_ratio_median": S("sd_ratio_median"),
            "sites": {s: {k: _median([r["compare"]["sites"][s][k] for r in good])
                          for k in ("mean_err", "mean_err_max", "sd_ratio", "sd_ratio_min", "sd_ratio_max")}
                      for s in v["runs"][0]["compare"]["sites"]},
        }
    # Ratios measured in this run (None where a side diverged).
    def diff(a, b):
        return None if a is None or b is None else a - b

    def quot(a, b):
        return None if a is None or not b else a / b

    ratios = {}
    an = vi.get("autoreparam analytic", {}).get("summary")
    for other in ("AutoNormal", "AutoMVN", "VIP AutoNormal"):
        o = vi.get(other, {}).get("summary")
        if an and o:
            ratios[f"elbo_gain_analytic_vs_{other.replace(' ', '_')}"] = diff(an["elbo"], o["elbo"])
    if an and "AutoNormal" in vi:
        ratios["worst_sd_ratio_analytic_over_AutoNormal"] = quot(an["sd_ratio_worst"],
                                                                 vi["AutoNormal"]["summary"]["sd_ratio_worst"])
    if an and "AutoMVN" in vi:
        ratios["step_time_AutoMVN_over_analytic"] = quot(vi["AutoMVN"]["summary"]["seconds_per_1000_steps"],
                                                         an["seconds_per_1000_steps"])
    nu, nr = out["methods"].get("NUTS"), out["methods"].get("NUTS autoreparam")
    nc = out["methods"].get("NUTS collapsed")
    if nu and nc:
        ratios["nuts_min_ess_per_s_collapsed_over_original"] = quot(nc["min_ess_per_s"], nu["min_ess_per_s"])
    if nu and nr:
        ratios["nuts_min_ess_per_s_reparam_over_original"] = quot(nr["min_ess_per_s"], nu["min_ess_per_s"])
        ratios["nuts_min_ess_per_s_incl_warmup_reparam_over_original"] = quot(
            nr["min_ess_per_s_incl_warmup"], nu["min_ess_per_s_incl_warmup"])
    out["ratios"] = ratios


def run_one(name: str, mode: str, methods: list | None = None, reference: dict | None = None) -> dict:
    """``run_model`` with a failure recorded instead of raised."""
    try:
        return json_safe(run_model(MODELS[name], mode, methods, reference))
    except Exception as exc:
        res = {"name": name, "failed": _error(exc), "traceback": traceback.format_exc()}
        log(f"{name}: FAILED\n{res['traceback']}")
        return res


def model_worker(names: list, mode: str, path: str, methods: list | None = None,
                 reference: dict | None = None) -> None:
    """Run models one after another and write {name: result} to ``path`` (for --jobs > 1)."""
    out = {}
    for name in names:
        out[name] = run_one(name, mode, methods, reference)
        Path(path).write_text(json.dumps(out))


def cpu_seconds() -> float:
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


# -- geometry models: NUTS on the original against NUTS on the plan (and the plan without the guard) ----
GEOMETRY_CONFIGS = {"full": dict(chains=2, warmup=500, samples=500), "quick": dict(chains=1, warmup=30, samples=30)}


def run_geometry_model(name: str, mode: str) -> dict:
    """NUTS on the original model, on ``reparameterize(model)`` (the guarded plan) and, where the guard
    changed the plan, on the unguarded plan; min-ESS per 1,000 gradient evaluations for each."""
    from .models import GEOMETRY_MODELS

    spec, cfg = GEOMETRY_MODELS[name], GEOMETRY_CONFIGS[mode]
    model = spec.model
    args, kwargs = spec.inputs(mode)
    sites = latent_sites(model, args, kwargs)
    t0 = time.perf_counter()
    report = autoreparam.analyze(model, *args, **kwargs)
    t_an = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = report.make_plan()
    t_plan = time.perf_counter() - t0
    unguarded = report.make_plan(guard=False)
    log(f"{name}: analysis {t_an:.1f} s, plan {t_plan:.1f} s\n{plan}")
    out = {"name": name, "description": spec.description, "config": cfg, "analyze_seconds": t_an,
           "plan_seconds": t_plan, "plan": str(plan), "plan_unguarded": str(unguarded),
           "guard_notes": list(plan.notes), "methods": {}}
    variants = [("NUTS", model), ("NUTS autoreparam", autoreparam.reparameterize(model, plan))]
    if unguarded != plan:
        variants.append(("NUTS autoreparam unguarded", autoreparam.reparameterize(model, unguarded)))
    for label, m in variants:
        r = run_nuts(m, args, kwargs, cfg["chains"], cfg["warmup"], cfg["samples"], seed=0, sites=list(sites),
                     split=mode == "full")
        grads = r["mean_tree_size"] * cfg["chains"] * cfg["samples"]
        r["min_ess_per_1k_grads"] = 1000 * r["min_ess"] / grads
        out["methods"][label] = _public(r)
        log(f"{name}: {label}: min ESS {r['min_ess']:.0f} ({r['min_ess_site']}), "
            f"{r['min_ess_per_1k_grads']:.2f} / 1k grads, {r['divergences']} div, R-hat {r['max_rhat']:.3f}")
    return json_safe(out)


def geometry_markdown(results: dict, command: str) -> str:
    rows = ["| model | plan (guarded) | variant | min-ESS (site) | min-ESS / 1k grads | divergences | max R-hat |",
            "|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        plan = m["plan"].split("\n", 1)[1].replace("\n", "<br>") if "\n" in m["plan"] else m["plan"]
        for label, r in m["methods"].items():
            rows.append(f"| {name} | {plan if label == 'NUTS' else ''} | {label} | {r['min_ess']:.0f} "
                        f"({r['min_ess_site']}) | {r['min_ess_per_1k_grads']:.2f} | {r['divergences']} | "
                        f"{r['max_rhat']:.3f} |")
    return f"Command: `{command}`\n\n" + "\n".join(rows)
