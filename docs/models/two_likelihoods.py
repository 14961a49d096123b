"""Two likelihoods that share the direction {mu, a}; a fixed coefficient 2, and one real covariate u.

    autoreparam analyze docs/models/two_likelihoods.py
"""

import numpy as np

import numpyro
import numpyro.distributions as dist

GROUP = np.tile(np.arange(4), 3)
U = np.array([0.3, 1.2, -0.5, 2.0], dtype=np.float32)  # a group-level covariate


def model(group, u, y=None, z=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    w = numpyro.sample("w", dist.Normal(0.0, 5.0))
    with numpyro.plate("groups", 4):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", len(group)):
        numpyro.sample("y", dist.Normal(mu + 2.0 * a[group] + w * u[group], 1.0), obs=y)
        numpyro.sample("z", dist.Normal(mu + 2.0 * a[group] - b[group], 1.0), obs=z)


def model_args():
    rng = np.random.default_rng(0)
    return (GROUP, U), {"y": rng.standard_normal(12).astype(np.float32),
                        "z": rng.standard_normal(12).astype(np.float32)}
