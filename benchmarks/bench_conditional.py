"""Benchmark: where the matrix-free CG path of ``BlockConditional`` beats the dense Cholesky path.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_conditional.py [--model crossed|tensor] [--sizes 4,9,...]

Models: ``crossed``, y_ijr ~ Normal(mu + a_i + b_j + C_ij, sigma), I = J, two observations per
cell, D = 1 + I + J + I*J, N = 2 I J; and ``tensor``, ``examples/tensor_model.py`` (random-walk
rows, informative data: the ill-conditioned case, more CG iterations) with I = J, T = 10,
D = 1 + 2I + T + 2IT + I^2, N = 10 I^2. For each size, after compiling, the CPU time
(user + system, ``resource.getrusage``; all threads of the process) of one jitted call of
``cond.sample(key, theta)`` (the mean solve plus one perturbation-optimisation draw) per path,
averaged over at least ``--repeats`` calls and one CPU second, and the CG iterations of the mean
and of the draw.
CPU time is used because the machine is shared: wall time would count other processes.

Prints a markdown table; ``DENSE_BELOW`` in ``src/autoreparam/conditional.py`` is set from it.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist

import sys
from pathlib import Path

from autoreparam.block import BlockLikelihood, BlockSite, GaussianBlock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import tensor_model  # noqa: E402
from autoreparam.conditional import BlockConditional


def model(ii, jj, y, I, J):
    s_a = numpyro.sample("s_a", dist.HalfNormal(1.0))
    s_b = numpyro.sample("s_b", dist.HalfNormal(1.0))
    s_C = numpyro.sample("s_C", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("i", I):
        a = numpyro.sample("a", dist.Normal(0.0, s_a))
    with numpyro.plate("j", J):
        b = numpyro.sample("b", dist.Normal(0.0, s_b))
    with numpyro.plate("ij", I * J):
        C = numpyro.sample("C", dist.Normal(0.0, s_C))
    with numpyro.plate("n", len(y)):
        numpyro.sample("y", dist.Normal(mu + a[ii] + b[jj] + C[ii * J + jj], sigma), obs=y)


def tensor_problem(n, T=10):
    block = GaussianBlock(
        (BlockSite("mu", (), "Normal"), BlockSite("z", (T,), "GaussianRandomWalk"),
         BlockSite("a", (n, 1), "Normal"), BlockSite("A", (n, 1, T), "GaussianRandomWalk"),
         BlockSite("b", (n,), "Normal"), BlockSite("B", (n, T), "GaussianRandomWalk"),
         BlockSite("C", (n, n), "Normal")),
        (BlockLikelihood("y", "Normal", "identity"),),
        ("sigma_a", "sigma_b", "sigma_C", "step_z", "step_A", "step_B", "sigma"),
    )
    return tensor_model.model, (n, n, T), {"y": tensor_model.simulate(n, n, T)}, block


TENSOR_THETA = {"sigma_a": 1.0, "sigma_b": 1.0, "sigma_C": 0.5, "step_z": 0.3, "step_A": 0.3, "step_B": 0.3,
                "sigma": 0.1}
CROSSED_THETA = {"s_a": 1.0, "s_b": 1.0, "s_C": 0.5, "sigma": 0.3}


def crossed_problem(n):
    rng = np.random.default_rng(n)
    ii = np.repeat(np.arange(n), n * 2)
    jj = np.tile(np.repeat(np.arange(n), 2), n)
    y = 1.0 + rng.normal(size=n)[ii] + rng.normal(size=n)[jj] + 0.5 * rng.normal(size=n * n)[ii * n + jj]
    y = y + 0.3 * rng.normal(size=len(y))
    block = GaussianBlock(
        (BlockSite("mu", (), "Normal"), BlockSite("a", (n,), "Normal"), BlockSite("b", (n,), "Normal"),
         BlockSite("C", (n * n,), "Normal")),
        (BlockLikelihood("y", "Normal", "identity"),),
        ("s_a", "s_b", "s_C", "sigma"),
    )
    return model, (ii, jj, y, n, n), {}, block


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(model, args, kwargs, block, theta, method, repeats):
    cond = BlockConditional(model, block, args, kwargs, method=method)
    run = jax.jit(lambda k: cond.sample(k, theta, return_info=True))
    draw, info = run(jax.random.PRNGKey(0))
    jax.block_until_ready(draw)
    calls, start = 0, cpu_seconds()
    while calls < repeats or cpu_seconds() - start < 1.0:
        draw, info = run(jax.random.PRNGKey(calls + 1))
        jax.block_until_ready(draw)
        calls += 1
    seconds = (cpu_seconds() - start) / calls
    return seconds, int(info["mode_iterations"]), int(info["iterations"])


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["crossed", "tensor"], default="crossed")
    parser.add_argument("--sizes", default=None, help="I = J values, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args(argv)
    problem, theta, sizes = {
        "crossed": (crossed_problem, CROSSED_THETA, "4,6,9,13,18,24,32,45"),
        "tensor": (tensor_problem, TENSOR_THETA, "2,4,6,9,13,18,24"),
    }[opts.model]
    print(f"{opts.model}:\n")
    print("| I = J | block size D | observations N | dense CPU s | CG CPU s | CG iterations (mean, draw) |")
    print("|---|---|---|---|---|---|")
    for n in (int(s) for s in (opts.sizes or sizes).split(",")):
        model_fn, args, kwargs, block = problem(n)
        n_obs = int(np.size(kwargs["y"])) if "y" in kwargs else len(args[2])
        start = time.time()
        dense, _, _ = measure(model_fn, args, kwargs, block, theta, "dense", opts.repeats)
        cg, mean_its, draw_its = measure(model_fn, args, kwargs, block, theta, "cg", opts.repeats)
        print(f"| {n} | {block.size} | {n_obs} | {dense:.4f} | {cg:.4f} | {mean_its}, {draw_its} |"
              f"  <!-- {time.time() - start:.0f} s wall incl. compile -->", flush=True)


if __name__ == "__main__":
    main()
