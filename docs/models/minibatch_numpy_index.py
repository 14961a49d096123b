"""A minibatch regression that indexes its numpy data by the subsampled plate's indices (``x[idx]``),
as SVI code often does: traced, the indices cannot index numpy arrays, so the model has to run
eagerly once; ``autoreparam analyze docs/models/minibatch_numpy_index.py`` then re-runs it with
those indices given. Timed by ``python -m benchmarks.cold_start --alternate OLD/src NEW/src
--examples --files docs/models/minibatch_numpy_index.py``."""

import numpy as np
import numpyro
import numpyro.distributions as dist

N_ROWS, N_GROUPS, BATCH = 100, 5, 20


def model(g, x, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", N_GROUPS):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("n", N_ROWS, subsample_size=BATCH) as idx:
        numpyro.sample("y", dist.Normal(mu + a[g[idx]] + 0.5 * x[idx], sigma), obs=y[idx])


def model_args():
    rng = np.random.default_rng(107)
    g = np.arange(N_ROWS) % N_GROUPS
    x = rng.normal(size=N_ROWS).astype(np.float32)
    return (g, x), {"y": rng.normal(size=N_ROWS).astype(np.float32)}
