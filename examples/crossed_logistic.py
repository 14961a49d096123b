"""Crossed random effects, logistic: y_n ~ Bernoulli(logit^-1(mu + a[row_n] + b[col_n])).

Think of students (rows) answering questions (columns): every observation belongs to one row
and one column, and the two factors are crossed, not nested. The grand mean `mu` and the two
sets of effects are only identified through their priors (add c to `mu` and subtract it from
every `a_r`, and the likelihood does not change; likewise `mu` against `b` and `a` against `b`),
so the posterior is a ridge that mean-field VI squeezes. The analysis works on the logit scale.

The data are synthetic, drawn from the model itself with a fixed seed: by default 300 rows,
100 columns and 15,000 observed (row, column) cells (half of all cells, each at most once).

    autoreparam analyze examples/crossed_logistic.py
"""

import numpy as np

import numpyro
import numpyro.distributions as dist


def model(row, col, num_rows, num_cols, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(1.0))
    sigma_b = numpyro.sample("sigma_b", dist.HalfNormal(1.0))
    with numpyro.plate("rows", num_rows):
        a = numpyro.sample("a", dist.Normal(0.0, sigma_a))
    with numpyro.plate("cols", num_cols):
        b = numpyro.sample("b", dist.Normal(0.0, sigma_b))
    with numpyro.plate("obs", len(row)):
        numpyro.sample("y", dist.Bernoulli(logits=mu + a[row] + b[col]), obs=y)


def simulate(num_rows=300, num_cols=100, num_obs=15000, seed=0):
    """(row, col, y): ``num_obs`` distinct cells, effects drawn with sigma_a = 1, sigma_b = 0.7, mu = 0.5."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0, num_rows)
    b = rng.normal(0.0, 0.7, num_cols)
    cells = np.sort(rng.choice(num_rows * num_cols, size=num_obs, replace=False))
    row, col = np.divmod(cells, num_cols)
    p = 1.0 / (1.0 + np.exp(-(0.5 + a[row] + b[col])))
    y = (rng.uniform(size=num_obs) < p).astype(np.float32)
    return row.astype(np.int32), col.astype(np.int32), y


def model_args(num_rows=300, num_cols=100, num_obs=15000, seed=0):
    row, col, y = simulate(num_rows, num_cols, num_obs, seed)
    return (row, col, num_rows, num_cols), {"y": y}
