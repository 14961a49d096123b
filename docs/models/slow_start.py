"""Group effects around 30 while the guide starts at 0: 200 steps of Adam are not enough.

    autoreparam compare docs/models/slow_start.py --steps 200     # both fits flagged RISING
"""

import numpy as np

import numpyro
import numpyro.distributions as dist

GROUP = np.tile(np.arange(3), 10)
Y = (30.0 + np.random.default_rng(0).standard_normal(30)).astype(np.float32)


def model(group, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    with numpyro.plate("data", len(group)):
        numpyro.sample("y", dist.Normal(a[group], 1.0), obs=y)


def model_args():
    return (GROUP,), {"y": Y}
