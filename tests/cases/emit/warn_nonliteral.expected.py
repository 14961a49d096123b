"""Warning case: site 'a' has a non-literal name (a variable); it is left unchanged, and so is 'b' (its offset parent is 'a')."""

import numpy as np

import numpyro
import numpyro.distributions as dist

ROW = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2])
COL = np.array([0, 1, 0, 1, 0, 1, 1, 0, 1])
Y = np.array([1.1, 0.4, 2.0, 1.2, 0.3, -0.4, 0.5, 1.9, -0.2], dtype=np.float32)


def model(row, col, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(1.0))
    sigma_b = numpyro.sample("sigma_b", dist.HalfNormal(1.0))
    name = "a"
    with numpyro.plate("rows", 3):
        a = numpyro.sample(name, dist.Normal(0.0, sigma_a))
    with numpyro.plate("cols", 2):
        b = numpyro.sample("b", dist.Normal(0.0, sigma_b))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("obs", len(row)):
        numpyro.sample("y", dist.Normal(mu + a[row] + b[col], sigma), obs=y)


def model_args():
    return (ROW, COL), {"y": Y}
