"""Eight schools as authors often ship it: non-centred by a handlers.reparam wrapper.

    autoreparam analyze docs/models/wrapped_schools.py            # reports the wrapper
    autoreparam analyze docs/models/wrapped_schools.py --unwrap   # analyses the model underneath
    autoreparam compare docs/models/wrapped_schools.py            # empty plan: one fit
    autoreparam compare docs/models/wrapped_schools.py --unwrap   # the wrapper against the plan
"""

import numpy as np

import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer.reparam import LocScaleReparam

Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=np.float32)
SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=np.float32)


def schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", len(sigma)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


model = handlers.reparam(schools, config={"theta": LocScaleReparam(0)})


def model_args():
    return (SIGMA,), {"y": Y}
