"""Benchmark: where the matrix-free CG path of ``BlockConditional`` beats the dense Cholesky path.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_conditional.py [--sizes 5,8,12,...] [--repeats 5]

Model: a crossed design with an interaction, y_ijr ~ Normal(mu + a_i + b_j + C_ij, sigma), I = J,
two observations per cell (the bulk of the block is C, as in the tensor models); block size
D = 1 + I + J + I*J, N = 2 I J observations. For each size, after compiling, the CPU time
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

from autoreparam.block import BlockLikelihood, BlockSite, GaussianBlock
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


def problem(n):
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
    return (ii, jj, y, n, n), block


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(args, block, method, repeats):
    cond = BlockConditional(model, block, args, method=method)
    theta = {"s_a": 1.0, "s_b": 1.0, "s_C": 0.5, "sigma": 0.3}
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
    parser.add_argument("--sizes", default="4,6,9,13,18,24,32,45")
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args(argv)
    print("| I = J | block size D | observations N | dense CPU s | CG CPU s | CG iterations (mean, draw) |")
    print("|---|---|---|---|---|---|")
    for n in (int(s) for s in opts.sizes.split(",")):
        args, block = problem(n)
        start = time.time()
        dense, _, _ = measure(args, block, "dense", opts.repeats)
        cg, mean_its, draw_its = measure(args, block, "cg", opts.repeats)
        print(f"| {n} | {block.size} | {len(args[2])} | {dense:.4f} | {cg:.4f} | {mean_its}, {draw_its} |"
              f"  <!-- {time.time() - start:.0f} s wall incl. compile -->", flush=True)


if __name__ == "__main__":
    main()
