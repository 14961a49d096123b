"""Models without observed data: Neal's funnel, prior-only hierarchies, Predictive with y=None.

Non-centring matters most where there are no data to pin the scale; only the invariance
analysis needs a likelihood.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

import autoreparam
from autoreparam.cli import main
from autoreparam.planning import CENTRED_ENOUGH


def funnel(dim=4):
    """Neal's funnel as in NumPyro's funnel example, with no data."""
    y = numpyro.sample("y", dist.Normal(0, 3))
    numpyro.sample("x", dist.Normal(jnp.zeros(dim - 1), jnp.exp(y / 2)))


def schools_prior(J=5):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", J):
        numpyro.sample("theta", dist.Normal(mu, tau))


def test_funnel_without_data_is_analysed_and_non_centred():
    report = autoreparam.analyze(funnel)
    assert [(f.site, f.scale_parents) for f in report.funnels] == [("x", ("y",))]
    assert report.invariances == [] and report.pairs() == {}
    assert any("no observed site" in n and "no likelihood" in n for n in report.notes)
    plan = report.plan
    assert plan.names == ("x",) and plan["x"].noncentred and not plan["x"].offsets
    assert max(plan["x"].centredness) < CENTRED_ENOUGH


def test_prior_only_hierarchy_non_centres_its_effects():
    report = autoreparam.analyze(schools_prior)
    assert [f.site for f in report.funnels] == ["theta"]
    plan = report.plan
    assert plan.names == ("theta",) and max(plan["theta"].centredness) < CENTRED_ENOUGH


def test_reparameterized_funnel_samples_the_same_prior():
    rmodel = autoreparam.reparameterize(funnel, learn=False)
    n = 4000
    got = Predictive(rmodel, num_samples=n, return_sites=["x", "y", "x_decentered"])(jax.random.PRNGKey(0))
    want = Predictive(funnel, num_samples=n)(jax.random.PRNGKey(1))
    assert got["x_decentered"].shape == (n, 3)  # the funnel is sampled non-centred
    # log|x| = y/2 + log|N(0, 1)|: its mean and spread match the centred prior's
    for stat in (np.mean, np.std):
        a = stat(np.log(np.abs(np.asarray(got["x"]))))
        b = stat(np.log(np.abs(np.asarray(want["x"]))))
        assert abs(a - b) < 0.15, (stat.__name__, a, b)


def test_cli_analyze_of_a_funnel_without_data(tmp_path, capsys):
    path = tmp_path / "funnel.py"
    path.write_text(
        "import jax.numpy as jnp\nimport numpyro\nimport numpyro.distributions as dist\n\n\n"
        "def model(dim=4):\n"
        "    y = numpyro.sample('y', dist.Normal(0, 3))\n"
        "    numpyro.sample('x', dist.Normal(jnp.zeros(dim - 1), jnp.exp(y / 2)))\n"
    )
    code = main(["analyze", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "x ~ Normal: scale depends on y" in out
    assert "note: the model has no observed site" in out
    assert "x  non-centred (centredness 0.00" in out


# -- Predictive with y=None after a fit on data -------------------------------------------------

GROUP = np.array([0, 0, 1, 1, 2, 2])
Y = np.array([0.5, 0.7, -1.0, -0.8, 2.0, 2.2], dtype=np.float32)


def grouped(group, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", group.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[group], sigma), obs=y)


def test_posterior_predictive_without_data_reuses_the_plan_fitted_on_data():
    rmodel = autoreparam.reparameterize(grouped)
    guide = AutoNormal(rmodel)
    svi = SVI(rmodel, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), GROUP, y=Y)
    params = svi.get_params(state)
    assert "a_offset_mu" in params
    post = Predictive(rmodel, guide=guide, params=params, num_samples=5)(jax.random.PRNGKey(1), GROUP, y=None)
    # the data's plan (a offset by mu), not a plan of the prior in which y is a latent funnel
    assert autoreparam.analyze(grouped, GROUP).plan["y"].noncentred
    assert post["y"].shape == (5, 6) and "y_decentered" not in post


def test_explicit_plan_and_a_first_call_without_data():
    plan = autoreparam.analyze(grouped, GROUP, y=Y).plan
    rmodel = autoreparam.reparameterize(grouped, plan=plan)
    prior = Predictive(rmodel, num_samples=7)(jax.random.PRNGKey(2), GROUP, y=None)
    assert prior["y"].shape == (7, 6) and np.all(np.isfinite(np.asarray(prior["y"])))
