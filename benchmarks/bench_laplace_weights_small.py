"""Are the Laplace draws' importance weights right? Two Bernoulli-logit effects (7 of 8 and 1 of 6
successes), a ~ N(0, s): E[sum a^2] given s from plain draws of the Laplace Gaussian, from the same
draws importance-weighted (``BlockConditional.sample_weighted``), and by numerical integration.
With ``--posterior``: the mean and sd of each effect in ``AutoHybrid.sample_posterior``'s draws (q(theta)
a point at s) for K = 1, 4, 16 (the default), 64 proposals per draw, against numerical integration.

    python -m benchmarks.bench_laplace_weights_small [--s 1.0] [--draws 400000] [--posterior]
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import scipy.stats
from numpyro import handlers

from autoreparam.block import BlockLikelihood, BlockSite, GaussianBlock
from autoreparam.conditional import BlockConditional
from autoreparam.hybrid import AutoHybrid

GROUP = np.array([0] * 8 + [1] * 6)
Y = np.array([1.0] * 7 + [0.0] + [1.0] + [0.0] * 5)
BLOCK = GaussianBlock((BlockSite("a", (2,), "Normal"),), (BlockLikelihood("y", "Bernoulli", "logit"),), ("s",))


def two_effects(group, y=None):
    s = numpyro.sample("s", dist.HalfNormal(2.0))
    with numpyro.plate("groups", 2):
        a = numpyro.sample("a", dist.Normal(0.0, s))
    with numpyro.plate("n", len(group)):
        numpyro.sample("y", dist.Bernoulli(logits=a[group]), obs=y)


def exact_posterior(s):
    """Unnormalised log density of each effect given s and y on a grid (they are independent given s)."""
    grid = np.linspace(-40.0, 40.0, 160001)
    out = []
    for g in (0, 1):
        k, n = Y[GROUP == g].sum(), (GROUP == g).sum()
        out.append(scipy.stats.norm(0.0, s).logpdf(grid) + k * grid - n * np.logaddexp(0.0, grid))
    return grid, out


def posterior_moments(s: float, draws: int) -> dict:
    """Mean and sd of a in sample_posterior's draws for several K, and by numerical integration."""
    grid, log_fs = exact_posterior(s)
    exact = []
    for log_f in log_fs:
        f = np.exp(log_f - log_f.max())
        f /= f.sum()
        mean = f @ grid
        exact.append([float(mean), float(np.sqrt(f @ (grid - mean) ** 2))])
    out = {"s": s, "draws": draws, "exact_mean_sd": exact}
    with jax.enable_x64(True):
        guide = AutoHybrid(two_effects, block=BLOCK, method="dense")
        handlers.seed(guide, 0)(GROUP, y=Y)
        params = {"auto_loc": jnp.array([np.log(s)]), "auto_log_scale": jnp.array([-30.0])}
        for k in (1, 4, 16, 64):
            a = np.asarray(guide.sample_posterior(jax.random.PRNGKey(1), params, GROUP, y=Y, sample_shape=(draws,),
                                                  block_draws=k)["a"])
            out[f"K={k}_mean_sd"] = [[float(a[:, g].mean()), float(a[:, g].std())] for g in (0, 1)]
        out["mean_se"] = [float(e[1] / np.sqrt(draws)) for e in exact]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--s", type=float, default=1.0)
    p.add_argument("--draws", type=int, default=400_000)
    p.add_argument("--posterior", action="store_true", help="moments of sample_posterior's draws instead")
    opts = p.parse_args(argv)
    if opts.posterior:
        print(json.dumps(posterior_moments(opts.s, opts.draws)))
        return 0
    with jax.enable_x64(True):
        cond = BlockConditional(two_effects, BLOCK, (GROUP,), {"y": Y}, method="dense")
        z, log_w = jax.jit(lambda k: cond.sample_weighted(k, {"s": jnp.float64(opts.s)}, opts.draws))(
            jax.random.PRNGKey(0))
    sums, w = np.sum(np.asarray(z["a"]) ** 2, axis=1), np.exp(np.asarray(log_w))
    grid, log_fs = exact_posterior(opts.s)
    exact = 0.0
    for log_f in log_fs:
        f = np.exp(log_f - log_f.max())
        exact += f @ grid ** 2 / f.sum()
    print(json.dumps({"s": opts.s, "draws": opts.draws, "sum_a2_plain": float(sums.mean()),
                      "sum_a2_plain_se": float(sums.std() / np.sqrt(sums.size)), "sum_a2_weighted": float(w @ sums),
                      "ess": float(1 / np.sum(w ** 2)), "sum_a2_exact": float(exact)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
