"""Bad input to autoreparam.analyze: one clear one-line error naming the site or argument.

After every error the NumPyro handler stack must be empty and a good model must still analyse.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import numpyro.primitives
import pytest
from numpyro.contrib.control_flow import scan

from autoreparam import AutoreparamError, InputError, ModelError, analyze

GROUP = np.array([0, 1, 2, 0, 1, 2])
Y = jnp.zeros(6)


def good_model(group, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", group.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[group], 0.5), obs=y)


def assert_clean_and_still_works():
    assert numpyro.primitives._PYRO_STACK == []
    report = analyze(good_model, GROUP, y=Y)
    assert report.pairs() == {("y", "mu", "a"): 1}
    assert numpyro.primitives._PYRO_STACK == []


def expect_error(cls, model, *args, **kwargs) -> str:
    """Run analyze, check the error class and that its message is one non-empty line."""
    with pytest.raises(AutoreparamError) as info:
        analyze(model, *args, **kwargs)
    exc = info.value
    assert isinstance(exc, cls), f"{type(exc).__name__}: {exc}"
    assert isinstance(exc, ValueError)
    msg = str(exc)
    assert msg.strip() and "\n" not in msg, repr(msg)
    assert_clean_and_still_works()
    return msg


def test_error_hierarchy():
    assert issubclass(ModelError, AutoreparamError) and issubclass(InputError, AutoreparamError)
    assert issubclass(AutoreparamError, ValueError)
    assert not issubclass(ModelError, InputError) and not issubclass(InputError, ModelError)


def test_good_model_works():
    assert_clean_and_still_works()


# -- the model raises --------------------------------------------------------------------------

def test_model_that_raises_names_exception_and_site():
    def model(y=None):
        numpyro.sample("mu", dist.Normal(0.0, 1.0))
        raise RuntimeError("bad hyperparameter\nsecond line of the message")

    msg = expect_error(ModelError, model, y=Y)
    assert "RuntimeError" in msg and "bad hyperparameter" in msg
    assert "second line" not in msg
    assert "'mu'" in msg


def test_model_that_raises_before_any_site():
    def model(y=None):
        raise KeyError("county")

    msg = expect_error(ModelError, model, y=Y)
    assert "KeyError" in msg and "county" in msg


def test_model_called_with_missing_argument():
    msg = expect_error(ModelError, good_model, y=Y)
    assert "group" in msg and "TypeError" in msg


def test_not_a_callable_model():
    msg = expect_error(InputError, "good_model", GROUP, y=Y)
    assert "callable" in msg and "str" in msg


def test_no_observed_site_is_a_note():
    """A forgotten obs= is not an error (a prior has funnels too), but the report says so."""
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0))  # obs forgotten

    report = analyze(model, y=Y)
    assert report.invariances == [] and report.terms == {}
    notes = [n for n in report.notes if "no observed site" in n]
    assert len(notes) == 1 and "obs=" in notes[0] and "\n" not in notes[0]
    assert f"note: {notes[0]}" in str(report)
    assert_clean_and_still_works()


# -- discrete latent sites are a note, not an error ---------------------------------------------

def test_discrete_latent_sites_are_reported_in_notes():
    def model(group, y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        with numpyro.plate("groups", 3):
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        k = numpyro.sample("k", dist.Categorical(jnp.ones(3) / 3))
        flip = numpyro.sample("flip", dist.Bernoulli(0.5))
        with numpyro.plate("data", group.shape[0]):
            numpyro.sample("y", dist.Normal(mu + a[group] + a[k] * flip, 0.5), obs=y)

    report = analyze(model, GROUP, y=Y)
    assert report.sites["k"].is_discrete and report.sites["flip"].is_discrete
    noted = " ".join(report.notes)
    assert "'k'" in noted and "'flip'" in noted and "discrete" in noted
    assert all("\n" not in n for n in report.notes)
    assert [t.site for t in report.terms["y"]] == ["mu", "a"]
    assert all("k" not in inv.sites and "flip" not in inv.sites for inv in report.invariances)
    assert report.pairs() == {("y", "mu", "a"): 1}
    assert "note: site 'k' is discrete" in str(report)
    assert_clean_and_still_works()


# -- Python control flow on latent values ------------------------------------------------------

def if_on_latent(y=None):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    if mu > 0:
        mu = 2 * mu
    with numpyro.plate("n", 6):
        numpyro.sample("y", dist.Normal(mu, s), obs=y)


def float_of_latent(y=None):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", 6):
        numpyro.sample("y", dist.Normal(float(mu), s), obs=y)


def asarray_of_latent(y=None):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", 6):
        numpyro.sample("y", dist.Normal(np.asarray(mu) + jnp.zeros(6), s), obs=y)


def while_on_latent(y=None):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    while mu > 1:
        mu = mu - 1
    with numpyro.plate("n", 6):
        numpyro.sample("y", dist.Normal(mu, s), obs=y)


CONTROL_FLOW = [if_on_latent, float_of_latent, asarray_of_latent, while_on_latent]


@pytest.mark.parametrize("model", CONTROL_FLOW, ids=lambda m: m.__name__)
def test_control_flow_on_latent_is_a_model_error(model):
    msg = expect_error(ModelError, model, y=Y)
    assert "jnp.where" in msg or "lax.cond" in msg


@pytest.mark.parametrize("model", CONTROL_FLOW, ids=lambda m: m.__name__)
def test_control_flow_error_names_the_site(model):
    msg = expect_error(ModelError, model, y=Y)
    assert "'mu'" in msg


def test_control_flow_on_data_values_still_analyses():
    # int() of the data needs concrete values (the eager fallback), but no latent value is used.
    def model(idx, y=None):
        n_groups = int(jnp.max(idx)) + 1
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        with numpyro.plate("groups", n_groups):
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", idx.shape[0]):
            numpyro.sample("y", dist.Normal(mu + a[idx], 0.5), obs=y)

    report = analyze(model, jnp.asarray(GROUP), y=Y)
    assert report.pairs() == {("y", "mu", "a"): 1}
    assert_clean_and_still_works()


def test_tracer_error_even_when_run_eagerly():
    def model(y=None):
        scale = jax.jit(lambda v: float(v.sum()) + 1.0)(y)
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, scale), obs=y)

    msg = expect_error(ModelError, model, y=Y)
    assert "cannot be run" in msg


# -- scan --------------------------------------------------------------------------------------

def test_site_inside_scan():
    def model(y=None):
        x0 = numpyro.sample("x0", dist.Normal(0.0, 1.0))

        def step(carry, yt):
            x = numpyro.sample("x", dist.Normal(carry, 1.0))
            numpyro.sample("obs", dist.Normal(x, 1.0), obs=yt)
            return x, None

        scan(step, x0, y)

    msg = expect_error(ModelError, model, y=jnp.zeros(4))
    assert "'x'" in msg and "scan" in msg


# -- non-array arguments -----------------------------------------------------------------------

class DataFrameLike:
    """Quacks a little like a pandas DataFrame, but is not an array."""

    def __init__(self, n):
        self.values = np.zeros(n)
        self.shape = (n,)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        return self.values[key]


@pytest.mark.parametrize(
    "args, kwargs, where",
    [
        ((DataFrameLike(6),), {"y": Y}, "args[0]"),
        ((GROUP,), {"y": DataFrameLike(6)}, "y"),
        ((object(),), {"y": Y}, "args[0]"),
        ((GROUP,), {"y": {"values": object()}}, "y"),
        (([GROUP, DataFrameLike(6)],), {"y": Y}, "args[0][1]"),
    ],
    ids=["frame-positional", "frame-keyword", "object", "dict-of-object", "list-of-frame"],
)
def test_non_array_arguments(args, kwargs, where):
    msg = expect_error(InputError, good_model, *args, **kwargs)
    assert where in msg
    assert "DataFrameLike" in msg or "object" in msg
    assert "expected arrays" in msg


def test_object_dtype_array_argument():
    # What df["county"].values gives for a column of strings: an ndarray, but of Python objects.
    county = np.array(["a", "b", "c", "a", "b", "c"], dtype=object)
    msg = expect_error(InputError, good_model, county, y=Y)
    assert "args[0]" in msg


# -- mismatched shapes -------------------------------------------------------------------------

def test_observed_value_not_broadcastable_to_distribution():
    msg = expect_error(ModelError, good_model, GROUP, y=jnp.zeros(5))
    assert "'y'" in msg and "(5,)" in msg and "(6,)" in msg


def test_observed_value_with_wrong_trailing_dim():
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("i", 3, dim=-2), numpyro.plate("t", 4, dim=-1):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    msg = expect_error(ModelError, model, y=jnp.zeros((3, 5)))
    assert "'y'" in msg and "(3, 5)" in msg and "(3, 4)" in msg


def test_broadcasting_error_between_effects():
    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
        numpyro.sample("y", dist.Normal(a + b, 1.0).to_event(1), obs=y)

    msg = expect_error(ModelError, model, y=jnp.zeros(3))
    assert "'b'" in msg and "(3,)" in msg and "(4,)" in msg


def test_broadcasting_error_between_distribution_parameters():
    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        s = numpyro.sample("s", dist.HalfNormal(1.0).expand([4]).to_event(1))
        numpyro.sample("y", dist.Normal(a, s).to_event(1), obs=y)

    msg = expect_error(ModelError, model, y=jnp.zeros(3))
    assert "'s'" in msg and "broadcast" in msg


def test_plate_size_does_not_match_distribution():
    def model(y=None):
        with numpyro.plate("groups", 4):
            a = numpyro.sample("a", dist.Normal(jnp.zeros(3), 1.0))
        numpyro.sample("y", dist.Normal(a.sum(), 1.0), obs=y)

    msg = expect_error(ModelError, model, y=jnp.array(0.0))
    assert "'a'" in msg or "'groups'" in msg


@pytest.mark.parametrize(
    "value",
    ["0 1 0 1 0 1", {"y": np.zeros(6)}, np.zeros(6, dtype=object)],
    ids=["string", "dict", "object-array"],
)
def test_observed_value_that_is_not_numeric(value):
    # Strings and dicts are allowed model inputs, but not as the value of an observed site.
    msg = expect_error(AutoreparamError, good_model, GROUP, y=value)
    assert "'y'" in msg or "y=" in msg


# -- observed values outside their distribution's support ---------------------------------------

def observed_model(make_dist, n=6, mask=None, obs_mask=None):
    """mu + a[group] into an observed site built by ``make_dist(eta)``, optionally masked."""
    def model(group, y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("groups", 3):
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", n):
            fn = make_dist(mu + a[group])
            if mask is not None:
                with numpyro.handlers.mask(mask=mask):
                    numpyro.sample("y", fn, obs=y)
            else:
                numpyro.sample("y", fn, obs=y, obs_mask=obs_mask)
    return model


def normal(eta):
    return dist.Normal(eta, 0.5)


def poisson(eta):
    return dist.Poisson(jnp.exp(eta))


def binomial(eta):
    return dist.Binomial(jnp.array([5, 5, 5, 2, 2, 2]), logits=eta)


def bernoulli(eta):
    return dist.Bernoulli(logits=eta)


def gamma(eta):
    return dist.Gamma(2.0, jnp.exp(eta))


NAN = np.array([0.0, np.nan, 1.0, np.nan, 2.0, np.nan])


@pytest.mark.parametrize(
    "make_dist, y, expected",
    [
        (normal, NAN, "observed site 'y' has 3 NaN values (first at index 1)"),
        (normal, jnp.array([0.0, 1.0, 2.0, -np.inf, 0.0, np.inf]),
         "observed site 'y' has 2 infinite values (first at index 3)"),
        (gamma, np.array([1.0, 1.0, 2.0, np.inf, 1.0, 1.0]), "observed site 'y' has 1 infinite value (first at index 3)"),
        (poisson, np.array([0.0, 1.0, 2.5, 3.0, 1.0, 0.5]),
         "has 2 values outside the support of Poisson (integer_nonnegative), the first 2.5 at index 2"),
        (poisson, np.array([0, 1, 2, -3, 1, 0]), "has 1 value outside the support of Poisson"),
        (binomial, np.array([0, 5, 1, 2, 3, 0]),
         "has 1 value outside the support of BinomialLogits (integers from 0 to 2), the first 3 at index 4"),
        (binomial, np.array([0, 5, 1, -1, 0, 0]), "the first -1 at index 3"),
        (bernoulli, np.array([0.0, 1.0, 2.0, 1.0, 0.0, 1.0]),
         "has 1 value outside the support of BernoulliLogits (boolean), the first 2.0 at index 2"),
        (gamma, np.array([1.0, 0.0, 2.0, 1.0, 1.0, 1.0]), "outside the support of Gamma (positive), the first 0.0"),
    ],
    ids=["nan", "inf", "inf-positive-support", "poisson-fraction", "poisson-negative", "binomial-over-total",
         "binomial-negative", "bernoulli-two", "gamma-zero"],
)
def test_observed_values_outside_the_support_are_rejected(make_dist, y, expected):
    msg = expect_error(ModelError, observed_model(make_dist), GROUP, y=y)
    assert expected in msg, msg


def test_observed_value_computed_inside_the_model_is_checked():
    # The shape-only pass sees a traced value; it is checked on an eager run.
    def model(group, y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", 6):
            numpyro.sample("y", dist.Poisson(jnp.exp(mu)), obs=jnp.asarray(y) - 1)

    msg = expect_error(ModelError, model, GROUP, y=np.array([1, 1, 0, 2, 1, 1]))
    assert "outside the support of Poisson" in msg and "the first -1 at index 2" in msg


def test_nan_in_an_event_counts_once_and_names_its_index():
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", 3):
            numpyro.sample("y", dist.MultivariateNormal(mu * jnp.ones(2), jnp.eye(2)), obs=y)

    msg = expect_error(ModelError, model, y=np.array([[0.0, 1.0], [1.0, 2.0], [np.nan, np.nan]]))
    assert "observed site 'y' has 1 NaN value (first at index 2)" in msg


MASK = np.array([True, False, True, False, True, False])


@pytest.mark.parametrize("how", ["handlers.mask", "obs_mask"])
def test_nan_under_a_mask_is_accepted_and_planned(how):
    """NumPyro scores masked-out observations as a feasible value, so NaN there is harmless."""
    kw = {"mask": MASK} if how == "handlers.mask" else {"obs_mask": MASK}
    model = observed_model(normal, **kw)
    report = analyze(model, GROUP, y=NAN)
    observed = "y" if how == "handlers.mask" else "y_observed"
    assert report.pairs() == {(observed, "mu", "a"): 1}
    xi = np.asarray(report.plan["a"].offsets[0].init)
    assert np.all(np.isfinite(xi)) and np.all(xi < 0)  # each group has data under the mask


def test_nan_outside_the_mask_is_still_rejected():
    mask = MASK.copy()
    mask[3] = True
    msg = expect_error(ModelError, observed_model(normal, mask=mask), GROUP, y=NAN)
    assert "observed site 'y' has 1 NaN value (first at index 3)" in msg


def test_mask_under_to_event_masks_whole_columns():
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        fn = dist.Poisson(jnp.exp(mu)).expand([3, 2]).mask(jnp.array([True, False])).to_event(2)
        numpyro.sample("y", fn, obs=y)

    report = analyze(model, y=np.array([[1.0, 2.5], [2.0, -1.0], [0.0, np.nan]]))
    assert report.sites["y"].type == "observed"
    msg = expect_error(ModelError, model, y=np.array([[1.0, 2.5], [2.5, -1.0], [0.0, np.nan]]))
    assert "the first 2.5 at index (1, 0)" in msg
