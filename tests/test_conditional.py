"""The conditional p(z | theta, y) of a Gaussian block against dense computations written by hand."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.optimize
import scipy.stats
from numpyro import handlers
from numpyro.infer.util import log_density

import autoreparam.conditional as conditional
from autoreparam.block import BlockLikelihood, BlockSite, GaussianBlock
from autoreparam.conditional import DENSE_LIMIT, BlockConditional
from autoreparam.errors import InputError, ModelError

NUM_DRAWS = 4000


def assert_moments(draws, mean, cov):
    """Empirical mean and covariance of ``draws`` (n, D) within 5 Monte Carlo standard errors."""
    n = draws.shape[0]
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean), 5 * sd / np.sqrt(n))
    emp = np.cov(draws, rowvar=False)
    se = np.sqrt((np.outer(sd ** 2, sd ** 2) + cov ** 2) / n)
    np.testing.assert_array_less(np.abs(emp - cov), 5 * se)


def flat(cond, z):
    return np.asarray(cond.flatten(z))


def flat_draws(cond, draws):
    return np.concatenate([np.asarray(draws[s.name]).reshape(-1, s.size) for s in cond.block.sites], axis=1)


# ------------------------------------------------------------------ crossed Normal: mu + a[i] + b[j]

I, J = 4, 3
RNG = np.random.default_rng(0)
CELLS = np.array([(i, j) for i in range(I) for j in range(J)] * 2)
CELLS = CELLS[RNG.random(len(CELLS)) < 0.7]
II, JJ = CELLS[:, 0], CELLS[:, 1]
Y = RNG.normal(size=len(II)) + 0.5 * II - 0.3 * JJ
MASK = RNG.random(len(II)) < 0.75
OBS_SCALE, B_SCALE = 2.5, 0.5


def crossed(ii, jj, y, scaled=False):
    s_a = numpyro.sample("s_a", dist.HalfNormal(1.0))
    s_b = numpyro.sample("s_b", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("i", I):
        a = numpyro.sample("a", dist.Normal(mu, s_a))
    with numpyro.plate("j", J), handlers.scale(scale=B_SCALE if scaled else 1.0):
        b = numpyro.sample("b", dist.Normal(0.0, s_b))
    with numpyro.plate("n", len(y)):
        if scaled:
            with handlers.scale(scale=OBS_SCALE), handlers.mask(mask=MASK):
                numpyro.sample("y", dist.Normal(a[ii] + b[jj], sigma), obs=y)
        else:
            numpyro.sample("y", dist.Normal(a[ii] + b[jj], sigma), obs=y)


CROSSED_BLOCK = GaussianBlock(
    (BlockSite("mu", (), "Normal"), BlockSite("a", (I,), "Normal"), BlockSite("b", (J,), "Normal")),
    (BlockLikelihood("y", "Normal", "identity"),),
    ("s_a", "s_b", "sigma"),
)


def crossed_dense(theta, scaled=False):
    """H, b and the design J of the crossed model, from its algebra (z = [mu, a, b])."""
    s_a, s_b, sigma = (float(theta[n]) for n in ("s_a", "s_b", "sigma"))
    D = 1 + I + J
    A = np.zeros((I, D))  # a_i - mu
    A[np.arange(I), 1 + np.arange(I)] = 1.0
    A[:, 0] = -1.0
    P = A.T @ A / s_a ** 2
    P[0, 0] += 1 / 25.0
    P[1 + I:, 1 + I:] += np.eye(J) / s_b ** 2 * (B_SCALE if scaled else 1.0)
    Jmat = np.zeros((len(II), D))
    Jmat[np.arange(len(II)), 1 + II] = 1.0
    Jmat[np.arange(len(II)), 1 + I + JJ] = 1.0
    w = np.full(len(II), 1 / sigma ** 2) * ((OBS_SCALE * MASK) if scaled else 1.0)
    H = P + Jmat.T @ (w[:, None] * Jmat)
    return H, Jmat.T @ (w * Y), P, Jmat


def random_theta(seed):
    rng = np.random.default_rng(seed)
    return {"s_a": rng.uniform(0.3, 2.0), "s_b": rng.uniform(0.3, 2.0), "sigma": rng.uniform(0.3, 1.5)}


@pytest.fixture(scope="module")
def crossed_conds():
    return {m: BlockConditional(crossed, CROSSED_BLOCK, (II, JJ, Y), method=m) for m in ("cg", "dense")}


@pytest.mark.parametrize("method", ["cg", "dense"])
def test_normal_mean_and_covariance_equal_dense_algebra(crossed_conds, method):
    cond = crossed_conds[method]
    with jax.enable_x64(True):
        mean = jax.jit(cond.mean)
        for seed in range(3):
            theta = random_theta(seed)
            H, b, _, _ = crossed_dense(theta)
            np.testing.assert_allclose(flat(cond, mean(theta)), np.linalg.solve(H, b), rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(np.asarray(cond.covariance(theta)), np.linalg.inv(H), rtol=1e-7, atol=1e-10)


def test_normal_draws_are_exact(crossed_conds):
    cond = crossed_conds["cg"]
    theta = random_theta(7)
    H, b, _, _ = crossed_dense(theta)
    with jax.enable_x64(True):
        draws = jax.jit(lambda k: cond.sample(k, theta, NUM_DRAWS))(jax.random.PRNGKey(0))
    assert_moments(flat_draws(cond, draws), np.linalg.solve(H, b), np.linalg.inv(H))


def test_cg_and_dense_paths_agree(crossed_conds):
    theta = random_theta(3)
    key = jax.random.PRNGKey(5)
    with jax.enable_x64(True):
        cg, dense = (jax.jit(lambda k, c=crossed_conds[m]: c.sample(k, theta, 5)) for m in ("cg", "dense"))
        for name in CROSSED_BLOCK.names:
            np.testing.assert_allclose(cg(key)[name], dense(key)[name], rtol=1e-6, atol=1e-6)


def test_float32_caller_gets_float32_from_a_float64_solve(crossed_conds):
    cond = crossed_conds["cg"]
    theta = random_theta(1)
    H, b, _, _ = crossed_dense(theta)
    mean = jax.jit(cond.mean)({n: jnp.float32(v) for n, v in theta.items()})
    assert all(v.dtype == jnp.float32 for v in mean.values())
    np.testing.assert_allclose(flat(cond, mean), np.linalg.solve(H, b), rtol=2e-6, atol=1e-6)


def test_log_marginal_is_the_gaussian_integral_and_its_gradient_matches_finite_differences(crossed_conds):
    cond = crossed_conds["dense"]
    theta = random_theta(4)
    _, _, P, Jmat = crossed_dense(theta)
    cov_y = Jmat @ np.linalg.inv(P) @ Jmat.T + theta["sigma"] ** 2 * np.eye(len(Y))
    expected = scipy.stats.multivariate_normal(np.zeros(len(Y)), cov_y).logpdf(Y)
    expected += sum(scipy.stats.halfnorm.logpdf(theta[n]) for n in theta)
    with jax.enable_x64(True):
        log_marginal = jax.jit(cond.log_marginal)
        assert float(log_marginal(theta)) == pytest.approx(expected, rel=1e-10)
        grad = jax.jit(jax.grad(cond.log_marginal))(theta)
        for name in theta:
            h = 1e-5
            up, down = dict(theta), dict(theta)
            up[name] += h
            down[name] -= h
            fd = (float(log_marginal(up)) - float(log_marginal(down))) / (2 * h)
            assert float(grad[name]) == pytest.approx(fd, rel=1e-6, abs=1e-6)


def test_scale_and_mask_keep_the_draws_exact():
    cond = BlockConditional(crossed, CROSSED_BLOCK, (II, JJ, Y, True), method="cg")
    theta = random_theta(2)
    H, b, _, _ = crossed_dense(theta, scaled=True)
    with jax.enable_x64(True):
        np.testing.assert_allclose(flat(cond, jax.jit(cond.mean)(theta)), np.linalg.solve(H, b), rtol=1e-7)
        draws = jax.jit(lambda k: cond.sample(k, theta, NUM_DRAWS))(jax.random.PRNGKey(1))
    assert_moments(flat_draws(cond, draws), np.linalg.solve(H, b), np.linalg.inv(H))
