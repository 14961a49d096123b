"""Models that compute sizes or indices from their data inside the model (an ordinary NumPyro idiom).

``n = int(region.max()) + 1``, ``len(np.unique(g))`` and indexing a numpy array with a plate's
subsample index need the data to be concrete. The analysis, the plan (MAP point, curvature)
and the reparameterized model must run them; only the latent values are traced.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import log_density

import autoreparam
from autoreparam import ModelError

GROUP = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 2, 1, 0])
X = np.linspace(-1.0, 1.0, GROUP.size).astype(np.float32)
Y = (np.array([0.3, -0.2, 1.1, 0.9, -0.8, -1.0, 0.1, 1.3, -0.7, -0.9, 1.0, 0.2]) + 0.5 * X).astype(np.float32)


def size_from_max(region, y=None):
    n_regions = int(region.max()) + 1
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("regions", n_regions):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    with numpyro.plate("data", len(region)):
        numpyro.sample("y", dist.Normal(mu + a[region], 0.5), obs=y)


def size_from_unique(g, x, y=None):
    n_groups = len(np.unique(g))
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", n_groups):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    with numpyro.plate("data", len(g)):
        numpyro.sample("y", dist.Normal(mu + a[np.asarray(g)] + beta * x, 0.5), obs=y)


def numpy_index_with_subsample(g, x, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    with numpyro.plate("data", len(g), subsample_size=8) as idx:
        g_batch = np.asarray(g)[idx]
        numpyro.sample("y", dist.Normal(mu + a[g_batch] + np.asarray(x)[idx], 0.5), obs=np.asarray(y)[idx])


CASES = {
    "size_from_max, numpy data": (size_from_max, (GROUP,), {"y": Y}),
    "size_from_max, jax data": (size_from_max, (jnp.asarray(GROUP),), {"y": jnp.asarray(Y)}),
    "size_from_unique": (size_from_unique, (GROUP, X), {"y": Y}),
    "numpy_index_with_subsample": (numpy_index_with_subsample, (GROUP, X), {"y": Y}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_analysis_plan_and_reparameterized_model_run(case):
    model, args, kwargs = CASES[case]
    report = autoreparam.analyze(model, *args, **kwargs)
    plan = report.plan  # the MAP point and the curvature run the model under jit
    assert ("y", "mu", "a") in report.pairs()
    assert "a" in plan.names and plan["a"].parents == ("mu",)
    assert np.all(np.isfinite(plan["a"].offsets[0].init))

    rmodel = autoreparam.reparameterize(model, plan)
    guide = AutoNormal(rmodel)
    svi = SVI(rmodel, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), *args, **kwargs)
    for _ in range(3):
        state, loss = svi.update(state, *args, **kwargs)
        assert np.isfinite(float(loss))
    params = svi.get_params(state)
    values = guide.sample_posterior(jax.random.PRNGKey(1), params, *args, **kwargs)
    logp, _ = log_density(numpyro.handlers.seed(rmodel, 0), args, kwargs, {**params, **values})
    assert np.isfinite(float(logp))


def test_reparameterize_analyses_on_first_call_and_svi_run_compiles():
    """``SVI.run`` compiles its loop with the (numpy) data closed over, as NumPyro users do."""
    model, args, kwargs = CASES["size_from_unique"]
    rmodel = autoreparam.reparameterize(model)
    svi = SVI(rmodel, AutoNormal(rmodel), numpyro.optim.Adam(0.01), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 5, *args, progress_bar=False, **kwargs)
    assert np.all(np.isfinite(np.asarray(result.losses)))
    assert rmodel.plan_for(*args, **kwargs)["a"].parents == ("mu",)


def int_of_latent_in_a_plate_size(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    n = int(jnp.abs(mu)) + 6
    with numpyro.plate("data", 6):
        numpyro.sample("y", dist.Normal(mu + a[np.arange(6) % 3] + 0 * n, 0.5), obs=y)


def test_latent_value_needed_concretely_is_one_line_naming_the_line():
    with pytest.raises(ModelError) as info:
        autoreparam.analyze(int_of_latent_in_a_plate_size, y=np.zeros(6, np.float32))
    msg = str(info.value)
    assert "\n" not in msg
    assert "test_data_in_model.py:" in msg and "int(jnp.abs(mu))" in msg and "lax.cond" in msg


def test_curvature_names_the_line_when_only_jit_cannot_trace_the_model(monkeypatch):
    """The plan's jitted MAP point turns a tracer error into the same one line (a safety net)."""
    from autoreparam import curvature as curvature_module

    report = autoreparam.analyze(size_from_max, GROUP, y=Y)

    def untraceable(neg_log_joint, theta, supports, **kw):
        return jax.jit(lambda t: float(neg_log_joint(t)))(theta)

    monkeypatch.setattr(curvature_module, "_map_point", untraceable)
    with pytest.raises(ModelError, match="cannot be traced") as info:
        report.make_plan()
    assert "\n" not in str(info.value) and "float(neg_log_joint(t))" in str(info.value)
