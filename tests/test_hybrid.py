"""AutoHybrid, HybridELBO, NaturalGradient and fit_hybrid against dense computations written here."""

import pathlib
import sys
import warnings

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
from numpyro.infer import SVI, Predictive
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import log_density

import autoreparam
import autoreparam.hybrid as hybrid
from autoreparam.block import BlockLikelihood, BlockSite, GaussianBlock
from autoreparam.errors import InputError, ModelError
from autoreparam.hybrid import AutoHybrid, HybridELBO
from autoreparam.natural import NaturalGradient
from helpers import linear_algebra_operands


# ----------------------------------------------------------------------------- the dense oracle
_DENSE_SOLVES = {}


def dense_conditional(model, block_names, theta, args=(), kwargs=None):
    """(mean, covariance, log p(y, theta)) of a linear-Gaussian block by a dense Hessian."""
    kwargs = kwargs or {}
    # One compile per model, block and inputs (by identity; the entry keeps them alive), reused at every theta.
    key = (model, tuple(block_names), tuple(id(x) for x in jax.tree.leaves((args, kwargs))))
    if key not in _DENSE_SOLVES:
        _DENSE_SOLVES[key] = (_dense_solve(model, tuple(block_names), args, kwargs), (args, kwargs))
    return _DENSE_SOLVES[key][0](theta)


def _dense_solve(model, block_names, args, kwargs):
    tr = handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs)
    shapes = [jnp.shape(tr[n]["value"]) for n in block_names]
    sizes = [int(np.prod(s)) for s in shapes]
    dim = sum(sizes)

    def unravel(flat):  # block_names order, row-major
        parts = jnp.split(flat, np.cumsum(sizes)[:-1])
        return {n: p.reshape(s) for n, p, s in zip(block_names, parts, shapes)}

    @jax.jit
    def solve(theta):
        def logp(zflat):
            return log_density(model, args, kwargs, {**theta, **unravel(zflat)})[0]

        zeros = jnp.zeros(dim)
        b = jax.grad(logp)(zeros)
        H = -jax.hessian(logp)(zeros)
        mean = jnp.linalg.solve(H, b)
        _, logdet = jnp.linalg.slogdet(H)
        log_marginal = logp(mean) + 0.5 * mean.size * jnp.log(2 * jnp.pi) - 0.5 * logdet
        return mean, jnp.linalg.inv(H), log_marginal

    return solve


def flat_draws(draws, names):
    n = np.shape(draws[names[0]])[0]
    return np.concatenate([np.asarray(draws[k]).reshape(n, -1) for k in names], axis=1)


# ----------------------------------------------------------------------------- models
G, PER = 10, 6
RNG = np.random.default_rng(1)
GROUP = np.repeat(np.arange(G), PER)
Y = RNG.normal(0.0, 1.0, G)[GROUP] + 0.3 + RNG.normal(0.0, 0.7, G * PER)


def random_intercepts(group, y=None):
    """y ~ N(mu + a[g], sigma), a ~ N(0, tau): theta = (tau, sigma), block = (mu, a)."""
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("groups", G):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    numpyro.deterministic("group_mean", mu + a)
    with numpyro.plate("data", len(group)):
        numpyro.sample("y", dist.Normal(mu + a[group], sigma), obs=y)


RI_BLOCK = GaussianBlock((BlockSite("mu", (), "Normal"), BlockSite("a", (G,), "Normal")),
                         (BlockLikelihood("y", "Normal", "identity"),), ("tau", "sigma"))


def fixed_theta(group, y=None):
    """The same model with tau and sigma known: every latent site is in the block."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("groups", G):
        a = numpyro.sample("a", dist.Normal(0.0, 0.8))
    with numpyro.plate("data", len(group)):
        numpyro.sample("y", dist.Normal(mu + a[group], 0.7), obs=y)


FT_BLOCK = GaussianBlock(RI_BLOCK.sites, RI_BLOCK.likelihoods, ())


def log_marginal_unconstrained(u):
    """log p(y, theta) + log |d theta / d u| at u = (log tau, log sigma), by the dense oracle."""
    theta = {"tau": jnp.exp(u[0]), "sigma": jnp.exp(u[1])}
    return dense_conditional(random_intercepts, ("mu", "a"), theta, (GROUP,), {"y": Y})[2] + u[0] + u[1]


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def quadrature(x64):
    """Posterior moments of u = (log tau, log sigma) on a grid, and the best mean-field Gaussian q(u)
    (the maximiser of the hybrid ELBO, by Gauss-Hermite quadrature)."""
    f = jax.jit(jax.vmap(log_marginal_unconstrained))
    t = np.linspace(-3.0, 2.0, 161)
    s = np.linspace(-1.2, 0.4, 161)
    U = np.stack(np.meshgrid(t, s, indexing="ij"), -1).reshape(-1, 2)
    lp = np.asarray(f(jnp.asarray(U)))
    w = np.exp(lp - lp.max())
    w /= w.sum()
    post_mean = w @ U
    post_sd = np.sqrt(w @ (U - post_mean) ** 2)
    x, gw = np.polynomial.hermite_e.hermegauss(24)
    gw = gw / gw.sum()
    X = np.stack(np.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2)
    W = np.outer(gw, gw).ravel()

    def neg_elbo(p):
        m, log_s = p[:2], p[2:]
        vals = np.asarray(f(jnp.asarray(m + np.exp(log_s) * X)))
        return -(W @ vals + log_s.sum())

    start = np.concatenate([post_mean, np.log(post_sd)])
    opt = scipy.optimize.minimize(neg_elbo, start, method="Nelder-Mead",
                                  options={"xatol": 1e-6, "fatol": 1e-8, "maxiter": 4000})
    return {"post_mean": post_mean, "post_sd": post_sd, "q_mean": opt.x[:2], "q_sd": np.exp(opt.x[2:]),
            "best_elbo": -opt.fun}


@pytest.fixture(scope="module")
def fitted(x64):
    """One AutoHybrid on random_intercepts, set up once, fitted by natural gradient (3000 steps, 8 draws)."""
    guide = AutoHybrid(random_intercepts, block=RI_BLOCK)
    result = run_svi(guide, NaturalGradient(guide), 3000, num_particles=8)
    return guide, result


def run_svi(guide, optim, steps, num_particles=4, seed=0):
    svi = SVI(random_intercepts, guide, optim, HybridELBO(num_particles))
    return svi.run(jax.random.PRNGKey(seed), steps, GROUP, y=Y, progress_bar=False)


# ----------------------------------------------------------------------------- exactness
def test_theta_fixed_is_fitted_exactly(x64):
    guide = AutoHybrid(fixed_theta, block=FT_BLOCK)
    svi = SVI(fixed_theta, guide, numpyro.optim.Adam(0.01), HybridELBO())
    state = svi.init(jax.random.PRNGKey(0), GROUP, y=Y)
    assert svi.get_params(state) == {}  # nothing to fit: q(z) is the exact posterior
    mean, cov, log_evidence = dense_conditional(fixed_theta, ("mu", "a"), {}, (GROUP,), {"y": Y})
    loss = jax.jit(lambda st: svi.evaluate(st, GROUP, y=Y))(state)
    assert abs(float(loss) + float(log_evidence)) < 1e-8  # -ELBO = -log p(y): the bound is tight
    n = 4000
    draws = flat_draws(guide.sample_posterior(jax.random.PRNGKey(1), {}, GROUP, y=Y, sample_shape=(n,)),
                       ["mu", "a"])
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean), 4.5 * sd / np.sqrt(n))
    np.testing.assert_allclose(draws.std(0), sd, rtol=4.5 / np.sqrt(2 * n))
    median = guide.median({})
    np.testing.assert_allclose(np.concatenate([np.ravel(median["mu"]), median["a"]]), mean, rtol=1e-7, atol=1e-9)


def test_loss_value_is_the_exact_hybrid_elbo(fitted):
    """With one particle, -loss = log p(y, theta) - log q(theta) at the drawn theta, to rounding."""
    guide, result = fitted
    params = result.params
    key = jax.random.PRNGKey(3)
    # The value and its gradient from one compile.
    loss, grad_h = jax.jit(jax.value_and_grad(lambda p: HybridELBO(1).loss(key, p, random_intercepts, guide,
                                                                           GROUP, y=Y)))(params)
    k_guide, _ = jax.random.split(jax.random.split(key, 1)[0])
    lq, tr = log_density(handlers.seed(guide, k_guide), (GROUP,), {"y": Y}, params)
    theta = {"tau": tr["tau"]["value"], "sigma": tr["sigma"]["value"]}
    exact = dense_conditional(random_intercepts, ("mu", "a"), theta, (GROUP,), {"y": Y})[2] - lq
    assert abs(float(loss) + float(exact)) < 1e-8
    # Trace_ELBO with the same guide has the same gradient but reports log p(y, z, theta) - log q(theta)
    grad_t = jax.jit(jax.grad(lambda p: HybridELBO(1, exact_value=False).loss(key, p, random_intercepts, guide,
                                                                                 GROUP, y=Y)))(params)
    for k in params:
        np.testing.assert_allclose(grad_h[k], grad_t[k], rtol=1e-10)


@pytest.mark.parametrize("block_draws", [None, 4])
def test_fisher_identity_gradient_matches_finite_differences(fitted, block_draws):
    """E_z[grad_theta log p(y, z, theta)] (the guide's gradient with q(theta) shrunk to a point) equals
    the finite-difference gradient of the dense log p(y, theta); with several (uniformly weighted)
    z draws per theta draw on this exact block too."""
    guide, _ = fitted
    u = np.array([-0.2, -0.4])
    params = {"auto_loc": jnp.asarray(u), "auto_log_scale": jnp.full(2, -20.0)}
    elbo = HybridELBO(1, block_draws=block_draws)
    assert elbo.draws_per_theta(guide) == (block_draws or 1)  # exact blocks: one draw by default

    def particle_grad(key):  # d loss / d loc for one theta draw
        return jax.grad(lambda p: elbo.loss(key, p, random_intercepts, guide, GROUP, y=Y))(params)["auto_loc"]

    keys = jax.random.split(jax.random.PRNGKey(5), 2000 // elbo.draws_per_theta(guide))
    grads = np.asarray(jax.jit(jax.vmap(particle_grad))(keys))
    h = 1e-5
    fd = np.array([(log_marginal_unconstrained(u + h * e) - log_marginal_unconstrained(u - h * e)) / (2 * h)
                   for e in np.eye(2)])
    se = grads.std(0) / np.sqrt(len(grads))
    assert np.all(se > 0)  # the z draws are random: the check below is a statistical one
    np.testing.assert_array_less(np.abs(-grads.mean(0) - fd), 4 * se + 1e-6)


# ----------------------------------------------------------------------------- q(theta) against quadrature
def test_q_theta_matches_quadrature(fitted, quadrature):
    guide, result = fitted
    m = np.asarray(result.params["auto_loc"])
    s = np.exp(np.asarray(result.params["auto_log_scale"]))
    q = quadrature
    # against the best Gaussian q (the optimum of the same objective, computed deterministically)
    np.testing.assert_array_less(np.abs(m - q["q_mean"]), 0.1 * q["q_sd"])
    np.testing.assert_allclose(s, q["q_sd"], rtol=0.12)
    # against the exact posterior of (log tau, log sigma): Gaussian in u up to its skewness here
    np.testing.assert_array_less(np.abs(m - q["post_mean"]), 0.2 * q["post_sd"])
    np.testing.assert_allclose(s, q["post_sd"], rtol=0.2)


def _steps_to_reach(losses, best, tol):
    """First step from which the 50-step running mean of -loss stays within tol of best."""
    elbo = -np.convolve(np.asarray(losses), np.ones(50) / 50, mode="valid")
    ok = elbo >= best - tol
    bad = np.nonzero(~ok)[0]
    return 50 if len(bad) == 0 else (int(bad[-1]) + 51 if bad[-1] + 1 < len(ok) else None)


def test_natural_gradient_reaches_the_optimum_in_fewer_steps_than_adam(fitted, quadrature):
    best = quadrature["best_elbo"]
    guide, natural = fitted  # the natural-gradient run: its first 2000 steps, against 2000 of Adam's
    adam = run_svi(guide, numpyro.optim.Adam(0.01), 2000, num_particles=8)
    steps = {name: _steps_to_reach(result.losses[:2000], best, 0.3)
             for name, result in (("natural", natural), ("adam", adam))}
    assert steps["natural"] is not None
    assert steps["adam"] is None or steps["natural"] < steps["adam"], steps


def test_full_rank_natural_gradient(x64, quadrature):
    guide = AutoHybrid(random_intercepts, block=RI_BLOCK, theta_guide="full")
    result = run_svi(guide, NaturalGradient(guide), 3000, num_particles=8)
    L = hybrid.scale_tril(result.params["auto_scale_tril_offdiag"], result.params["auto_log_scale"])
    cov = np.asarray(L @ L.T)
    assert np.all(np.isfinite(cov))
    np.testing.assert_array_less(np.abs(np.asarray(result.params["auto_loc"]) - quadrature["post_mean"]),
                                 0.2 * quadrature["post_sd"])
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), quadrature["post_sd"], rtol=0.2)


# ----------------------------------------------------------------------------- the NumPyro contract
def test_sample_posterior_predictive_median_quantiles(fitted):
    guide, result = fitted
    params = result.params
    draws = guide.sample_posterior(jax.random.PRNGKey(0), params, GROUP, y=Y, sample_shape=(7, 2))
    assert {k: v.shape for k, v in draws.items()} == {
        "tau": (7, 2), "sigma": (7, 2), "mu": (7, 2), "a": (7, 2, G), "group_mean": (7, 2, G)}
    np.testing.assert_allclose(draws["group_mean"], draws["mu"][..., None] + draws["a"], rtol=1e-12)
    sites = ["tau", "sigma", "mu", "a", "group_mean", "y"]
    pred = Predictive(random_intercepts, guide=guide, params=params, num_samples=5, return_sites=sites)(
        jax.random.PRNGKey(1), GROUP)  # y=None: the model predicts y, the guide draws z given the fitted data
    assert {k: v.shape for k, v in pred.items()} == {
        "tau": (5,), "sigma": (5,), "mu": (5,), "a": (5, G), "group_mean": (5, G), "y": (5, len(GROUP))}
    default = Predictive(random_intercepts, guide=guide, params=params, num_samples=3)(jax.random.PRNGKey(1), GROUP)
    assert set(default) == {"group_mean", "y"}
    median = guide.median(params)
    theta = {k: median[k] for k in ("tau", "sigma")}
    mean = dense_conditional(random_intercepts, ("mu", "a"), theta, (GROUP,), {"y": Y})[0]
    np.testing.assert_allclose(np.concatenate([np.ravel(median["mu"]), median["a"]]), mean, rtol=1e-7)
    np.testing.assert_allclose(median["tau"], np.exp(params["auto_loc"][0]), rtol=1e-12)
    quant = guide.quantiles(params, [0.1, 0.5, 0.9], num_samples=400)
    assert quant["a"].shape == (3, G) and quant["tau"].shape == (3,)
    np.testing.assert_allclose(quant["tau"][1], median["tau"], rtol=1e-12)
    assert np.all(np.diff(np.asarray(quant["a"]), axis=0) > 0)


def tensor_model(I, J, T, y=None):
    """A tiny version of examples/tensor_model.py: plates at dims -2 and -1, GaussianRandomWalk
    rows, .to_event on the likelihood, and an index array."""
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(1.0))
    step = numpyro.sample("step", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    plate_i = numpyro.plate("i", I, dim=-2)
    plate_j = numpyro.plate("j", J, dim=-1)
    z = numpyro.sample("z", dist.GaussianRandomWalk(step, num_steps=T))
    with plate_i:
        a = numpyro.sample("a", dist.Normal(0.0, sigma_a))  # (I, 1)
        A = numpyro.sample("A", dist.GaussianRandomWalk(step, num_steps=T))  # (I, 1, T)
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    cov = jnp.arange(J) / J
    loc = mu + a[..., None] + z + A + (w[jnp.arange(J) % 2] * cov)[:, None]
    with plate_i, plate_j:
        numpyro.sample("y", dist.Normal(loc, sigma).to_event(1), obs=y)


def test_plates_random_walks_to_event_index_arrays(x64):
    I, J, T = 3, 2, 4
    y = np.random.default_rng(2).normal(size=(I, J, T))
    block = GaussianBlock((BlockSite("mu", (), "Normal"), BlockSite("z", (T,), "GaussianRandomWalk"),
                           BlockSite("a", (I, 1), "Normal"), BlockSite("A", (I, 1, T), "GaussianRandomWalk"),
                           BlockSite("w", (2,), "Normal")),
                          (BlockLikelihood("y", "Normal", "identity"),), ("sigma_a", "step", "sigma"))
    guide = AutoHybrid(tensor_model, block=block, init_scale=1e-9)
    svi = SVI(tensor_model, guide, numpyro.optim.Adam(0.01), HybridELBO(2))
    state = svi.init(jax.random.PRNGKey(0), I, J, T, y=y)
    state, loss = jax.jit(lambda st: svi.update(st, I, J, T, y=y))(state)
    assert np.isfinite(float(loss))
    params = svi.get_params(state)
    draws = guide.sample_posterior(jax.random.PRNGKey(1), params, I, J, T, y=y, sample_shape=(3000,))
    assert {k: v.shape[1:] for k, v in draws.items()} == {
        "sigma_a": (), "step": (), "sigma": (), "mu": (), "z": (T,), "a": (I, 1), "A": (I, 1, T), "w": (2,)}
    theta = {k: guide.median(params)[k] for k in ("sigma_a", "step", "sigma")}  # q(theta) is a point here
    names = ["mu", "z", "a", "A", "w"]
    mean, cov, _ = dense_conditional(tensor_model, names, theta, (I, J, T), {"y": y})
    flat = flat_draws(draws, names)
    np.testing.assert_array_less(np.abs(flat.mean(0) - mean), 4.5 * np.sqrt(np.diag(cov) / len(flat)))


def subsampled(y=None):
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 4):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    with numpyro.plate("data", 8, subsample_size=4) as idx:
        numpyro.sample("y", dist.Normal(a[idx % 4], 1.0), obs=y[idx])


def crossed_bernoulli(ii, jj, y=None):
    s_a = numpyro.sample("s_a", dist.HalfNormal(1.0))
    with numpyro.plate("i", 5):
        a = numpyro.sample("a", dist.Normal(0.0, s_a))
    with numpyro.plate("j", 4):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", len(ii)):
        numpyro.sample("y", dist.Bernoulli(logits=a[ii] + b[jj]), obs=y)


def test_laplace_block_carries_its_mode_between_steps(x64):
    """The last conditional mode is SVI's mutable state: the warm start of the next step's Newton."""
    ii, jj = np.repeat(np.arange(5), 4), np.tile(np.arange(4), 5)
    y = (np.random.default_rng(3).random(20) < 0.6).astype(float)
    block = GaussianBlock((BlockSite("a", (5,), "Normal"), BlockSite("b", (4,), "Normal")),
                          (BlockLikelihood("y", "Bernoulli", "logit"),), ("s_a",))
    guide = AutoHybrid(crossed_bernoulli, block=block, init_scale=1e-6)
    svi = SVI(crossed_bernoulli, guide, NaturalGradient(guide), HybridELBO(2))
    state = svi.init(jax.random.PRNGKey(0), ii, jj, y=y)
    assert set(state.mutable_state) == {guide.mode_name}
    params = svi.get_params(state)
    state, _ = jax.jit(lambda st: svi.update(st, ii, jj, y=y))(state)
    # q(theta) is a point (sd 1e-6): the carried mode is the conditional mode at its median.
    expected = guide.median(params)
    for name in ("a", "b"):
        np.testing.assert_allclose(state.mutable_state[guide.mode_name][name], expected[name], atol=1e-5)
        assert np.any(np.asarray(expected[name]) != 0)


# ----------------------------------------------------------------------------- Laplace blocks: weighted z draws
# Two effects, Bernoulli logits, few and lopsided observations: the Laplace Gaussian is visibly off.
# The model and data of ``python -m benchmarks.bench_laplace_weights_small``, which checks the weights themselves.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.bench_laplace_weights_small import BLOCK as TWO_BLOCK, GROUP as TWO_GROUP, Y as TWO_Y, two_effects  # noqa: E402


def two_effects_log_marginal(u):
    """log p(y, s) + log |ds/du| at u = log s, the two effects integrated out on a grid (they are
    independent given s, so the 2-D integral is a product of 1-D ones)."""
    s = np.exp(u)
    a = np.linspace(-40.0, 40.0, 160001)
    out = scipy.stats.halfnorm(scale=2.0).logpdf(s) + u
    for g in (0, 1):
        k, n = TWO_Y[TWO_GROUP == g].sum(), (TWO_GROUP == g).sum()
        log_f = scipy.stats.norm(0.0, s).logpdf(a) + k * a - n * np.logaddexp(0.0, a)
        out += scipy.special.logsumexp(log_f) + np.log(a[1] - a[0])
    return out


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_weighted_block_draws_give_the_exact_fisher_gradient_of_a_laplace_block(x64, method):
    """With q(theta) a point, -d loss / d loc is the Fisher-identity gradient at u = log s: with K weighted
    draws it matches the finite-difference gradient of the exact log p(y, s) (numerical integration);
    with one plain draw of the Laplace Gaussian (K = 1) it is measurably off."""
    guide = AutoHybrid(two_effects, block=TWO_BLOCK, method=method)
    handlers.seed(guide, 0)(TWO_GROUP, y=TWO_Y)  # set up on concrete inputs, outside the jit below
    u = 0.0  # s = 1
    params = {"auto_loc": jnp.array([u]), "auto_log_scale": jnp.array([-20.0])}

    def gradients(num_draws, n):
        elbo = HybridELBO(1, block_draws=num_draws)

        def one(key):
            return -jax.grad(lambda p: elbo.loss(key, p, two_effects, guide, TWO_GROUP, y=TWO_Y))(params)["auto_loc"][0]
        return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(7), n)))

    h = 1e-4
    exact = (two_effects_log_marginal(u + h) - two_effects_log_marginal(u - h)) / (2 * h)
    n = 4000
    weighted, plain = gradients(32, n // 8), gradients(1, n)
    se_weighted = weighted.std() / np.sqrt(weighted.size)
    se_plain = plain.std() / np.sqrt(plain.size)
    assert abs(weighted.mean() - exact) < 4 * se_weighted, (weighted.mean(), exact, se_weighted)
    assert abs(plain.mean() - exact) > 8 * se_plain, (plain.mean(), exact, se_plain)
    assert HybridELBO().draws_per_theta(guide) == hybrid.LAPLACE_BLOCK_DRAWS


def two_effects_conditional_moments(s):
    """Mean and sd of each effect a_g given s and y (they are independent given s), by numerical integration."""
    a = np.linspace(-40.0, 40.0, 160001)
    out = []
    for g in (0, 1):
        k, n = TWO_Y[TWO_GROUP == g].sum(), (TWO_GROUP == g).sum()
        log_f = scipy.stats.norm(0.0, s).logpdf(a) + k * a - n * np.logaddexp(0.0, a)
        f = np.exp(log_f - log_f.max())
        f /= f.sum()
        mean = f @ a
        out.append((mean, np.sqrt(f @ (a - mean) ** 2)))
    return np.array(out).T


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_sample_posterior_resamples_laplace_draws_towards_the_exact_conditional(x64, method):
    """theta fixed (q(theta) a point at s = 1): the z draws of sample_posterior, K Laplace proposals per draw
    resampled by weight, have the mean and sd of p(a | s, y) (numerical integration) within Monte Carlo
    error; one plain Laplace draw (block_draws=1) is measurably off. Predictive draws z the same way."""
    guide = AutoHybrid(two_effects, block=TWO_BLOCK, method=method)
    handlers.seed(guide, 0)(TWO_GROUP, y=TWO_Y)
    params = {"auto_loc": jnp.array([0.0]), "auto_log_scale": jnp.array([-30.0])}
    (mean0, mean1), (sd0, sd1) = exact = two_effects_conditional_moments(1.0)
    n = 20000

    def moments(a):
        a = np.asarray(a)
        mean, sd = a.mean(0), a.std(0)
        return np.array([mean, sd]), np.array([sd / np.sqrt(n), sd / np.sqrt(2 * n)])

    def draws(block_draws):
        return guide.sample_posterior(jax.random.PRNGKey(1), params, TWO_GROUP, y=TWO_Y, sample_shape=(n,),
                                      block_draws=block_draws)["a"]

    resampled, se = moments(draws(64))
    assert np.all(np.abs(resampled - exact) < 4 * se), (resampled, exact, se)
    plain, se = moments(draws(1))
    assert np.abs(plain - exact)[0, 0] > 8 * se[0, 0], (plain, exact, se)  # the Laplace mode sits low
    # The default is the loss's (LAPLACE_BLOCK_DRAWS, 16): its O(1/K) bias is a fifth of the plain draw's.
    default, se = moments(draws(None))
    np.testing.assert_array_equal(default, moments(draws(hybrid.LAPLACE_BLOCK_DRAWS))[0])
    assert np.abs(default - exact)[0, 0] < 0.3 * np.abs(plain - exact)[0, 0], (default, plain, exact)
    pred = Predictive(two_effects, guide=guide, params=params, num_samples=n, return_sites=["a"])(
        jax.random.PRNGKey(2), TWO_GROUP, y=TWO_Y)
    predicted, se = moments(pred["a"])
    assert np.abs(predicted - exact)[0, 0] < 0.3 * np.abs(plain - exact)[0, 0], (predicted, plain, exact)
    assert set(pred) == {"a"}


@pytest.mark.parametrize("which", ["normal", "laplace"])
def test_dense_path_factors_one_matrix_at_a_time(x64, which):
    """The compiled SVI step (4 particles, each factoring H; the Laplace block's weighted draws) and
    sample_posterior with resample_theta (a log_marginal per theta proposal) contain no batched Cholesky or
    triangular solve: two in one program can deadlock XLA's pool (helpers.linear_algebra_operands)."""
    if which == "normal":
        model, block, args, kwargs = random_intercepts, RI_BLOCK, (GROUP,), {"y": Y}
    else:
        model, block, args, kwargs = two_effects, TWO_BLOCK, (TWO_GROUP,), {"y": TWO_Y}
    guide = AutoHybrid(model, block=block)
    svi = SVI(model, guide, numpyro.optim.Adam(0.01), HybridELBO(4))
    state = svi.init(jax.random.PRNGKey(0), *args, **kwargs)
    assert guide.conditional.dense
    step = jax.make_jaxpr(lambda st: svi.update(st, *args, **kwargs))(state)
    draws = jax.make_jaxpr(lambda key, params: guide.sample_posterior(
        key, params, *args, sample_shape=(8,), resample_theta=4, **kwargs))(jax.random.PRNGKey(1), svi.get_params(state))
    for jaxpr in (step, draws):
        found = linear_algebra_operands(jaxpr.jaxpr)
        assert {name for name, _ in found} == {"cholesky", "triangular_solve"}
        assert all(len(shape) == 2 for _, shapes in found for shape in shapes), found


def test_bad_input_one_line(x64):
    with pytest.raises(InputError, match="theta_guide='diag'"):
        AutoHybrid(random_intercepts, theta_guide="diag")
    block = GaussianBlock((BlockSite("a", (4,), "Normal"),), (BlockLikelihood("y", "Normal", "identity"),), ("tau",))
    guide = AutoHybrid(subsampled, block=block)
    with pytest.raises(ModelError, match="plate 'data' is subsampled"):
        SVI(subsampled, guide, numpyro.optim.Adam(0.01), HybridELBO()).init(jax.random.PRNGKey(0), y=np.zeros(8))
    with pytest.raises(InputError, match="theta_guide='lowrank'"):
        NaturalGradient(AutoHybrid(random_intercepts, theta_guide="lowrank"))
    with pytest.raises(InputError, match=r"HybridELBO: block_draws \(z draws per theta draw\) must be a positive "
                                         r"integer or None, got 0"):
        HybridELBO(4, block_draws=0)
    assert HybridELBO(4, block_draws=np.int64(3)).block_draws == 3
    with pytest.raises(InputError, match="fit_hybrid: block_draws"):
        autoreparam.fit_hybrid(random_intercepts, GROUP, y=Y, block_draws=True)
    with pytest.raises(InputError, match="AutoHybrid.sample_posterior: block_draws"):
        fitted_guide = AutoHybrid(random_intercepts, block=RI_BLOCK)
        handlers.seed(fitted_guide, 0)(GROUP, y=Y)
        fitted_guide.sample_posterior(jax.random.PRNGKey(0), {}, GROUP, y=Y, block_draws=0)
    with pytest.raises(InputError, match="AutoHybrid.weighted_block_draws: block_draws"):
        with AutoHybrid(random_intercepts).weighted_block_draws(0):
            pass
    with pytest.raises(InputError, match="must be an autoreparam.AutoHybrid"):
        HybridELBO().loss(jax.random.PRNGKey(0), {}, random_intercepts, AutoNormal(random_intercepts), GROUP, y=Y)
    with pytest.raises(ModelError, match="likelihood 'y' of the block is not observed"):
        SVI(random_intercepts, AutoHybrid(random_intercepts, block=RI_BLOCK), numpyro.optim.Adam(0.01),
            HybridELBO()).init(jax.random.PRNGKey(0), GROUP)
    wrong = GaussianBlock((BlockSite("a", (G + 1,), "Normal"),), RI_BLOCK.likelihoods, ("tau", "sigma", "mu"))
    with pytest.raises(ModelError, match="block site 'a' has shape"):
        SVI(random_intercepts, AutoHybrid(random_intercepts, block=wrong), numpyro.optim.Adam(0.01),
            HybridELBO()).init(jax.random.PRNGKey(0), GROUP, y=Y)


def test_warns_once_in_float32():
    # Fresh copies: the module's float64 fits already converted GROUP under float64, and JAX 0.10
    # caches that conversion by identity (the bug inputs_for_float64 keeps away from users' arrays).
    group, y = GROUP.copy(), Y.copy()
    guide = AutoHybrid(fixed_theta, block=FT_BLOCK)
    svi = SVI(fixed_theta, guide, numpyro.optim.Adam(0.01), HybridELBO())
    with jax.enable_x64(False):  # the module's x64 fixture may be active
        with pytest.warns(UserWarning, match="float64 is disabled"):
            state = svi.init(jax.random.PRNGKey(0), group, y=y)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            jax.jit(lambda st: svi.update(st, group, y=y))(state)


def test_laplace_block_in_float32_with_vectorized_particles():
    guide = AutoHybrid(two_effects, block=TWO_BLOCK, method="dense")
    group, y = TWO_GROUP.copy(), TWO_Y.copy()
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handlers.seed(guide, 0)(group, y=y)
        params = {"auto_loc": jnp.array([0.0]), "auto_log_scale": jnp.array([-1.0])}
        grad = jax.grad(lambda p: HybridELBO(2, block_draws=2).loss(jax.random.PRNGKey(0), p, two_effects, guide,
                                                                    group, y=y))(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grad.values())


def test_fit_hybrid_one_line():
    group = GROUP.copy()  # never used under float64 by this module's other tests
    with jax.enable_x64(False):  # the module's x64 fixture may be active
        fit = autoreparam.fit_hybrid(random_intercepts, group, y=Y, block=RI_BLOCK, steps=300, num_samples=200)
        assert not jax.config.jax_enable_x64  # the fit's float64 was local
        # The caller's index array still works in float32: it raised "int64, int32" when fit_hybrid
        # ran the model on the array itself (JAX caches its conversion by identity, not precision).
        assert jnp.zeros(G)[group].dtype == jnp.float32
    assert set(fit.samples) == {"tau", "sigma", "mu", "a", "group_mean"}
    assert fit.samples["a"].shape == (200, G) and fit.samples["a"].dtype == np.float64
    assert np.isfinite(fit.elbo) and len(fit.losses) == 300
    assert fit.resample_theta == 4  # a dense block: the draws of theta are importance-resampled by default
    with pytest.raises(InputError, match="resample_theta must be 'auto' or an integer >= 0, got -1"):
        autoreparam.fit_hybrid(random_intercepts, GROUP, y=Y, block=RI_BLOCK, resample_theta=-1)


def test_resampled_theta_corrects_a_poor_q(fitted, quadrature):
    """SIR with p(y, theta) / q(theta) moves the draws of theta from a shifted q to the posterior."""
    guide, result = fitted
    q = quadrature
    shifted = {**result.params, "auto_loc": jnp.asarray(q["post_mean"] + 1.0 * q["post_sd"])}
    n = 2000
    plain = guide.sample_posterior(jax.random.PRNGKey(2), shifted, sample_shape=(n,))
    sir = guide.sample_posterior(jax.random.PRNGKey(2), shifted, sample_shape=(n,), resample_theta=8)
    for k, name in enumerate(("tau", "sigma")):
        err_plain = abs(np.log(plain[name]).mean() - q["post_mean"][k]) / q["post_sd"][k]
        err_sir = abs(np.log(sir[name]).mean() - q["post_mean"][k]) / q["post_sd"][k]
        assert err_plain > 0.8 and err_sir < 0.3, (name, err_plain, err_sir)
    assert sir["a"].shape == (n, G) and sir["group_mean"].shape == (n, G)


def test_pooled_resampling_on_the_cg_path_corrects_a_poor_q(fitted, quadrature, monkeypatch):
    """On the CG path the sparse precision gives log p(y, theta) exactly: a pool of proposals from a
    shifted q, resampled by weight, moves theta to the posterior (by quadrature), and the training
    loss keeps its cheap surrogate value."""
    guide = AutoHybrid(random_intercepts, block=RI_BLOCK, dense_below=1)
    svi = SVI(random_intercepts, guide, NaturalGradient(guide), HybridELBO(2))
    svi.init(jax.random.PRNGKey(0), GROUP, y=Y)
    assert not guide.conditional.dense and guide.conditional.precision is None  # not built for training
    assert guide.exact_marginal and guide.conditional.precision is not None
    assert not HybridELBO().reports_elbo(guide) and HybridELBO(exact_value=True).reports_elbo(guide)
    theta = {"tau": 0.9, "sigma": 0.6}
    np.testing.assert_allclose(float(guide.log_marginal(theta)),
                               float(dense_conditional(random_intercepts, ("mu", "a"), theta, (GROUP,), {"y": Y})[2]),
                               rtol=1e-10)
    q = quadrature
    shifted = {**fitted[1].params, "auto_loc": jnp.asarray(q["post_mean"] + 1.0 * q["post_sd"])}
    n, pool = 2000, 4000
    plain = guide.sample_posterior(jax.random.PRNGKey(2), shifted, sample_shape=(n,))
    sir, info = guide.sample_posterior(jax.random.PRNGKey(2), shifted, sample_shape=(n,), theta_pool=pool,
                                       return_info=True)
    for k, name in enumerate(("tau", "sigma")):
        err_plain = abs(np.log(plain[name]).mean() - q["post_mean"][k]) / q["post_sd"][k]
        err_sir = abs(np.log(sir[name]).mean() - q["post_mean"][k]) / q["post_sd"][k]
        assert err_plain > 0.8 and err_sir < 0.3, (name, err_plain, err_sir)
    assert int(info["pool_size"]) == pool and 1.0 <= float(info["pool_ess"]) < pool
    assert sir["a"].shape == (n, G)
    # Each output draw gets its own z, also where the pool repeats a theta.
    _, first = np.unique(np.asarray(sir["tau"]), return_index=True)
    assert len(first) < n and len(np.unique(np.asarray(sir["a"][:, 0]))) == n
    with pytest.raises(InputError, match="theta_pool must be a positive integer or None, got 0"):
        guide.sample_posterior(jax.random.PRNGKey(2), shifted, sample_shape=(4,), theta_pool=0)
    # A pool without one finite weight is an error, not n copies of the first proposal.
    monkeypatch.setattr(guide.conditional, "log_marginal", lambda theta, init=None: -jnp.inf)
    with pytest.raises(ModelError, match="none of the 3 theta proposals has a finite"):
        guide.sample_posterior(jax.random.PRNGKey(2), shifted, sample_shape=(4,), theta_pool=3)


def test_fit_hybrid_pools_theta_on_the_cg_path(monkeypatch):
    monkeypatch.setattr(hybrid, "HYBRID_DENSE_BELOW", 1)
    monkeypatch.setattr(autoreparam.fit, "CG_THETA_POOL", 300)
    with jax.enable_x64(False):
        fit = autoreparam.fit_hybrid(random_intercepts, GROUP.copy(), y=Y, block=RI_BLOCK, steps=200, num_samples=100)
    assert not fit.guide.conditional.dense
    assert fit.resample_theta == 4 and fit.theta_pool == 300  # 4 per draw, capped
    assert 1.0 <= fit.theta_pool_ess <= 300
    with pytest.raises(InputError, match="fit_hybrid: theta_pool must be a positive integer or None, got 0"):
        autoreparam.fit_hybrid(random_intercepts, GROUP, y=Y, block=RI_BLOCK, theta_pool=0)


def no_block(y=None):
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    numpyro.sample("y", dist.Normal(0.0, sigma).expand([3]).to_event(1), obs=y)


def test_no_gaussian_block_names_the_sites(x64):
    guide = AutoHybrid(no_block)
    svi = SVI(no_block, guide, numpyro.optim.Adam(0.01), HybridELBO())
    with pytest.raises(ModelError, match=r"AutoHybrid: no conditionally Gaussian block: 'sigma' ") as exc:
        svi.init(jax.random.PRNGKey(0), y=np.zeros(3))
    assert "\n" not in str(exc.value)


def test_block_too_large_for_the_dense_solver(x64, monkeypatch):
    import autoreparam.conditional as conditional

    monkeypatch.setattr(conditional, "DENSE_LIMIT", 5)
    guide = AutoHybrid(random_intercepts, block=RI_BLOCK, method="dense")
    with pytest.raises(InputError, match=r"block \(mu, a\) has size 11, above DENSE_LIMIT=5"):
        SVI(random_intercepts, guide, numpyro.optim.Adam(0.01), HybridELBO()).init(jax.random.PRNGKey(0), GROUP, y=Y)


def test_compare_cli_has_a_hybrid_column(capsys, monkeypatch, examples_dir):
    import os

    import autoreparam.compare as compare_module
    from autoreparam.cli import main

    calls = []

    def fit(label, model, guide_name, args, kwargs, steps, lr, seed, progress, sites):
        calls.append((label, guide_name))
        return compare_module.FitSummary(label, -35.0, 0.1, 1.0, np.zeros(steps), {n: (1.0, 2.0) for n in sites})

    def fit_hybrid(label, model, args, kwargs, steps, seed, progress, sites):
        calls.append((label, "hybrid"))
        return compare_module.FitSummary(label, -31.0, 0.01, 2.0, np.zeros(steps), {n: (3.0, 4.0) for n in sites})

    monkeypatch.setattr(compare_module, "_fit", fit)
    monkeypatch.setattr(compare_module, "_fit_hybrid", fit_hybrid)
    code = main(["compare", os.path.join(examples_dir, "eight_schools.py"), "--guide", "hybrid", "--steps", "5",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert calls == [("original", "AutoNormal"), ("reparameterized", "AutoNormal"), ("hybrid", "hybrid")]
    table = out.split("elements):\n", 1)[1].splitlines()
    assert table[0].split() == ["site", "mean", "orig", "mean", "reparam", "mean", "hybrid", "sd", "orig", "sd",
                                "reparam", "sd", "hybrid"]
    assert table[1].split() == ["mu", "1.000", "1.000", "3.000", "2.000", "2.000", "4.000"]
    assert "hybrid                -31.00 +- 0.01" in out


def test_numpyros_own_elbos_take_the_guide_and_agree_with_hybrid_elbo(x64):
    """With K = 1, Trace_ELBO and TraceMeanField_ELBO give HybridELBO's surrogate value and gradient in
    expectation. They refused the guide for a block site in a plate (z was emitted with all its dims as
    event dims: "Model and guide event_dims disagree at site 'a': 0 vs 1")."""
    from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO

    guide = AutoHybrid(random_intercepts, block=RI_BLOCK)
    svi = SVI(random_intercepts, guide, numpyro.optim.Adam(0.01), HybridELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0), GROUP, y=Y))

    def per_draw(elbo, seed):
        """Value and flat gradient of one-particle losses: (draws, 1 + parameters)."""
        def one(key):
            value, grad = jax.value_and_grad(lambda p: elbo.loss(key, p, random_intercepts, guide, GROUP, y=Y))(params)
            return jnp.concatenate([value[None]] + [jnp.ravel(grad[k]) for k in sorted(grad)])
        return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(seed), 2000)))

    want = per_draw(HybridELBO(exact_value=False), 1)
    for seed, elbo in enumerate((Trace_ELBO(), TraceMeanField_ELBO()), 2):
        got = per_draw(elbo, seed)
        se = np.hypot(got.std(0), want.std(0)) / np.sqrt(len(got))
        np.testing.assert_array_less(np.abs(got.mean(0) - want.mean(0)), 5 * se + 1e-9)


def test_nan_data_is_named_before_numpyros_set_up(x64):
    """NaN in the data: NumPyro's set-up answered "Cannot find valid initial parameters"; the guide names
    the site and the value, as the analysis does."""
    y = np.array(Y)
    y[3] = np.nan
    message = r"observed site 'y' has 1 NaN value \(first at index 3\); drop them, or mask them"
    with pytest.raises(ModelError, match=message):
        SVI(random_intercepts, AutoHybrid(random_intercepts, block=RI_BLOCK), numpyro.optim.Adam(0.01),
            HybridELBO()).init(jax.random.PRNGKey(0), GROUP, y=y)
    with pytest.raises(ModelError, match=message):
        autoreparam.fit_hybrid(random_intercepts, GROUP, y=y, steps=2)


def test_numpy_scalars_are_counts_and_bad_ones_are_named(x64):
    """Counts from numpy (np.int64 steps, an np.float32 init_scale) are accepted as Python's are; a
    non-optimizer, a NaN scale and a model that raises get one line each (optax's ImportError, a
    bare AssertionError from NumPyro's plate before)."""
    fit = autoreparam.fit_hybrid(random_intercepts, GROUP, y=Y, block=RI_BLOCK, steps=np.int64(3),
                                 num_particles=np.int32(2), init_scale=np.float32(0.2), num_samples=np.int64(5),
                                 resample_theta=np.int64(0))
    assert fit.samples["a"].shape == (5, G)
    with pytest.raises(InputError, match=r"fit_hybrid: optimizer=3: expected 'natural', 'adam' or a NumPyro optimizer"):
        autoreparam.fit_hybrid(random_intercepts, GROUP, y=Y, optimizer=3)
    with pytest.raises(InputError, match=r"fit_hybrid: num_particles must be a positive integer, got 0"):
        autoreparam.fit_hybrid(random_intercepts, GROUP, y=Y, num_particles=0)
    with pytest.raises(InputError, match=r"AutoHybrid: init_scale must be a positive number, got nan"):
        AutoHybrid(random_intercepts, init_scale=float("nan"))
    with pytest.raises(ModelError, match=r"AutoHybrid: the model raised AssertionError: size of plate should be "
                                         r"positive when run on these inputs"):
        autoreparam.fit_hybrid(random_intercepts, GROUP[:0], y=Y[:0], block=RI_BLOCK, steps=2)
