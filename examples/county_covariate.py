"""Random intercepts with a county-level covariate: y ~ Normal(mu + a[county] + w * u[county], sigma).

The county effects `a` can absorb both the grand mean `mu` and the covariate term `w * u[county]`
(u is constant within a county), so the likelihood has two invariant directions.

    autoreparam analyze examples/county_covariate.py
"""

import numpy as np

import numpyro
import numpyro.distributions as dist


def model(county, u, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 10))
    w = numpyro.sample("w", dist.Normal(0, 1))  # effect of the county-level covariate u
    tau = numpyro.sample("tau", dist.HalfNormal(1))
    with numpyro.plate("counties", len(u)):
        a = numpyro.sample("a", dist.Normal(0, tau))  # county effects
    sigma = numpyro.sample("sigma", dist.HalfNormal(1))
    with numpyro.plate("houses", len(county)):
        numpyro.sample("y", dist.Normal(mu + a[county] + w * u[county], sigma), obs=y)


def model_args(n_houses=200, n_counties=12, seed=0):
    rng = np.random.default_rng(seed)
    county = rng.integers(0, n_counties, n_houses)
    u = rng.normal(size=n_counties).astype(np.float32)
    effects = rng.normal(0, 0.3, n_counties)
    y = (1.0 + 0.5 * u[county] + effects[county] + rng.normal(0, 0.1, n_houses)).astype(np.float32)
    return (county, u), {"y": y}
