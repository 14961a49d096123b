"""Models that are already reparameterized (issue 14): what the model does is reported, ``unwrap``
analyses the model underneath a ``handlers.reparam`` / ``@autoreparam.auto`` wrapper, and a plan that
fights the existing reparameterization is warned about."""

from dataclasses import replace

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.reparam import LocScaleReparam

import autoreparam
from autoreparam.api import unwrap_model
from autoreparam.cli import main
from autoreparam.notes import NoteKind
from autoreparam.planning import existing_conflicts
from autoreparam.report import Existing

SIGMA = np.array([15., 10., 16., 11., 9., 11., 10., 18.], dtype=np.float32)
Y = np.array([28., 8., -3., 7., -1., 1., 18., 12.], dtype=np.float32)


def schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("J", len(sigma)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


WRAPPED = handlers.reparam(schools, config={"theta": LocScaleReparam(0)})


def test_a_handlers_reparam_wrapper_is_reported_and_unwrap_analyses_the_model_underneath():
    report = autoreparam.analyze(WRAPPED, SIGMA, y=Y)
    assert [(e.site, e.how, e.reparam) for e in report.existing] == [
        ("theta", "wrapper", "LocScaleReparam(centered=0): non-centred")]
    text = str(report)
    assert "already reparameterized in the model:\n  theta: LocScaleReparam(centered=0): non-centred" in text
    assert "--unwrap" in text
    assert report.plan.is_empty() and report.sites["theta"].type == "deterministic"
    assert report.to_json()["existing"][0]["site"] == "theta"

    under = autoreparam.analyze(WRAPPED, SIGMA, y=Y, unwrap=True)
    assert under.sites["theta"].type == "latent" and "theta_decentered" not in under.sites
    assert [f.site for f in under.funnels] == ["theta"]
    assert under.plan["theta"].noncentred
    assert "unwrapped (analysed without it, as asked):" in str(under)
    assert autoreparam.reparameterize(WRAPPED, unwrap=True).model is schools


def test_unwrap_keeps_the_other_handlers_and_strips_auto():
    conditioned = handlers.condition(WRAPPED, data={"mu": 1.0})
    under = autoreparam.unwrap(conditioned)
    assert isinstance(under, handlers.condition) and under.fn is schools and under.data == {"mu": 1.0}
    assert conditioned.fn is WRAPPED  # the model as written is left alone
    assert autoreparam.unwrap(autoreparam.auto(schools)) is schools
    assert autoreparam.unwrap(schools) is schools
    with pytest.warns(UserWarning, match="no handlers.reparam or @autoreparam.auto wrapper"):
        autoreparam.analyze(lambda: numpyro.sample("x", dist.Normal(0, 1)), unwrap=True)


def test_decentered_sites_and_hand_noncentring_are_reported():
    def inner(g, y=None):
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        tau = numpyro.sample("tau", dist.HalfNormal(2))
        with numpyro.plate("groups", 4), handlers.reparam(config={"a": LocScaleReparam(0)}):
            a = numpyro.sample("a", dist.Normal(mu, tau))
        with numpyro.plate("data", len(g)):
            numpyro.sample("y", dist.Normal(a[g], 1.0), obs=y)

    def by_hand(g, y=None):
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        tau = numpyro.sample("tau", dist.HalfNormal(2))
        with numpyro.plate("groups", 4):
            a_raw = numpyro.sample("a_raw", dist.Normal(0, 1))
        with numpyro.plate("data", len(g)):
            numpyro.sample("y", dist.Normal(mu + tau * a_raw[g], 1.0), obs=y)

    g, y = np.tile(np.arange(4), 3), np.ones(12, np.float32)
    report = autoreparam.analyze(inner, g, y=y)
    assert [(e.site, e.how) for e in report.existing] == [("a", "decentered")]
    assert "a = loc + scale * a_decentered: non-centred already" in str(report)
    report = autoreparam.analyze(by_hand, g, y=y)
    assert [(e.site, e.how) for e in report.existing] == [("a_raw", "by hand")]
    assert "a_raw enters y as mu + tau * a_raw, with a fixed Normal prior: non-centred by hand" in str(report)


def test_a_plan_that_fights_the_existing_reparameterization_is_warned_about():
    def strong(g, y=None):
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        tau = numpyro.sample("tau", dist.HalfNormal(2))
        with numpyro.plate("groups", 3):
            a = numpyro.sample("a", dist.Normal(mu, tau))
        with numpyro.plate("data", len(g)):
            numpyro.sample("y", dist.Normal(a[g], 0.1), obs=y)

    g = np.tile(np.arange(3), 30)
    y = (np.array([1.0, 2.0, 3.0])[g] + 0.1 * np.random.default_rng(0).standard_normal(g.size)).astype(np.float32)
    wrapped = handlers.reparam(strong, config={"a": LocScaleReparam(0)})
    report = autoreparam.analyze(wrapped, g, y=y, unwrap=True)
    assert "a" not in report.plan.names or not report.plan["a"].noncentred  # well informed: kept centred
    fights = [n for n in report.notes if n.kind is NoteKind.FIGHTS_EXISTING]
    assert [n.site for n in fights] == ["a"]
    assert fights[0].startswith("the stripped wrapper non-centred 'a' (LocScaleReparam(centered=0): non-centred), "
                                "but the plan")
    assert NoteKind.FIGHTS_EXISTING.warns

    def fixed_scale(g, y=None):  # b = 10 * b_decentered is additive: the plan offsets b_decentered again
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        with numpyro.plate("groups", 3):
            b = numpyro.sample("b", dist.Normal(0, 10))
        with numpyro.plate("data", len(g)):
            numpyro.sample("y", dist.Normal(mu + b[g], 0.1), obs=y)

    report = autoreparam.analyze(handlers.reparam(fixed_scale, config={"b": LocScaleReparam(0)}), g, y=y)
    assert "b_decentered" in report.plan.names
    fights = [n for n in report.notes if n.kind is NoteKind.FIGHTS_EXISTING]
    assert [n.site for n in fights] == ["b_decentered"]
    assert "which the model already non-centres (wrapper): the two stack" in fights[0]


@pytest.mark.parametrize("centered, noncentred", [(0, True), (0.0, True), (1, False), (None, False), (0.5, False)])
def test_a_wrapper_that_non_centres_is_marked_so(centered, noncentred):
    wrapped = handlers.reparam(schools, config={"theta": LocScaleReparam(centered)})
    [existing] = unwrap_model(wrapped)[1]
    assert existing.noncentred is noncentred


def test_the_planning_reads_whether_a_stripped_wrapper_non_centred_from_the_flag_not_its_text():
    plan = autoreparam.Plan("model", ())
    custom = Existing("a", "wrapper", "a: MyReparam (handlers.reparam wrapper)", reparam="MyReparam",
                      unwrapped=True, noncentred=True)
    assert [(n.kind, n.site) for n in existing_conflicts(plan, [custom])] == [(NoteKind.FIGHTS_EXISTING, "a")]
    assert existing_conflicts(plan, [replace(custom, noncentred=False)]) == []


WRAPPED_FILE = """\
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer.reparam import LocScaleReparam


def base(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("J", len(sigma)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


model = handlers.reparam(base, config={"theta": LocScaleReparam(0)})
plain = base


def model_args():
    return (np.array([15., 10., 16., 11., 9., 11., 10., 18.]),), {"y": np.array([28., 8., -3., 7., -1., 1., 18., 12.])}
"""


def test_cli_unwrap(capsys, tmp_path):
    path = tmp_path / "wrapped.py"
    path.write_text(WRAPPED_FILE)
    assert main(["analyze", str(path), "--unwrap"]) == 0
    out, err = capsys.readouterr()
    assert "unwrapped (analysed without it, as asked):" in out
    assert "theta  non-centred (centredness" in out and err == ""
    assert main(["analyze", str(path), "--model", "plain", "--unwrap"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"autoreparam: warning: {path}: --unwrap: the model has no handlers.reparam "
                                "wrapper; analysed as it is"]


def test_compare_with_unwrap_fits_the_wrapper_against_the_plan(monkeypatch):
    import autoreparam.compare as compare_module

    calls = []

    def fake_fit(label, model, guide_name, args, kwargs, steps, lr, seed, progress, sites):
        calls.append((label, model, list(sites)))
        return compare_module.FitSummary(label, -31.0, 0.05, 0.1, np.zeros(steps), {n: (0.0, 1.0) for n in sites})

    monkeypatch.setattr(compare_module, "_fit", fake_fit)
    result = compare_module.compare(WRAPPED, (SIGMA,), {"y": Y}, steps=5, unwrap=True)
    assert [c[0] for c in calls] == ["original", "reparameterized"] and not result.plan_empty
    assert calls[0][1] is WRAPPED  # the model as written, wrapper and all
    assert calls[1][1].model is schools  # the plan on the model underneath, without the wrapper
    assert calls[0][2] == ["mu", "tau", "theta"]
    calls.clear()
    result = compare_module.compare(WRAPPED, (SIGMA,), {"y": Y}, steps=5)
    assert [c[0] for c in calls] == ["original"] and result.plan_empty
