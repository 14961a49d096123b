"""Correlated varying intercepts and slopes (Statistical Rethinking's m14.1, non-centred by hand):
L_Rho ~ LKJCholesky has one degree of freedom, and every reported direction lives in the sites'
unconstrained values.

    autoreparam analyze docs/models/correlated_slopes.py
"""

import jax.numpy as jnp
import numpy as np

import numpyro
import numpyro.distributions as dist

CAFE = np.tile(np.arange(4), 3)
AFTERNOON = np.repeat([0.0, 1.0, 0.0], 4).astype(np.float32)


def model(cafe, afternoon, y=None):
    L_Rho = numpyro.sample("L_Rho", dist.LKJCholesky(2, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0).expand([2]).to_event(1))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2, 4]).to_event(2))
    ab = jnp.diag(sigma) @ L_Rho @ z
    a_bar = numpyro.sample("a_bar", dist.Normal(0.0, 1.0))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    with numpyro.plate("data", cafe.shape[0]):
        numpyro.sample("y", dist.Normal(a_bar + ab[0, cafe] + ab[1, cafe] * afternoon, s), obs=y)


def model_args():
    return (CAFE, AFTERNOON), {"y": np.random.default_rng(0).normal(size=12).astype(np.float32)}
