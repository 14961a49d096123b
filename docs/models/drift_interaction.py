"""A random-walk drift per dimension against an interaction term: the first step of each drift row,
``drift[d, 0]``, enters the first likelihood only beside ``pairwise[:, d]``, so shifting one by c and
the other by -c changes nothing (one direction per dimension d, inside the random walk's event).

    autoreparam analyze docs/models/drift_interaction.py
"""

import numpy as np

import numpyro
import numpyro.distributions as dist

D, T, P = 3, 6, 4
_rng = np.random.default_rng(0)
DIM = _rng.integers(0, D, 120)
PAIR = _rng.integers(0, P, 120)


def model(dim, pair, y=None, y_later=None):
    drift = numpyro.sample("drift", dist.GaussianRandomWalk(0.3, num_steps=T).expand([D]).to_event(1))
    pairwise = numpyro.sample("pairwise", dist.Normal(0.0, 1.0).expand([P, D]).to_event(2))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", dim.shape[0]):
        numpyro.sample("y", dist.Normal(drift[dim, 0] + pairwise[pair, dim], sigma), obs=y)
    numpyro.sample("y_later", dist.Normal(drift[:, 1:], sigma).to_event(2), obs=y_later)


def model_args():
    return (DIM, PAIR), {"y": _rng.normal(size=120).astype(np.float32),
                         "y_later": _rng.normal(size=(D, T - 1)).astype(np.float32)}
