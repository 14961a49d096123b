"""The conditional p(z | theta, y) of a Gaussian block against dense computations written by hand."""


import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
from numpyro import handlers
from numpyro.infer.util import log_density

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
        mean, covariance = jax.jit(cond.mean), jax.jit(cond.covariance)
        for seed in range(3):
            theta = random_theta(seed)
            H, b, _, _ = crossed_dense(theta)
            np.testing.assert_allclose(flat(cond, mean(theta)), np.linalg.solve(H, b), rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(np.asarray(covariance(theta)), np.linalg.inv(H), rtol=1e-7, atol=1e-10)


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


# ------------------------------------------------------------------ Laplace: Poisson log rate, Bernoulli logits

Y_COUNT = RNG.poisson(np.exp(0.3 + 0.4 * II - 0.2 * JJ))
Y_BINARY = (RNG.random(len(II)) < 1 / (1 + np.exp(-(0.8 * II - 1.0)))).astype(float)


def glm(ii, jj, y, family, validate_args=None):
    c = numpyro.sample("c", dist.Normal(0.0, 1.0))
    s_a = numpyro.sample("s_a", dist.HalfNormal(1.0))
    s_b = numpyro.sample("s_b", dist.HalfNormal(1.0))
    with numpyro.plate("i", I):
        a = numpyro.sample("a", dist.Normal(0.0, s_a))
    with numpyro.plate("j", J):
        b = numpyro.sample("b", dist.Normal(0.0, s_b))
    eta = c + a[ii] + b[jj]
    with numpyro.plate("n", len(y)):
        if family == "Poisson":
            numpyro.sample("y", dist.Poisson(jnp.exp(eta), validate_args=validate_args), obs=y)
        else:
            numpyro.sample("y", dist.Bernoulli(logits=eta, validate_args=validate_args), obs=y)


def glm_block(family):
    link = {"Poisson": "log", "Bernoulli": "logit"}[family]
    return GaussianBlock((BlockSite("a", (I,), "Normal"), BlockSite("b", (J,), "Normal")),
                         (BlockLikelihood("y", family, link),), ("c", "s_a", "s_b"))


def glm_dense(theta, family, y):
    """Negative log joint in z = [a, b], its gradient and Hessian, from the GLM algebra."""
    D = I + J
    Jmat = np.zeros((len(II), D))
    Jmat[np.arange(len(II)), II] = 1.0
    Jmat[np.arange(len(II)), I + JJ] = 1.0
    P = np.diag(np.r_[np.full(I, 1 / theta["s_a"] ** 2), np.full(J, 1 / theta["s_b"] ** 2)])

    def parts(z):
        eta = theta["c"] + Jmat @ z
        if family == "Poisson":
            mean, w, loglik = np.exp(eta), np.exp(eta), y * eta - np.exp(eta)
        else:
            p = 1 / (1 + np.exp(-eta))
            mean, w, loglik = p, p * (1 - p), y * eta - np.logaddexp(0, eta)
        value = 0.5 * z @ P @ z - loglik.sum()
        return value, P @ z - Jmat.T @ (y - mean), P + Jmat.T @ (w[:, None] * Jmat)

    return parts


@pytest.fixture(scope="module", params=["Poisson", "Bernoulli"])
def laplace_case(request):
    family = request.param
    y = Y_COUNT if family == "Poisson" else Y_BINARY
    cond = BlockConditional(glm, glm_block(family), (II, JJ, y, family), method="cg")
    return family, y, cond


def test_laplace_mode_and_covariance_equal_scipy_optimum_and_dense_hessian(laplace_case):
    family, y, cond = laplace_case
    with jax.enable_x64(True):
        mean, covariance = jax.jit(cond.mean), jax.jit(cond.covariance)
        for seed in range(2):
            rng = np.random.default_rng(seed)
            theta = {"c": rng.normal(0, 0.5), "s_a": rng.uniform(0.3, 2.0), "s_b": rng.uniform(0.3, 2.0)}
            parts = glm_dense(theta, family, y)
            opt = scipy.optimize.minimize(lambda z: parts(z)[:2], np.zeros(I + J), jac=True, method="BFGS",
                                          options={"gtol": 1e-11})
            mode = flat(cond, mean(theta))
            np.testing.assert_allclose(mode, opt.x, rtol=1e-6, atol=1e-7)
            assert np.abs(parts(mode)[1]).max() < 1e-9  # the dense gradient vanishes at our mode
            np.testing.assert_allclose(np.asarray(covariance(theta)), np.linalg.inv(parts(mode)[2]), rtol=1e-7,
                                       atol=1e-10)


def test_laplace_draws_are_exact_draws_of_the_laplace_gaussian(laplace_case):
    family, y, cond = laplace_case
    theta = {"c": 0.2, "s_a": 0.8, "s_b": 1.2}
    parts = glm_dense(theta, family, y)
    with jax.enable_x64(True):
        draws, info = jax.jit(lambda k: cond.sample(k, theta, NUM_DRAWS, return_info=True))(jax.random.PRNGKey(2))
        mode = flat(cond, info["mean"])
    assert_moments(flat_draws(cond, draws), mode, np.linalg.inv(parts(mode)[2]))


def test_laplace_draws_stay_exact_when_the_likelihood_validates_its_values():
    """The draws' noise scores continuous pseudo-observations under the count likelihood: a law built
    with validate_args=True must not score them -inf (which left only the prior's noise)."""
    cond = BlockConditional(glm, glm_block("Poisson"), (II, JJ, Y_COUNT, "Poisson", True), method="dense")
    theta = {"c": 0.2, "s_a": 0.8, "s_b": 1.2}
    parts = glm_dense(theta, "Poisson", Y_COUNT)
    with jax.enable_x64(True):
        draws, info = jax.jit(lambda k: cond.sample(k, theta, NUM_DRAWS, return_info=True))(jax.random.PRNGKey(2))
        mode = flat(cond, info["mean"])
    assert_moments(flat_draws(cond, draws), mode, np.linalg.inv(parts(mode)[2]))


def test_laplace_warm_start_reaches_the_same_mode_in_fewer_iterations(laplace_case):
    family, y, cond = laplace_case
    theta, nearby = {"c": 0.2, "s_a": 0.8, "s_b": 1.2}, {"c": 0.25, "s_a": 0.85, "s_b": 1.1}
    with jax.enable_x64(True):
        run = jax.jit(lambda th, init: cond.sample(jax.random.PRNGKey(3), th, 2, init=init, return_info=True))
        cold_draws, cold = run(theta, None)
        warm_draws, warm = run(theta, cond.mean(nearby))
    np.testing.assert_allclose(flat(cond, warm["mean"]), flat(cond, cold["mean"]), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(flat_draws(cond, warm_draws), flat_draws(cond, cold_draws), rtol=1e-8, atol=1e-9)
    with jax.enable_x64(True):
        _, at_mode = run(theta, cold["mean"])
    assert int(at_mode["mode_iterations"]) < int(cold["mode_iterations"])


def test_importance_weights_correct_the_laplace_mean_towards_quadrature():
    """One Bernoulli-logit effect, six successes in eight: the posterior mean by quadrature."""
    y = np.array([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])

    def model(y):
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        a = numpyro.sample("a", dist.Normal(0.0, s))
        with numpyro.plate("n", len(y)):
            numpyro.sample("y", dist.Bernoulli(logits=a), obs=y)

    block = GaussianBlock((BlockSite("a", (), "Normal"),), (BlockLikelihood("y", "Bernoulli", "logit"),), ("s",))
    cond = BlockConditional(model, block, (y,))
    theta = {"s": 2.0}
    grid = np.linspace(-20, 20, 40001)
    log_post = scipy.stats.norm(0, 2.0).logpdf(grid) + 6 * grid - 8 * np.logaddexp(0, grid)
    post = np.exp(log_post - log_post.max())
    exact_mean = np.sum(grid * post) / np.sum(post)
    with jax.enable_x64(True):
        draws, log_w = jax.jit(lambda k: cond.sample_weighted(k, theta, 20000))(jax.random.PRNGKey(3))
        mode = float(jax.jit(cond.mean)(theta)["a"])
    weighted_mean = float(np.sum(np.exp(log_w) * draws["a"]))
    assert float(scipy.special.logsumexp(np.asarray(log_w))) == pytest.approx(0.0, abs=1e-9)
    assert abs(mode - exact_mean) > 0.08  # the Laplace Gaussian is visibly off here...
    assert weighted_mean == pytest.approx(exact_mean, abs=0.02)  # ...and the weights correct it


def test_exact_blocks_get_uniform_importance_weights(crossed_conds):
    with jax.enable_x64(True):
        _, log_w = jax.jit(lambda k: crossed_conds["cg"].sample_weighted(k, random_theta(0), 8))(
            jax.random.PRNGKey(0))
    np.testing.assert_allclose(log_w, np.full(8, -np.log(8)), atol=1e-6)


# ------------------------------------------------------------------ GaussianRandomWalk rows, MVN prior, .to_event, dim -2

R, K, T = 3, 2, 4
X = RNG.normal(size=(K, 3))
Y_RW = RNG.normal(size=(R, K, T))
L_MVN = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [-0.3, 0.2, 0.7]])


def structured(y):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    step = numpyro.sample("step", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    beta = numpyro.sample("beta", dist.MultivariateNormal(jnp.zeros(3), scale_tril=s * L_MVN))
    c = numpyro.sample("c", dist.Normal(beta[:2], 1.0).to_event(1))  # (K,), loc affine in beta
    with numpyro.plate("r", R, dim=-2):
        w = numpyro.sample("w", dist.GaussianRandomWalk(step, num_steps=T))  # (R, 1, T)
        with numpyro.plate("k", K, dim=-1):
            loc = w + (X @ beta + c)[:, None]  # (R, K, T)
            numpyro.sample("y", dist.Normal(loc, sigma).to_event(1), obs=y)


STRUCTURED_BLOCK = GaussianBlock(
    (BlockSite("beta", (3,), "MultivariateNormal"), BlockSite("c", (K,), "Normal"),
     BlockSite("w", (R, 1, T), "GaussianRandomWalk")),
    (BlockLikelihood("y", "Normal", "identity"),),
    ("s", "step", "sigma"),
)


def dense_by_numpyro_hessian(model, args, block, theta):
    """H and m from jax.hessian of numpyro's own log_density (independent of the solver)."""
    shapes = [(s.name, s.shape) for s in block.sites]

    def log_joint(z):
        values, offset = dict(theta), 0
        for name, shape in shapes:
            size = int(np.prod(shape))
            values[name] = z[offset:offset + size].reshape(shape)
            offset += size
        return log_density(model, args, {}, values)[0]

    z0 = jnp.zeros(block.size)
    H = -np.asarray(jax.jit(jax.hessian(log_joint))(z0))
    return H, np.linalg.solve(H, np.asarray(jax.jit(jax.grad(log_joint))(z0)))


def test_random_walk_rows_mvn_prior_to_event_and_dim_minus_two():
    theta = {"s": 0.9, "step": 0.4, "sigma": 0.6}
    conds = {m: BlockConditional(structured, STRUCTURED_BLOCK, (Y_RW,), method=m) for m in ("cg", "dense")}
    with jax.enable_x64(True):
        H, m = dense_by_numpyro_hessian(structured, (Y_RW,), STRUCTURED_BLOCK, theta)
        for cond in conds.values():
            np.testing.assert_allclose(flat(cond, jax.jit(cond.mean)(theta)), m, rtol=1e-7, atol=1e-9)
        draws = jax.jit(lambda k: conds["cg"].sample(k, theta, NUM_DRAWS))(jax.random.PRNGKey(4))
    assert draws["w"].shape == (NUM_DRAWS, R, 1, T)
    assert_moments(flat_draws(conds["cg"], draws), m, np.linalg.inv(H))
    # The random walk's tridiagonal prior needs two probe classes; the others one each.
    assert conds["cg"]._probes.shape[0] == 3 + 1 + 2


# ------------------------------------------------------------------ bad input


def test_bad_input_is_one_clear_line():
    empty = GaussianBlock((BlockSite("a", (0,), "Normal"),), CROSSED_BLOCK.likelihoods, CROSSED_BLOCK.theta)
    with pytest.raises(InputError, match="block site 'a' has size 0"):
        BlockConditional(crossed, empty, (II, JJ, Y))
    student = GaussianBlock(CROSSED_BLOCK.sites, (BlockLikelihood("y", "StudentT", "identity"),), CROSSED_BLOCK.theta)
    with pytest.raises(ModelError, match="likelihood site 'y' is StudentT; expected one of"):
        BlockConditional(crossed, student, (II, JJ, Y))
    huge = GaussianBlock((BlockSite("a", (DENSE_LIMIT + 1,), "Normal"),), (), ())
    with pytest.raises(InputError, match=r"block \(a\) has size 6001, above DENSE_LIMIT=6000 for method='dense'"):
        BlockConditional(crossed, huge, (II, JJ, Y), method="dense")
    with pytest.raises(InputError, match="method must be 'auto', 'cg' or 'dense', got 'lu'"):
        BlockConditional(crossed, CROSSED_BLOCK, (II, JJ, Y), method="lu")


def test_subsampled_plates_are_refused_by_name():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", len(y), subsample_size=3) as idx:
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    block = GaussianBlock((BlockSite("mu", (), "Normal"),), (BlockLikelihood("y", "Normal", "identity"),), ())
    with pytest.raises(ModelError, match=r"site 'y' is in subsampled plate 'n' \(3 of 10\)"):
        BlockConditional(model, block, (np.arange(10.0),))


def test_observed_site_outside_the_likelihoods_that_depends_on_the_block_is_refused():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        numpyro.sample("y2", dist.Normal(mu, 1.0), obs=y)

    block = GaussianBlock((BlockSite("mu", (), "Normal"),), (BlockLikelihood("y", "Normal", "identity"),), ())
    with pytest.raises(ModelError, match="observed site 'y2' depends on the block but is not one of its likelihoods"):
        BlockConditional(model, block, (1.0,))


def test_log_marginal_on_the_cg_path_is_a_stated_estimate(crossed_conds):
    with pytest.raises(InputError,
                       match="log_marginal: block .* has size 8, above dense_below, and no sparse precision .* pass key="):
        crossed_conds["cg"].log_marginal(random_theta(0))
    theta = random_theta(4)
    with jax.enable_x64(True):
        exact = float(jax.jit(crossed_conds["dense"].log_marginal)(theta))
        keys = jax.random.split(jax.random.PRNGKey(0), 40)
        estimates = np.asarray(jax.jit(jax.vmap(lambda k: crossed_conds["cg"].log_marginal(theta, k)))(keys))
    assert estimates.std() > 0  # a real estimate, not the dense value
    assert abs(estimates.mean() - exact) < 4 * estimates.std() / np.sqrt(len(estimates))


def test_cg_path_builds_the_sparse_marginal_on_request_and_it_equals_the_dense_one(crossed_conds):
    """The CG path has no exact log p(y, theta) until asked (the mean and draws never build H);
    prepare_exact_marginal builds the sparse precision, whose marginal equals the dense Cholesky's."""
    cond = BlockConditional(crossed, CROSSED_BLOCK, (II, JJ, Y, True), method="cg")
    dense = BlockConditional(crossed, CROSSED_BLOCK, (II, JJ, Y, True), method="dense")
    assert not cond.dense and not cond.exact_marginal and cond.precision is None
    with pytest.raises(InputError, match="no sparse precision .*prepare_exact_marginal"):
        cond.log_marginal(random_theta(0))
    assert cond.prepare_exact_marginal() and cond.exact_marginal and "groups" in cond.precision_note
    with jax.enable_x64(True):
        for seed in range(3):
            theta = random_theta(seed)
            expected = float(jax.jit(dense.log_marginal)(theta))
            assert float(jax.jit(cond.log_marginal)(theta)) == pytest.approx(expected, rel=1e-10, abs=1e-10)
            # A key no longer asks for the Lanczos estimate: the value is the exact one.
            assert float(cond.log_marginal(theta, jax.random.PRNGKey(0))) == pytest.approx(expected, rel=1e-10)
    theta32 = {n: jnp.float32(v) for n, v in random_theta(1).items()}  # a float32 caller gets it too
    assert float(jax.jit(cond.log_marginal)(theta32)) == pytest.approx(float(dense.log_marginal(random_theta(1))),
                                                                         rel=1e-6)


def test_laplace_blocks_have_no_exact_marginal_on_the_cg_path():
    y = (Y > 0).astype(np.float64)
    cond = BlockConditional(glm, glm_block("Bernoulli"), (II, JJ, y, "Bernoulli"), method="cg")
    assert not cond.prepare_exact_marginal() and "exact" in cond.precision_note


def test_float32_caller_can_draw_inside_its_own_jit(crossed_conds):
    theta = {n: jnp.float32(v) for n, v in random_theta(5).items()}
    draws = jax.jit(lambda k: crossed_conds["cg"].sample(k, theta, 3))(jax.random.PRNGKey(0))
    assert draws["a"].shape == (3, I) and draws["a"].dtype == jnp.float32
    _, log_w = jax.jit(lambda k: crossed_conds["cg"].sample_weighted(k, theta, 3))(jax.random.PRNGKey(0))
    assert log_w.dtype == jnp.float32


def test_float32_caller_gets_the_float64_gradient(crossed_conds):
    """The backward pass runs in float64 too (a custom VJP), so jax.grad works from float32 code."""
    cond = crossed_conds["dense"]
    theta = random_theta(4)
    grad32 = jax.jit(jax.grad(cond.log_marginal))({n: jnp.float32(v) for n, v in theta.items()})
    with jax.enable_x64(True):
        grad64 = jax.jit(jax.grad(cond.log_marginal))(theta)
    for name in theta:
        assert grad32[name].dtype == jnp.float32
        assert float(grad32[name]) == pytest.approx(float(grad64[name]), rel=1e-5)


@pytest.mark.parametrize("case", ["normal_cg", "poisson_laplace"])
def test_mean_is_differentiable_in_theta(crossed_conds, case):
    """Implicit derivative of the mean/mode (through the final Newton step) against finite differences."""
    if case == "normal_cg":
        cond, theta = crossed_conds["cg"], random_theta(6)
    else:
        cond = BlockConditional(glm, glm_block("Poisson"), (II, JJ, Y_COUNT, "Poisson"), method="cg")
        theta = {"c": 0.1, "s_a": 0.9, "s_b": 1.1}
    weights = np.linspace(-1.0, 1.0, cond.size)
    with jax.enable_x64(True):
        objective = jax.jit(lambda th: jnp.vdot(weights, cond.flatten(cond.mean(th))))
        grad = jax.jit(jax.grad(objective))(theta)
        for name in theta:
            up, down = dict(theta), dict(theta)
            up[name] += 1e-5
            down[name] -= 1e-5
            fd = (float(objective(up)) - float(objective(down))) / 2e-5
            assert float(grad[name]) == pytest.approx(fd, rel=1e-5, abs=1e-6)


def _effects_by_sample_shape(g, y, plate):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    if plate:
        with numpyro.plate("groups", 4):
            a = numpyro.sample("a", dist.Normal(0.0, s))
    else:
        a = numpyro.sample("a", dist.Normal(0.0, s), sample_shape=(4,))
    numpyro.sample("y", dist.Normal(a[g], 1.0), obs=y)


@pytest.mark.parametrize("method", ["cg", "dense"])
def test_a_block_site_drawn_with_sample_shape_is_the_plate_one(method):
    """``sample_shape=(4,)`` on a scalar law: the precision's layout counted the law's batch (1 value, not 4)
    and the prior draws ignored the sample shape; both raised. Now mean and draws are the plate model's."""
    g = np.arange(12) % 4
    y = np.random.default_rng(0).normal(size=12)
    block = GaussianBlock((BlockSite("a", (4,), "Normal"),), (BlockLikelihood("y", "Normal", "identity"),), ("s",))
    theta = {"s": 0.8}
    with jax.enable_x64(True):
        got, want = (BlockConditional(_effects_by_sample_shape, block, (g, y, plate), method=method)
                     for plate in (False, True))
        np.testing.assert_allclose(got.mean(theta)["a"], want.mean(theta)["a"], rtol=1e-10)
        key = jax.random.PRNGKey(1)
        np.testing.assert_allclose(got.sample(key, theta, 3)["a"], want.sample(key, theta, 3)["a"], rtol=1e-8)
