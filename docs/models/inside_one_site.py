"""Directions inside one site: a design with an intercept and every group's one-hot column, and
giving/receiving effects that enter one predictor as a sum.

    autoreparam analyze docs/models/inside_one_site.py
"""

import jax.numpy as jnp
import numpy as np

import numpyro
import numpyro.distributions as dist

HOUSEHOLD = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
GROUP = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
X = np.column_stack([np.ones(10), np.eye(3)[GROUP], np.linspace(-1.0, 1.0, 10)]).astype(np.float32)


def model(X, household, y=None):
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    gr = numpyro.sample("gr", dist.MultivariateNormal(jnp.zeros(2), jnp.array([[1.0, 0.5], [0.5, 1.0]]))
                        .expand([4]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Poisson(jnp.exp(X @ beta + gr[household, 0] + gr[household, 1])), obs=y)


def model_args():
    return (X, HOUSEHOLD), {"y": np.random.default_rng(0).poisson(2.0, 10).astype(np.float32)}
