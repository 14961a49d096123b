"""The conditionally Gaussian block: literal expected blocks on tiny models (Pyro style)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro
import numpyro.distributions as dist

from autoreparam import block as block_module
from autoreparam.block import BlockLikelihood, BlockSite, GaussianBlock, find_block, natural_parameter, search_block
from autoreparam.trace import trace_model

HALF = "is not Gaussian (support positive)"


def summary(model, *args, **kwargs):
    """(block sites with families and shapes, likelihoods, theta, left_out) of a model, or (None, left_out)."""
    block, left_out = search_block(trace_model(model, args, kwargs))
    if block is None:
        return None, left_out
    assert block.left_out == left_out
    return ([(s.name, s.family, s.shape) for s in block.sites],
            [(lik.name, lik.family, lik.link, lik.param, lik.exact) for lik in block.likelihoods],
            block.theta, block.left_out)


# -- models ------------------------------------------------------------------------------------------

def eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", len(sigma)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def test_eight_schools():
    sigma = np.array([15.0, 10.0, 16.0])
    assert summary(eight_schools, sigma, y=np.array([28.0, 8.0, -3.0])) == (
        [("mu", "Normal", ()), ("theta", "Normal", (3,))],
        [("y", "Normal", "identity", "loc", True)],
        ("tau",),
        {"tau": "HalfCauchy " + HALF},
    )


def crossed(i, j, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    s_a = numpyro.sample("s_a", dist.HalfNormal(1.0))
    with numpyro.plate("I", 3):
        a = numpyro.sample("a", dist.Normal(0.0, s_a))
    with numpyro.plate("J", 2):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    c = numpyro.sample("c", dist.Normal(0.0, 1.0).expand([3, 2]).to_event(2))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("n", len(i)):
        numpyro.sample("y", dist.Normal(mu + a[i] + b[j] + c[i, j], sigma), obs=y)


def test_crossed_additive_with_index_arrays():
    i, j = np.array([0, 1, 2, 0, 1, 2]), np.array([0, 0, 0, 1, 1, 1])
    assert summary(crossed, i, j, y=np.zeros(6)) == (
        [("mu", "Normal", ()), ("a", "Normal", (3,)), ("b", "Normal", (2,)), ("c", "Normal", (3, 2))],
        [("y", "Normal", "identity", "loc", True)],
        ("s_a", "sigma"),
        {"s_a": "HalfNormal " + HALF, "sigma": "HalfNormal " + HALF},
    )


def nested(county, y=None):
    mean = numpyro.sample("county_effect_mean", dist.Normal(0.0, 1.0))
    scale = numpyro.sample("county_effect_scale", dist.Uniform(0.0, 100.0))
    with numpyro.plate("counties", 4, dim=-2):  # a plate at dim -2: values of shape (4, 1)
        effect = numpyro.sample("county_effect", dist.Normal(mean, scale))
    with numpyro.plate("houses", len(county)):
        numpyro.sample("y", dist.Normal(effect[county, 0], 0.3), obs=y)


def test_nested_group_mean_and_plate_at_dim_minus_two():
    assert summary(nested, np.array([0, 1, 2, 3, 3]), y=np.zeros(5)) == (
        [("county_effect_mean", "Normal", ()), ("county_effect", "Normal", (4, 1))],
        [("y", "Normal", "identity", "loc", True)],
        ("county_effect_scale",),
        {"county_effect_scale": "Uniform is not Gaussian (support interval(0, 100))"},
    )


def regression(x, y=None):
    cov = jnp.array([[1.0, 0.3], [0.3, 2.0]])
    beta = numpyro.sample("beta", dist.MultivariateNormal(jnp.zeros(2), covariance_matrix=cov))
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    u = numpyro.sample("u", dist.Normal(0.0, 1.0), sample_shape=(4,))
    lr = numpyro.sample("lr", dist.LowRankMultivariateNormal(w, jnp.ones((2, 1)), jnp.ones(2)))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ beta + x @ lr + u.sum(), 1.0), obs=y)


def test_mvn_low_rank_to_event_and_sample_shape():
    x = np.arange(8.0).reshape(4, 2)
    assert summary(regression, x, y=np.zeros(4)) == (
        [("beta", "MultivariateNormal", (2,)), ("w", "Normal", (2,)), ("u", "Normal", (4,)),
         ("lr", "LowRankMultivariateNormal", (2,))],
        [("y", "Normal", "identity", "loc", True)],
        (),
        {},
    )


def random_walk_rows(row, t, y=None):
    step = numpyro.sample("step", dist.HalfNormal(1.0))
    with numpyro.plate("rows", 3):
        walk = numpyro.sample("walk", dist.GaussianRandomWalk(step, num_steps=5))
    numpyro.sample("y", dist.Normal(walk[row, t], 0.1).to_event(1), obs=y)


def test_gaussian_random_walk_rows():
    row, t = np.array([0, 1, 2, 2]), np.array([0, 4, 1, 3])
    assert summary(random_walk_rows, row, t, y=np.zeros(4)) == (
        [("walk", "GaussianRandomWalk", (3, 5))],
        [("y", "Normal", "identity", "loc", True)],
        ("step",),
        {"step": "HalfNormal " + HALF},
    )


def glm(row, exposure, clicks=None, counts=None, flags=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("rows", 3):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    eta = mu + a[row]
    with numpyro.plate("n", len(row)):
        numpyro.sample("clicks", dist.Bernoulli(logits=eta), obs=clicks)
        numpyro.sample("counts", dist.Poisson(jnp.exp(eta) * exposure), obs=counts)
        numpyro.sample("flags", dist.Binomial(5, probs=jax.nn.sigmoid(2.0 * eta)), obs=flags)


def test_laplace_likelihoods():
    row = np.array([0, 1, 2, 0])
    assert summary(glm, row, np.array([1.0, 2.0, 0.5, 1.0]), clicks=np.array([0.0, 1, 1, 0]),
                   counts=np.array([3.0, 0, 1, 2]), flags=np.array([1.0, 2, 5, 0])) == (
        [("mu", "Normal", ()), ("a", "Normal", (3,))],
        [("clicks", "BernoulliLogits", "logit", "logits", False),
         ("counts", "Poisson", "log", "rate", False),
         ("flags", "BinomialProbs", "logit", "probs", False)],
        (),
        {},
    )


def probit(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Bernoulli(probs=jax.scipy.special.ndtr(w * x)), obs=y)
    numpyro.sample("b_obs", dist.Normal(b, 1.0), obs=0.3)


def test_probs_that_are_not_a_sigmoid_are_left_out():
    assert summary(probit, np.array([1.0, -1.0]), y=np.array([1.0, 0.0])) == (
        [("b", "Normal", ())],
        [("b_obs", "Normal", "identity", "loc", True)],
        ("w",),
        {"w": "enters the probs of observed 'y' other than as sigmoid(eta); write Bernoulli(logits=eta)"},
    )


def student(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(5.0))
    with numpyro.plate("school", len(sigma)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.StudentT(4.0, theta, sigma), obs=y)


def test_student_t_likelihood_leaves_no_block():
    assert summary(student, np.ones(3), y=np.zeros(3)) == (None, {
        "mu": "enters the prior of 'theta' (Normal), which is outside the block",
        "tau": "HalfNormal " + HALF,
        "theta": "'y' is StudentT: no supported link",
    })


def scale_and_exp(y=None, v=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    log_s = numpyro.sample("log_s", dist.Normal(0.0, 1.0))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(jnp.exp(z), 1.0))
    with numpyro.plate("n", 3):
        numpyro.sample("y", dist.Normal(mu + b, jnp.exp(log_s)), obs=y)
        numpyro.sample("v", dist.Normal(mu, 1.0), obs=v)


def test_scale_and_nonaffine_loc_are_left_out():
    assert summary(scale_and_exp, y=np.zeros(3), v=np.ones(3)) == (
        [("mu", "Normal", ()), ("b", "Normal", ())],
        [("y", "Normal", "identity", "loc", True), ("v", "Normal", "identity", "loc", True)],
        ("log_s", "z"),
        {"log_s": "enters the scale of observed 'y'",
         "z": "enters the loc of 'b' through a non-affine function (exp)"},
    )


def exp_loc(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", 3):
        numpyro.sample("y", dist.Normal(mu + jnp.exp(z), 1.0), obs=y)


def stopped(y=None):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(jax.lax.stop_gradient(z), 1.0), obs=y)


def test_exp_in_the_loc_of_a_likelihood_and_stop_gradient():
    assert summary(exp_loc, y=np.zeros(3))[2:] == (
        ("z",), {"z": "enters observed 'y' through a non-affine function (exp)"})
    # its value is affine, but a Hessian-vector product through it would be zero
    assert summary(stopped, y=0.5) == (
        None, {"z": "enters observed 'y' through a non-affine function (stop_gradient)"})


def latent_child(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    z = numpyro.sample("z", dist.Normal(mu, 1.0))
    g = numpyro.sample("g", dist.LogNormal(z, 1.0))
    with numpyro.plate("n", 3):
        numpyro.sample("y", dist.Normal(z, g), obs=y)


def test_non_gaussian_child_forces_its_parents_out():
    assert summary(latent_child, y=np.zeros(3)) == (None, {
        "mu": "enters the prior of 'z' (Normal), which is outside the block",
        "z": "enters the prior of 'g' (LogNormal), which is outside the block",
        "g": "LogNormal " + HALF,
    })


def bilinear(i, j, y=None):
    with numpyro.plate("I", 2):
        u = numpyro.sample("u", dist.Normal(0.0, 1.0))
    with numpyro.plate("J", 5):
        v = numpyro.sample("v", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", len(i)):
        numpyro.sample("y", dist.Normal(u[i] * v[j], 1.0), obs=y)


def test_product_of_block_sites_takes_out_the_smaller_factor():
    i, j = np.array([0, 1, 1]), np.array([0, 3, 4])
    assert summary(bilinear, i, j, y=np.zeros(3))[::2] == (
        [("v", "Normal", (5,))], ("u",))
    assert summary(bilinear, i, j, y=np.zeros(3))[3] == {
        "u": "multiplies 'v' in observed 'y'; a product of block sites is not affine"}


def discrete_and_value(y=None):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("k", dist.Bernoulli(logits=z))
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    m = numpyro.sample("m", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(m, 1.0), obs=y - w)


def test_discrete_latent_and_observed_value():
    assert summary(discrete_and_value, y=jnp.array(0.5)) == (
        [("m", "Normal", ())],
        [("y", "Normal", "identity", "loc", True)],
        ("z", "w"),
        {"z": "enters the prior of 'k' (BernoulliLogits), which is outside the block",
         "k": "discrete (BernoulliLogits): held fixed, in neither the block nor theta",
         "w": "enters the observed value of 'y'"},
    )


def no_block(counts=None):
    rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
    with numpyro.plate("n", 3):
        numpyro.sample("counts", dist.Poisson(rate), obs=counts)


def test_no_gaussian_site():
    assert summary(no_block, counts=np.array([1.0, 2.0, 0.0])) == (
        None, {"rate": "Gamma " + HALF})


@jax.custom_jvp
def _identity_with_a_curved_derivative(x):
    return x


@_identity_with_a_curved_derivative.defjvp
def _curved_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return x, (1.0 + x ** 2) * t


def fooled(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", 3):
        numpyro.sample("y", dist.Normal(mu + _identity_with_a_curved_derivative(z), 1.0), obs=y)


def test_numeric_check_catches_what_the_structure_cannot_see():
    # The value of the loc is affine in z (what the jaxpr shows), but its derivative, which any
    # Hessian-vector product (the solver's) would use, is not: only the measurement sees it.
    block, left_out = search_block(trace_model(fooled, (), {"y": np.zeros(3)}))
    assert block.names == ("mu",) and block.theta == ("z",)
    assert left_out["z"].startswith("the log joint is not quadratic in it: Hessian-vector products at two "
                                    "points differ by")
    assert block.residual < block_module.HESSIAN_RTOL


def test_the_check_is_measured():
    block = find_block(trace_model(eight_schools, (np.ones(3),), {"y": np.zeros(3)}))
    assert block.residual == 0.0  # a Normal model's log joint is exactly quadratic in the block


def test_natural_parameter():
    eta = jnp.array([-1.5, 0.0, 2.0])
    for fn in (dist.Normal(eta, 2.0), dist.Bernoulli(logits=eta), dist.Bernoulli(probs=jax.nn.sigmoid(eta)),
               dist.Poisson(jnp.exp(eta)).expand([2, 3]).to_event(1)):
        np.testing.assert_allclose(natural_parameter(fn), eta, rtol=1e-5, atol=1e-6)  # of the innermost
    with pytest.raises(ValueError, match="StudentT is not a supported likelihood"):
        natural_parameter(dist.StudentT(3.0, eta, 1.0))


def test_json_round_trip():
    block = find_block(trace_model(glm, (np.array([0, 1, 2]), np.ones(3)),
                                   {"clicks": np.zeros(3), "counts": np.zeros(3), "flags": np.zeros(3)}))
    assert GaussianBlock.from_json(block.to_json()) == block
    assert block.to_json()["likelihoods"][1] == {"name": "counts", "family": "Poisson", "link": "log",
                                                 "param": "rate", "exact": False}
    assert not block.exact and block.size == 4


# -- the examples ------------------------------------------------------------------------------------

POSITIVE = {name: f"{family} {HALF}" for name, family in [("tau", "HalfCauchy")]}
EXAMPLES = {
    "eight_schools": (["mu", "theta"], [("y", "Normal", True)], ("tau",),
                      {"tau": "HalfCauchy " + HALF}),
    "county_covariate": (["mu", "w", "a"], [("y", "Normal", True)], ("tau", "sigma"),
                         {"tau": "HalfNormal " + HALF, "sigma": "HalfNormal " + HALF}),
    "crossed_logistic": (["mu", "a", "b"], [("y", "BernoulliLogits", False)], ("sigma_a", "sigma_b"),
                         {"sigma_a": "HalfNormal " + HALF, "sigma_b": "HalfNormal " + HALF}),
    "radon_mn": (["county_effect_mean", "county_effect", "weight"], [("log_radon", "Normal", True)],
                 ("county_effect_scale", "log_radon_scale"),
                 {"county_effect_scale": "Uniform is not Gaussian (support interval(0, 100))",
                  "log_radon_scale": "Uniform is not Gaussian (support interval(0, 100))"}),
    "tensor_model": (["mu", "z", "a", "A", "b", "B", "C"], [("y", "Normal", True)],
                     ("sigma_a", "sigma_b", "sigma_C", "step_z", "step_A", "step_B", "sigma"),
                     {n: "HalfNormal " + HALF
                      for n in ("sigma_a", "sigma_b", "sigma_C", "step_z", "step_A", "step_B", "sigma")}),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_example_has_a_block(name):
    module = importlib.import_module(name)
    args, kwargs = module.model_args()
    mt = trace_model(module.model, args, kwargs)
    block = find_block(mt)
    names, likelihoods, theta, left_out = EXAMPLES[name]
    assert list(block.names) == names
    assert [(lik.name, lik.family, lik.exact) for lik in block.likelihoods] == likelihoods
    assert block.theta == theta and block.left_out == left_out
    assert block.size == sum(mt.sites[n].size for n in names)


# -- the report, the CLI and the graph -------------------------------------------------------------

def test_report_shows_the_block(tmp_path):
    from autoreparam import analyze
    from autoreparam.draw import graph_to_dot

    report = analyze(eight_schools, np.array([15.0, 10.0, 16.0]), y=np.array([28.0, 8.0, -3.0]))
    text = str(report)
    section = text[text.index("Gaussian block"):].splitlines()[:7]
    assert section == [
        "Gaussian block (exact: every likelihood is Normal): 2 sites, 4 values",
        "  mu     Normal scalar",
        "  theta  Normal (3)",
        "  likelihood y: Normal, identity link on loc (exact)",
        "  theta (the other latent sites): tau",
        "  left out:",
        "    tau  HalfCauchy is not Gaussian (support positive)",
    ]
    assert report.to_json()["block"]["sites"] == [{"name": "mu", "shape": [], "family": "Normal"},
                                                   {"name": "theta", "shape": [3], "family": "Normal"}]
    dot = graph_to_dot(report)
    assert '"theta" [label="theta\\n[school]", style=filled, fillcolor="#cfe2ff"];' in dot
    assert '"tau" [label="tau"];' in dot


def test_report_says_why_there_is_no_block():
    from autoreparam import analyze

    report = analyze(no_block, counts=np.array([1.0, 2.0, 0.0]))
    assert report.block is None and report.to_json()["block"] is None
    text = str(report)
    assert "Gaussian block: none (see the note)" in text
    assert "note: no conditionally Gaussian block: 'rate' (Gamma is not Gaussian (support positive))" in text


def test_dataclasses_keep_their_fields():
    site = BlockSite("a", (2, 3), "Normal")
    lik = BlockLikelihood("y", "Normal", "identity")
    assert site.size == 6 and lik.exact and lik.param == ""
    block = GaussianBlock((site,), (lik,), ("s",))
    assert block.names == ("a",) and block.exact and block.left_out == {} and block.residual is None


# -- what else a model can do ----------------------------------------------------------------------

def data_in_python(group, y=None):
    n = int(group.max()) + 1  # needs the data's values: traced with them evaluated eagerly
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("g", n):
        a = numpyro.sample("a", dist.Normal(mu, 1.0))
    with numpyro.plate("n", len(group)):
        numpyro.sample("y", dist.Normal(a[group], 1.0), obs=y)


X100 = np.linspace(-1.0, 1.0, 100).astype(np.float32)


def subsampled():
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", 100, subsample_size=10) as idx:
        numpyro.sample("y", dist.Normal(w * X100[idx], 1.0), obs=2.0 * X100[idx])


def factor_scale_mask_where(y=None):
    with numpyro.plate("g", 3):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    numpyro.factor("sum_to_zero", -0.5 * a.sum() ** 2 / 0.01)
    s = numpyro.sample("s", dist.Normal(0.0, 1.0))
    nu = numpyro.sample("nu", dist.Normal(0.0, 1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", 3), numpyro.handlers.scale(scale=jnp.exp(s)):
        numpyro.sample("y", dist.Normal(a + jnp.where(nu > 0, nu, 0.0), 1.0), obs=y)
        numpyro.sample("v", dist.Normal(mu, 1.0), obs=y, obs_mask=np.array([True, False, True]))


@pytest.mark.parametrize("model, args, kwargs, expected", [
    (data_in_python, (np.array([0, 1, 2, 1]),), {"y": np.zeros(4)},
     ([("mu", "Normal", ()), ("a", "Normal", (3,))], [("y", "Normal", "identity", "loc", True)], (), {})),
    (subsampled, (), {},
     ([("w", "Normal", ())], [("y", "Normal", "identity", "loc", True)], (), {})),
    (factor_scale_mask_where, (), {"y": np.zeros(3)},
     (None, {"a": "'sum_to_zero' is Unit: no supported link",
             "s": "enters the scale factor of observed 'y'",
             "nu": "enters observed 'y' through a non-affine function (a comparison)",
             "mu": "enters the prior of 'v_unobserved' (Normal), which is outside the block",
             "v_unobserved": "its Gaussian prior is masked (handlers.mask or obs_mask): masked elements have "
                             "no density, so their conditional is improper"})),
])
def test_data_in_python_subsampling_factor_scale_obs_mask_where(model, args, kwargs, expected):
    assert summary(model, *args, **kwargs) == expected


def test_a_search_that_fails_is_a_note_in_the_report(monkeypatch):
    from autoreparam.errors import ModelError

    def fails(model_trace):
        raise ModelError("site 'z': something the search cannot trace")

    monkeypatch.setattr(block_module, "search_block", fails)
    from autoreparam import analyze
    from autoreparam.notes import NoteKind

    report = analyze(eight_schools, np.ones(3), y=np.zeros(3))
    assert report.block is None and report.funnels  # the rest of the analysis stands
    assert [(n.kind, str(n)) for n in report.notes if n.kind is NoteKind.NO_GAUSSIAN_BLOCK] == [
        (NoteKind.NO_GAUSSIAN_BLOCK, "the Gaussian block was not searched: site 'z': something the search cannot trace")]


class Normal(dist.Normal):
    """A user's Normal with an extra quartic term: only numpyro's own families are trusted."""

    def log_prob(self, value):
        return super().log_prob(value) - 0.1 * value ** 4


def subclassed(y=None):
    a = numpyro.sample("a", Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(a, 1.0), obs=y)


def test_a_subclass_of_a_gaussian_family_is_not_trusted():
    assert summary(subclassed, y=0.5) == (None, {
        "a": "test_block.Normal subclasses a Gaussian family; only numpyro's own Gaussian families are trusted"})
