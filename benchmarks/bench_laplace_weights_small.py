"""Are the Laplace draws' importance weights right? Two Bernoulli-logit effects (7 of 8 and 1 of 6
successes), a ~ N(0, s): E[sum a^2] given s from plain draws of the Laplace Gaussian, from the same
draws importance-weighted (``BlockConditional.sample_weighted``), and by numerical integration.

    python -m benchmarks.bench_laplace_weights_small [--s 1.0] [--draws 400000]
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import scipy.stats

from autoreparam.block import BlockLikelihood, BlockSite, GaussianBlock
from autoreparam.conditional import BlockConditional

GROUP = np.array([0] * 8 + [1] * 6)
Y = np.array([1.0] * 7 + [0.0] + [1.0] + [0.0] * 5)
BLOCK = GaussianBlock((BlockSite("a", (2,), "Normal"),), (BlockLikelihood("y", "Bernoulli", "logit"),), ("s",))


def two_effects(group, y=None):
    s = numpyro.sample("s", dist.HalfNormal(2.0))
    with numpyro.plate("groups", 2):
        a = numpyro.sample("a", dist.Normal(0.0, s))
    with numpyro.plate("n", len(group)):
        numpyro.sample("y", dist.Bernoulli(logits=a[group]), obs=y)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--s", type=float, default=1.0)
    p.add_argument("--draws", type=int, default=400_000)
    opts = p.parse_args(argv)
    with jax.enable_x64(True):
        cond = BlockConditional(two_effects, BLOCK, (GROUP,), {"y": Y}, method="dense")
        z, log_w = jax.jit(lambda k: cond.sample_weighted(k, {"s": jnp.float64(opts.s)}, opts.draws))(
            jax.random.PRNGKey(0))
    sums, w = np.sum(np.asarray(z["a"]) ** 2, axis=1), np.exp(np.asarray(log_w))
    grid = np.linspace(-40.0, 40.0, 160001)
    exact = 0.0
    for g in (0, 1):
        k, n = Y[GROUP == g].sum(), (GROUP == g).sum()
        log_f = scipy.stats.norm(0.0, opts.s).logpdf(grid) + k * grid - n * np.logaddexp(0.0, grid)
        f = np.exp(log_f - log_f.max())
        exact += f @ grid ** 2 / f.sum()
    print(json.dumps({"s": opts.s, "draws": opts.draws, "sum_a2_plain": float(sums.mean()),
                      "sum_a2_plain_se": float(sums.std() / np.sqrt(sums.size)), "sum_a2_weighted": float(w @ sums),
                      "ess": float(1 / np.sum(w ** 2)), "sum_a2_exact": float(exact)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
