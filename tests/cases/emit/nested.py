"""Nested effects, districts in regions through an index map, weak data (noise 3): both effects get offsets and are non-centred.

y_n ~ Normal(mu + r[region_of_district[district_n]] + d[district_n], 3)
"""

import numpy as np

import numpyro
import numpyro.distributions as dist

REGION_OF_DISTRICT = np.array([0, 0, 1, 1])
DISTRICT = np.array([0, 0, 1, 1, 2, 2, 3, 3])
Y = np.array([1.2, 0.9, 1.6, 1.4, -0.3, -0.1, 0.4, 0.2], dtype=np.float32)


def model(district, region_of_district, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma_r = numpyro.sample("sigma_r", dist.HalfNormal(1.0))
    sigma_d = numpyro.sample("sigma_d", dist.HalfNormal(1.0))
    with numpyro.plate("regions", 2):
        r = numpyro.sample("r", dist.Normal(0.0, sigma_r))
    with numpyro.plate("districts", 4):
        d = numpyro.sample("d", dist.Normal(0.0, sigma_d))
    with numpyro.plate("obs", len(district)):
        numpyro.sample("y", dist.Normal(mu + r[region_of_district[district]] + d[district], 3.0), obs=y)


def model_args():
    return (DISTRICT, REGION_OF_DISTRICT), {"y": Y}
