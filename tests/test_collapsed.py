"""Collapsed NUTS (the Gaussian block integrated out) against dense algebra and NUTS on the model."""

import importlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.stats
from numpyro import handlers
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS
from numpyro.infer.reparam import LocScaleReparam

import autoreparam
from autoreparam.block import BlockLikelihood, BlockSite, GaussianBlock
from autoreparam.collapsed import AUTO_COLLAPSED_LIMIT, COLLAPSED_LIMIT, CollapsedPosterior, collapsed_mcmc
from autoreparam.errors import InputError, ModelError
from helpers import linear_algebra_operands

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# ------------------------------------------------------------------ a small crossed Normal model

I, J = 4, 3
RNG = np.random.default_rng(1)
CELLS = np.array([(i, j) for i in range(I) for j in range(J)] * 3)
II, JJ = CELLS[:, 0], CELLS[:, 1]
Y = (1.0 + RNG.normal(0, 1.0, I)[II] + RNG.normal(0, 0.7, J)[JJ] + RNG.normal(0, 0.5, len(II))).astype(np.float32)


def crossed(ii, jj, y):
    s_a = numpyro.sample("s_a", dist.HalfNormal(1.0))
    s_b = numpyro.sample("s_b", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("i", I):
        a = numpyro.sample("a", dist.Normal(mu, s_a))
    with numpyro.plate("j", J):
        b = numpyro.sample("b", dist.Normal(0.0, s_b))
    numpyro.deterministic("spread", a.max() - a.min())
    with numpyro.plate("n", len(ii)):
        numpyro.sample("y", dist.Normal(a[ii] + b[jj], sigma), obs=y)


CROSSED_BLOCK = GaussianBlock(
    (BlockSite("mu", (), "Normal"), BlockSite("a", (I,), "Normal"), BlockSite("b", (J,), "Normal")),
    (BlockLikelihood("y", "Normal", "identity"),), ("s_a", "s_b", "sigma"))


def dense_log_marginal(s_a, s_b, sigma):
    """log p(y, theta) by hand: z = (mu, a, b) is Gaussian a priori, y = J z + noise."""
    prior_cov = np.zeros((1 + I + J, 1 + I + J))
    prior_cov[:1 + I, :1 + I] = 25.0  # mu and every a_i share mu's variance
    prior_cov[1:1 + I, 1:1 + I] += s_a ** 2 * np.eye(I)
    prior_cov[1 + I:, 1 + I:] = s_b ** 2 * np.eye(J)
    design = np.zeros((len(II), 1 + I + J))
    design[np.arange(len(II)), 1 + II] = 1.0
    design[np.arange(len(II)), 1 + I + JJ] = 1.0
    cov_y = design @ prior_cov @ design.T + sigma ** 2 * np.eye(len(II))
    log_lik = scipy.stats.multivariate_normal(np.zeros(len(II)), cov_y).logpdf(Y.astype(np.float64))
    return log_lik + sum(scipy.stats.halfnorm.logpdf(v) for v in (s_a, s_b, sigma))


@pytest.fixture(scope="module")
def crossed_posterior():
    return CollapsedPosterior(crossed, CROSSED_BLOCK, (II, JJ, Y))




def test_potential_is_the_dense_gaussian_integral_and_its_gradient_matches_finite_differences(crossed_posterior):
    u = {"s_a": 0.3, "s_b": -0.4, "sigma": -0.7}
    expected = dense_log_marginal(*np.exp([u["s_a"], u["s_b"], u["sigma"]])) + sum(u.values())  # + log-Jacobians
    with jax.enable_x64(True):
        u64 = {k: jnp.asarray(v, jnp.float64) for k, v in u.items()}
        potential = jax.jit(crossed_posterior.potential_fn)
        value = float(potential(u64))
        grad = jax.jit(jax.grad(crossed_posterior.potential_fn))(u64)
        h = 1e-5
        for name in u:
            up = float(potential({**u64, name: u64[name] + h}))
            down = float(potential({**u64, name: u64[name] - h}))
            np.testing.assert_allclose(float(grad[name]), (up - down) / (2 * h), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(value, -expected, rtol=1e-10)
    # The index arrays a[ii] + b[jj] give fixed sparse residual Jacobians: H is assembled, not built from HVPs.
    assert crossed_posterior.conditional.precision is not None


def potential_matches(posterior, u, expected_log_density):
    """The potential equals -expected_log_density (u: unconstrained) and its gradient matches finite differences."""
    with jax.enable_x64(True):
        u64 = {k: jnp.asarray(v, jnp.float64) for k, v in u.items()}
        value_and_grad = jax.jit(jax.value_and_grad(posterior.potential_fn))
        value, grad = value_and_grad(u64)
        h = 1e-5
        for name in u:
            up = float(value_and_grad({**u64, name: u64[name] + h})[0])
            down = float(value_and_grad({**u64, name: u64[name] - h})[0])
            np.testing.assert_allclose(float(grad[name]), (up - down) / (2 * h), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(value), -expected_log_density, rtol=1e-10)


T_STEPS = 5
TT = np.array([0, 1, 1, 2, 4, 4, 3, 0])
Y_WALK = np.array([0.1, 0.4, 0.2, 0.9, 1.5, 1.1, 1.0, -0.2], np.float32)


def walk(tt, y):
    step = numpyro.sample("step", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    z = numpyro.sample("z", dist.GaussianRandomWalk(step, num_steps=T_STEPS))
    with numpyro.plate("n", len(tt)):
        numpyro.sample("y", dist.Normal(z[tt], sigma), obs=y)


def test_random_walk_block_has_a_tridiagonal_precision_and_the_exact_marginal():
    block = GaussianBlock((BlockSite("z", (T_STEPS,), "GaussianRandomWalk"),),
                          (BlockLikelihood("y", "Normal", "identity"),), ("step", "sigma"))
    posterior = CollapsedPosterior(walk, block, (TT, Y_WALK))
    assert posterior.conditional.precision is not None
    u = {"step": -0.3, "sigma": -0.8}
    step, sigma = np.exp([u["step"], u["sigma"]])
    t = np.arange(T_STEPS)
    prior_cov = step ** 2 * (np.minimum.outer(t, t) + 1)  # z_t = sum of t + 1 independent steps
    cov_y = prior_cov[np.ix_(TT, TT)] + sigma ** 2 * np.eye(len(TT))
    expected = (scipy.stats.multivariate_normal(np.zeros(len(TT)), cov_y).logpdf(Y_WALK.astype(np.float64))
                + scipy.stats.halfnorm.logpdf(step) + scipy.stats.halfnorm.logpdf(sigma) + sum(u.values()))
    potential_matches(posterior, u, expected)


def scaled_effects(ii, y):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("i", I):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", len(ii)):
        numpyro.sample("y", dist.Normal(s * a[ii], sigma), obs=y)


def test_theta_dependent_jacobian_falls_back_to_the_hvp_path_and_stays_exact():
    block = GaussianBlock((BlockSite("a", (I,), "Normal"),), (BlockLikelihood("y", "Normal", "identity"),),
                          ("s", "sigma"))
    posterior = CollapsedPosterior(scaled_effects, block, (II, Y))
    # d(y's residual)/da = s: H from a Jacobian read at one theta would be wrong at another.
    assert posterior.conditional.precision is None
    assert "depends on theta" in posterior.conditional.precision_note
    u = {"s": 0.2, "sigma": -0.5}
    s_, sigma = np.exp([u["s"], u["sigma"]])
    design = np.zeros((len(II), I))
    design[np.arange(len(II)), II] = s_
    cov_y = design @ design.T + sigma ** 2 * np.eye(len(II))
    expected = (scipy.stats.multivariate_normal(np.zeros(len(II)), cov_y).logpdf(Y.astype(np.float64))
                + scipy.stats.halfnorm.logpdf(s_) + scipy.stats.halfnorm.logpdf(sigma) + sum(u.values()))
    potential_matches(posterior, u, expected)


def test_float32_caller_gets_the_float64_gradient(crossed_posterior):
    u = {"s_a": jnp.float32(0.3), "s_b": jnp.float32(-0.4), "sigma": jnp.float32(-0.7)}
    value, grad = jax.jit(jax.value_and_grad(crossed_posterior.potential_fn))(u)
    assert value.dtype == jnp.float32 and grad["s_a"].dtype == jnp.float32
    with jax.enable_x64(True):
        expected = jax.jit(jax.grad(crossed_posterior.potential_fn))(
            {k: jnp.asarray(float(v), jnp.float64) for k, v in u.items()})
    for name in u:
        np.testing.assert_allclose(float(grad[name]), float(expected[name]), rtol=1e-4)


@pytest.mark.parametrize("which", ["sparse", "hvp"])
def test_z_draws_factor_one_matrix_at_a_time(crossed_posterior, which):
    # jaxlib's batched LAPACK kernels wait inside XLA's thread pool for pieces scheduled on that pool;
    # two of them at once deadlocked complete() on tensor_small. The draws must not batch them.
    if which == "sparse":
        posterior = crossed_posterior
    else:
        block = GaussianBlock((BlockSite("a", (I,), "Normal"),), (BlockLikelihood("y", "Normal", "identity"),),
                              ("s", "sigma"))
        posterior = CollapsedPosterior(scaled_effects, block, (II, Y))
    theta = {n: np.ones((posterior._chunk,) + np.shape(v)) for n, v in posterior._theta_example.items()}
    with jax.enable_x64(True):
        jaxpr = jax.make_jaxpr(posterior._complete_chunk_fn)(jax.random.PRNGKey(0), np.int32(0), theta)
    found = linear_algebra_operands(jaxpr.jaxpr)
    assert all(len(shape) == 2 for _, shapes in found for shape in shapes), found
    if which == "sparse":
        # A diagonal elimination and a Schur complement of a few values: unrolled, no LAPACK call at all.
        assert posterior.conditional.precision.vectorizable and not found, found
    else:
        assert {name for name, _ in found} == {"cholesky", "triangular_solve"}


# ------------------------------------------------------------------ agreement with NUTS


def moments(draws):
    """Per element: mean, sd, and their Monte Carlo standard errors (ESS-based), from (chains, draws, ...)."""
    x = np.asarray(draws, np.float64)
    flat = x.reshape((-1,) + x.shape[2:])
    ess = np.maximum(np.asarray(effective_sample_size(x)), 1.0)
    mean, sd = flat.mean(0), flat.std(0, ddof=1)
    sd_se = np.sqrt(np.var((flat - mean) ** 2, axis=0) / ess) / (2 * sd)
    return mean, sd, sd / np.sqrt(ess), sd_se


def assert_agree(samples, reference, sites, k=5.0):
    """Means and sds of every element of every site within k combined Monte Carlo standard errors."""
    for site in sites:
        m1, s1, m1_se, s1_se = moments(samples[site])
        m2, s2, m2_se, s2_se = moments(reference[site])
        np.testing.assert_array_less(np.abs(m1 - m2), k * np.hypot(m1_se, m2_se), err_msg=f"{site} mean")
        np.testing.assert_array_less(np.abs(s1 - s2), k * np.hypot(s1_se, s2_se), err_msg=f"{site} sd")


def nuts_samples(model, args, kwargs, seed, num_samples, target_accept_prob=0.8):
    mcmc = MCMC(NUTS(model, target_accept_prob=target_accept_prob), num_warmup=500, num_samples=num_samples,
                num_chains=2, chain_method="sequential", progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed), *args, **kwargs)
    return mcmc.get_samples(group_by_chain=True)


@pytest.fixture(scope="module")
def crossed_reference():
    return nuts_samples(crossed, (II, JJ, Y), {}, seed=2, num_samples=2000, target_accept_prob=0.95)


def test_crossed_model_agrees_with_nuts_on_the_original(crossed_reference):
    result = collapsed_mcmc(crossed, II, JJ, Y, block=CROSSED_BLOCK, num_warmup=300, num_samples=1000,
                            num_chains=2, progress_bar=False, rng_key=1)
    samples = result.get_samples(group_by_chain=True)
    assert set(samples) == {"s_a", "s_b", "sigma", "mu", "a", "b", "spread"}
    assert samples["a"].shape == (2, 1000, I)
    np.testing.assert_allclose(samples["spread"], samples["a"].max(-1) - samples["a"].min(-1), rtol=1e-6)
    assert_agree(samples, crossed_reference, ["s_a", "s_b", "sigma", "mu", "a", "b", "spread"])
    summary = result.summary()
    assert summary["a"]["r_hat"].shape == (I,) and np.all(summary["s_a"]["n_eff"] > 100)


def test_gibbs_with_exact_z_draws_agrees_with_nuts_on_the_original(crossed_reference):
    y64 = Y.astype(np.float64)  # the caller's float64 data, which the chain (run in float64) must not convert
    result = autoreparam.gibbs_mcmc(crossed, II, JJ, y64, block=CROSSED_BLOCK, num_warmup=300, num_samples=1000,
                                    num_chains=2, progress_bar=False, rng_key=4)
    # JAX caches a numpy array's conversion by identity: converted under float64, y64 stayed float64 in the
    # caller's float32 code afterwards (and int64 indices broke their float32 NUTS).
    assert jnp.asarray(y64).dtype == jnp.float32
    samples = result.get_samples(group_by_chain=True)
    assert samples["a"].shape == (2, 1000, I) and samples["a"].dtype == jnp.float32
    assert_agree(samples, crossed_reference, ["s_a", "s_b", "sigma", "mu", "a", "b", "spread"])


def test_eight_schools_agrees_with_nuts_and_prints_a_summary(capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        eight_schools = importlib.import_module("eight_schools")
    finally:
        sys.path.remove(str(EXAMPLES))
    args, kwargs = eight_schools.model_args()
    # block=None: the block the analysis finds, (mu, theta) given tau.
    result = autoreparam.collapsed_mcmc(eight_schools.model, *args, num_warmup=300,
                                        num_samples=1000, num_chains=2, progress_bar=False, **kwargs)
    result.print_summary()
    out = capsys.readouterr().out
    assert "theta[7]" in out and "tau" in out and "r_hat" in out
    # The centred original diverges in its funnel; the non-centred model has the same posterior.
    noncentred = handlers.reparam(eight_schools.model, config={"theta": LocScaleReparam(0)})
    reference = nuts_samples(noncentred, args, kwargs, seed=3, num_samples=2000, target_accept_prob=0.9)
    assert_agree(result.get_samples(group_by_chain=True), reference, ["mu", "tau", "theta"])


# ------------------------------------------------------------------ bad input


def test_no_block_is_one_clear_line():
    with pytest.raises(InputError, match="no conditionally Gaussian block") as info:
        CollapsedPosterior(crossed, None, (II, JJ, Y))
    assert "\n" not in str(info.value)
    empty = GaussianBlock((), CROSSED_BLOCK.likelihoods, ("s_a",))
    with pytest.raises(InputError, match="no conditionally Gaussian block"):
        collapsed_mcmc(crossed, II, JJ, Y, block=empty)


def test_chain_sizes_are_counts():
    with pytest.raises(InputError, match="collapsed_mcmc: num_chains must be a positive integer, got 0"):
        collapsed_mcmc(crossed, II, JJ, Y, block=CROSSED_BLOCK, num_chains=0)
    with pytest.raises(InputError, match="gibbs_mcmc: num_warmup must be an integer >= 0, got 1.5"):
        autoreparam.gibbs_mcmc(crossed, II, JJ, Y, block=CROSSED_BLOCK, num_warmup=1.5)
    with pytest.raises(InputError, match="auto_mcmc: num_samples must be a positive integer, got -1"):
        autoreparam.auto_mcmc(crossed, II, JJ, Y, num_samples=-1)


def test_vectorized_chains_are_refused_in_one_line():
    with pytest.raises(InputError, match="chain_method='vectorized'") as info:
        collapsed_mcmc(crossed, II, JJ, Y, block=CROSSED_BLOCK, num_chains=2, chain_method="vectorized")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="gibbs_mcmc: chain_method='vectorized'"):
        autoreparam.gibbs_mcmc(crossed, II, JJ, Y, block=CROSSED_BLOCK, num_chains=2, chain_method="vectorized")


def test_model_without_a_block_is_one_clear_line():
    def scales_only(y):
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        numpyro.sample("y", dist.Normal(0.0, s), obs=y)

    with pytest.raises(InputError, match=r"collapsed NUTS: no conditionally Gaussian block: 's' \(HalfNormal is not Gaussian") as info:
        collapsed_mcmc(scales_only, np.ones(3, np.float32))
    assert "\n" not in str(info.value)


def test_block_above_the_limit_names_its_size_and_the_limit():
    size = COLLAPSED_LIMIT + 1
    big = GaussianBlock((BlockSite("a", (size,), "Normal"),), CROSSED_BLOCK.likelihoods, ("s_a",))
    with pytest.raises(InputError, match=rf"size {size}, above the limit {COLLAPSED_LIMIT}.*gibbs_mcmc") as info:
        CollapsedPosterior(crossed, big, (II, JJ, Y))
    assert "\n" not in str(info.value)


def test_laplace_block_needs_approximate_true():
    logistic = GaussianBlock(CROSSED_BLOCK.sites, (BlockLikelihood("y", "Bernoulli", "logit"),),
                             CROSSED_BLOCK.theta)
    with pytest.raises(InputError, match=r"y \(Bernoulli\) is not Normal.*Laplace approximation.*approximate=True"):
        CollapsedPosterior(crossed, logistic, (II, JJ, Y))


def _with_a_switch(ii, jj, y):
    k = numpyro.sample("k", dist.Bernoulli(0.5))
    s_a = numpyro.sample("s_a", dist.HalfNormal(1.0))
    with numpyro.plate("i", I):
        a = numpyro.sample("a", dist.Normal(0.0, s_a))
    numpyro.sample("y", dist.Normal(a[ii] + k, 1.0), obs=y)


def test_a_discrete_latent_site_outside_the_block_is_named_not_held_fixed():
    # The block search leaves k out (it is not Gaussian) and theta has only continuous sites, so without
    # the check collapsed NUTS held k at its first draw and answered for the wrong model.
    with pytest.raises(ModelError, match=r"collapsed NUTS: latent site 'k' is discrete \(BernoulliProbs\)") as info:
        collapsed_mcmc(_with_a_switch, II, JJ, Y, num_warmup=5, num_samples=5)
    assert "\n" not in str(info.value)
    choice = autoreparam.choose_mcmc(_with_a_switch, II, JJ, Y)
    assert choice.method == "offsets" and choice.reason.startswith("discrete latent site 'k'")
    with pytest.raises(ModelError, match="AutoHybrid: latent site 'k' is discrete"):
        autoreparam.fit_hybrid(_with_a_switch, II, JJ, Y, steps=2)


def _fixed_hyperparameters(ii, y):
    with numpyro.plate("i", I):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(a[ii], 1.0), obs=y)
    numpyro.deterministic("a_mean", jnp.mean(a))


@pytest.mark.parametrize("x64", [False, True])  # the dense path, and the sparse precision's (float64 callers)
def test_a_model_with_no_theta_gets_independent_exact_draws(x64):
    """Every latent site in the block: nothing for NUTS (``constrain`` raised IndexError); p(a | y) is the
    Gaussian itself, drawn exactly: a_i ~ N(sum of its y / (n_i + 1), 1 / (n_i + 1))."""
    choice = autoreparam.choose_mcmc(_fixed_hyperparameters, II, Y)
    assert choice.method == "collapsed" and choice.reason.endswith("no other latent site: independent exact draws")
    with jax.enable_x64(x64):
        result = collapsed_mcmc(_fixed_hyperparameters, II, Y, num_samples=4000, num_chains=2, progress_bar=False)
    assert result.method == "exact draws (no theta)" and result.get_extra_fields() == {}
    samples = result.get_samples(group_by_chain=True)
    assert samples["a"].shape == (2, 4000, I) and samples["a_mean"].shape == (2, 4000)
    n = np.bincount(II, minlength=I)
    mean, sd = np.bincount(II, Y, minlength=I) / (n + 1), 1 / np.sqrt(n + 1)
    draws = np.asarray(samples["a"]).reshape(-1, I)
    np.testing.assert_allclose(draws.mean(0), mean, atol=4 * sd.max() / np.sqrt(8000))
    np.testing.assert_allclose(draws.std(0), sd, rtol=0.05)
    np.testing.assert_allclose(np.asarray(samples["a_mean"]).ravel(), draws.mean(1), rtol=1e-5)


# ------------------------------------------------------------------ the automatic choice


def _logistic(ii, y):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    with numpyro.plate("i", I):
        a = numpyro.sample("a", dist.Normal(0.0, s))
    with numpyro.plate("n", len(ii)):
        numpyro.sample("y", dist.Bernoulli(logits=a[ii]), obs=y)


def _scales_only(y):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    numpyro.sample("y", dist.Normal(0.0, s), obs=y)


def test_choose_mcmc_collapses_a_small_exact_block_and_says_why():
    choice = autoreparam.choose_mcmc(crossed, II, JJ, Y)
    assert choice.method == "collapsed"
    assert set(choice.block.names) == {"mu", "a", "b"} and choice.block.size == 1 + I + J
    assert str(choice) == "collapsed: exact Gaussian block mu, a, b (8 values) integrated out; NUTS on s_a, s_b, sigma"


def test_choose_mcmc_takes_the_offsets_without_an_exact_small_block():
    no_block = autoreparam.choose_mcmc(_scales_only, np.ones(3, np.float32))
    assert no_block.method == "offsets" and no_block.block is None
    assert no_block.reason.startswith("no conditionally Gaussian block") and "\n" not in no_block.reason
    laplace = autoreparam.choose_mcmc(_logistic, II, (Y > 1).astype(np.float32))
    assert laplace.method == "offsets" and laplace.block is not None
    assert "non-Normal likelihood y (Bernoulli" in laplace.reason and "Laplace" in laplace.reason
    size = AUTO_COLLAPSED_LIMIT + 1
    big = GaussianBlock((BlockSite("a", (size,), "Normal"),), CROSSED_BLOCK.likelihoods, ("s_a",))
    too_large = autoreparam.choose_mcmc(crossed, II, JJ, Y, block=big)
    assert too_large.method == "offsets" and f"{size} values, above {AUTO_COLLAPSED_LIMIT}" in too_large.reason


def test_auto_mcmc_runs_the_chosen_method_and_keeps_every_site(monkeypatch):
    # The collapsed branch hands the chosen block to collapsed_mcmc (run for real above) and adds the reason.
    seen = {}

    def fake_collapsed_mcmc(model, *args, block, **kwargs):
        seen["block"] = block
        return autoreparam.collapsed.CollapsedResult({}, None, "collapsed NUTS", num_gradients=0, seconds=0.0,
                                                     divergences=0)

    monkeypatch.setattr(autoreparam.collapsed, "collapsed_mcmc", fake_collapsed_mcmc)
    collapsed = autoreparam.auto_mcmc(crossed, II, JJ, Y)
    assert collapsed.method == "collapsed NUTS" and collapsed.reason.startswith("exact Gaussian block")
    assert seen["block"].names == ("mu", "a", "b")
    offsets = autoreparam.auto_mcmc(_scales_only, np.ones(3, np.float32), num_warmup=20, num_samples=10,
                                    progress_bar=False)
    assert offsets.method == "NUTS on the offsets" and offsets.reason.startswith("no conditionally Gaussian block")
    assert offsets.get_samples(group_by_chain=True)["s"].shape == (1, 10) and offsets.num_gradients > 0


def test_laplace_draws_without_theta_are_labelled_approximate():
    def logistic_fixed(ii, y):
        with numpyro.plate("i", I):
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", len(ii)):
            numpyro.sample("y", dist.Bernoulli(logits=a[ii]), obs=y)

    result = collapsed_mcmc(logistic_fixed, II, (Y > 1).astype(np.float32), num_samples=5, approximate=True,
                            progress_bar=False)
    assert result.method == "Laplace draws (no theta, approximate)"


def test_gibbs_names_a_discrete_latent_site_too():
    with pytest.raises(ModelError, match="Gibbs MCMC: latent site 'k' is discrete"):
        autoreparam.gibbs_mcmc(_with_a_switch, II, JJ, Y, num_warmup=5, num_samples=5)
