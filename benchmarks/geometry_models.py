"""Models of the shapes on which NUTS on ``reparameterize(model)`` once lost (issue 10), with
synthetic data from fixed seeds. Each ``NAME_data(size)`` returns ``(args, kwargs)`` for ``NAME``.

- ``tutorial``: NumPyro's hierarchical linear regression tutorial shape (patient intercepts near
  2,700 and per-patient slopes, vague HalfNormal(100) scales, about 9 visits per patient);
- ``group_logistic``: logistic regression with hierarchical group intercepts and a common slope;
- ``lkj_gaussian``: varying intercepts and slopes with an LKJ-correlated block, Gaussian outcome;
- ``lkj_logistic``: the same with a Bernoulli outcome;
- ``horseshoe``: a horseshoe regression with three signals among twenty coefficients;
- ``weak_schools``: a control where non-centring must still win (eight-schools-like weak data).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import numpyro
import numpyro.distributions as dist


def tutorial_data(size="full", seed=0):
    n_patients, n_visits = (176, 9) if size == "full" else (20, 9)
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), n_visits).astype(np.int32)
    weeks = rng.uniform(-5, 130, size=patient.size).astype(np.float32)
    alpha = rng.normal(2700.0, 800.0, n_patients)
    beta = rng.normal(-8.0, 5.0, n_patients)
    y = (alpha[patient] + beta[patient] * weeks + rng.normal(0, 150.0, patient.size)).astype(np.float32)
    return (patient, weeks, n_patients), {"y": y}


def tutorial(patient, weeks, n_patients, y=None):
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 500.0))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(100.0))
    mu_b = numpyro.sample("mu_b", dist.Normal(0.0, 3.0))
    sigma_b = numpyro.sample("sigma_b", dist.HalfNormal(100.0))
    with numpyro.plate("patients", n_patients):
        alpha = numpyro.sample("alpha", dist.Normal(mu_a, sigma_a))
        beta = numpyro.sample("beta", dist.Normal(mu_b, sigma_b))
    sigma = numpyro.sample("sigma", dist.HalfNormal(100.0))
    with numpyro.plate("visits", len(patient)):
        numpyro.sample("y", dist.Normal(alpha[patient] + beta[patient] * weeks, sigma), obs=y)


def group_logistic_data(size="full", seed=5):
    n_groups, n_per = (40, 25) if size == "full" else (10, 10)
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(n_groups), n_per).astype(np.int32)
    x = rng.normal(size=group.size).astype(np.float32)
    a = rng.normal(0.0, 1.0, n_groups)
    y = (rng.uniform(size=group.size) < 1 / (1 + np.exp(-(a[group] + 0.7 * x)))).astype(np.float32)
    return (group, x, n_groups), {"y": y}


def group_logistic(group, x, n_groups, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    b = numpyro.sample("b", dist.Normal(0.0, 2.0))
    s = numpyro.sample("s", dist.HalfNormal(2.0))
    with numpyro.plate("groups", n_groups):
        a = numpyro.sample("a", dist.Normal(mu, s))
    with numpyro.plate("obs", len(group)):
        numpyro.sample("y", dist.Bernoulli(logits=a[group] + b * x), obs=y)


def _varying_effects_data(size, seed, bernoulli):
    n_groups, n_per = (30, 10) if size == "full" else (8, 6)
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(n_groups), n_per).astype(np.int32)
    x = rng.normal(size=group.size).astype(np.float32)
    chol = np.linalg.cholesky(np.array([[1.0, -0.5], [-0.5, 1.0]]))
    ab = (np.array([1.0, 0.5]) * (chol @ rng.normal(size=(2, n_groups))).T) + np.array([0.5, -1.0])
    eta = ab[group, 0] + ab[group, 1] * x
    if bernoulli:
        y = (rng.uniform(size=group.size) < 1 / (1 + np.exp(-eta))).astype(np.float32)
    else:
        y = (eta + rng.normal(0, 1.0, group.size)).astype(np.float32)
    return (group, x, n_groups), {"y": y}


def lkj_gaussian_data(size="full", seed=3):
    return _varying_effects_data(size, seed, bernoulli=False)


def lkj_gaussian(group, x, n_groups, y=None):
    a0 = numpyro.sample("a0", dist.Normal(0.0, 5.0))
    b0 = numpyro.sample("b0", dist.Normal(0.0, 5.0))
    sd = numpyro.sample("sd", dist.HalfNormal(2.0).expand([2]).to_event(1))
    corr = numpyro.sample("L", dist.LKJCholesky(2, 2.0))
    with numpyro.plate("groups", n_groups):
        ab = numpyro.sample("ab", dist.MultivariateNormal(jnp.zeros(2), scale_tril=sd[:, None] * corr))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("obs", len(group)):
        numpyro.sample("y", dist.Normal(a0 + ab[group, 0] + (b0 + ab[group, 1]) * x, sigma), obs=y)


def lkj_logistic_data(size="full", seed=4):
    return _varying_effects_data(size, seed, bernoulli=True)


def lkj_logistic(group, x, n_groups, y=None):
    abar = numpyro.sample("abar", dist.Normal(0.0, 1.5))
    bbar = numpyro.sample("bbar", dist.Normal(0.0, 1.0))
    sd = numpyro.sample("sd", dist.Exponential(1.0).expand([2]).to_event(1))
    corr = numpyro.sample("L", dist.LKJCholesky(2, 2.0))
    with numpyro.plate("groups", n_groups):
        ab = numpyro.sample("ab", dist.MultivariateNormal(jnp.zeros(2), scale_tril=sd[:, None] * corr))
    with numpyro.plate("obs", len(group)):
        numpyro.sample("y", dist.Bernoulli(logits=abar + ab[group, 0] + (bbar + ab[group, 1]) * x), obs=y)


def horseshoe_data(size="full", seed=2):
    n, k = (100, 20) if size == "full" else (30, 6)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, k)).astype(np.float32)
    beta = np.zeros(k)
    beta[:3] = [3.0, -2.0, 1.5]
    y = (X @ beta + rng.normal(0, 1.0, n)).astype(np.float32)
    return (X,), {"y": y}


def horseshoe(X, y=None):
    tau = numpyro.sample("tau", dist.HalfCauchy(1.0))
    with numpyro.plate("coefficients", X.shape[1]):
        lam = numpyro.sample("lambda", dist.HalfCauchy(1.0))
        beta = numpyro.sample("beta", dist.Normal(0.0, tau * lam))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)


def weak_schools_data(size="full", seed=6):
    n = 16 if size == "full" else 8
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(9.0, 18.0, n).astype(np.float32)
    theta = rng.normal(5.0, 3.0, n)
    return (sigma,), {"y": (theta + rng.normal(0, sigma)).astype(np.float32)}


def weak_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", len(sigma)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)
