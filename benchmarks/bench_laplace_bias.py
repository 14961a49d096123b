"""Why the hybrid misses its mean target on crossed_logistic with plain Laplace draws: the Laplace
conditional's bias in the Fisher-identity gradient of sigma_a, measured at the reference posterior mean
of theta, and how much of it K self-normalised importance-weighted draws remove.

    python -m benchmarks.bench_laplace_bias [--draws 1,2,4,8,16,32,64] [--batches 40]

Draws z from the Laplace Gaussian N(m, H^-1) at theta = (sigma_a, sigma_b) = (1.062, 0.644) (the NUTS
reference means) with their weights p(y, z, theta) / N(z; m, H^-1) (``sample_weighted``, batches of 64).
The sigma_a gradient of log N(a; 0, sigma_a) is -n / sigma_a + sum a^2 / sigma_a^3, so a smaller
E[sum a^2] pushes the fitted sigma_a down. For each K the batches are cut into groups of K draws,
renormalised within each group (what ``HybridELBO(block_draws=K)`` does for one theta draw) and the
gradient is averaged over groups: its bias falls as 1 / K towards the all-draws weighted value.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from autoreparam.block import block_of_model
from autoreparam.conditional import BlockConditional
from autoreparam.fit import inputs_for_float64

from .models import example

THETA = {"sigma_a": 1.062, "sigma_b": 0.644}
PER_BATCH = 64


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", default="1,2,4,8,16,32,64", help="K values, each dividing 64")
    p.add_argument("--batches", type=int, default=40)
    opts = p.parse_args(argv)
    ks = [int(k) for k in opts.draws.split(",")]
    m = example("crossed_logistic")
    args, kwargs = m.model_args()
    with jax.enable_x64(True):
        args, kwargs = inputs_for_float64((tuple(args), dict(kwargs)))
        block, _ = block_of_model(m.model, args, kwargs)
        cond = BlockConditional(m.model, block, args, kwargs, method="cg")
        theta = {k: jnp.float64(v) for k, v in THETA.items()}
        draw = jax.jit(lambda k: cond.sample_weighted(k, theta, PER_BATCH))
        draw(jax.random.PRNGKey(0))
        sums, log_w = [], []
        t0 = time.perf_counter()
        for i in range(opts.batches):  # weights are self-normalised per batch; regrouping within a batch is valid
            z, lw = draw(jax.random.PRNGKey(i))
            sums.append(np.sum(np.asarray(z["a"]) ** 2, axis=1))
            log_w.append(np.asarray(lw))
        seconds_per_draw = (time.perf_counter() - t0) / (opts.batches * PER_BATCH)
    sums, log_w = np.array(sums), np.array(log_w)
    n, s = int(args[2]), THETA["sigma_a"]  # number of rows (elements of a)
    grad = lambda s2: -n / s + s2 / s ** 3
    per_k = {}
    for k in ks:
        S, L = sums.reshape(-1, k), log_w.reshape(-1, k)
        w = np.exp(L - L.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        est = (w * S).sum(1)
        per_k[k] = {"grad_sigma_a": float(grad(est.mean())), "se": float(est.std() / np.sqrt(est.size) / s ** 3),
                    "ess_per_group": float(np.mean(1 / np.sum(w ** 2, 1)))}
    w_all = np.exp(log_w - log_w.max(1, keepdims=True))
    w_all /= w_all.sum(1, keepdims=True)
    weighted = float(np.mean(np.sum(w_all * sums, 1)))
    out = {"theta": THETA, "draws": int(sums.size), "seconds_per_draw": seconds_per_draw,
           "sum_a2_plain": float(sums.mean()), "sum_a2_plain_se": float(sums.std() / np.sqrt(sums.size)),
           "sum_a2_weighted_64": weighted, "grad_sigma_a_plain": float(grad(sums.mean())),
           "grad_sigma_a_weighted_64": float(grad(weighted)), "by_block_draws": per_k}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
