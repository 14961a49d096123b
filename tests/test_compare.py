"""``compare`` never presents a failed fit as a result: convergence checks, the verdict, empty plans,
and the reliability of ``--mcmc`` runs (issue 14)."""

import textwrap

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.reparam import LocScaleReparam

import autoreparam.compare as compare_module
from autoreparam.cli import main
from autoreparam.compare import Comparison, FitSummary, MCMCComparison, MCMCSummary, compare, elbo_trend

FLAT = np.r_[np.linspace(100.0, 10.0, 200), np.full(800, 10.0)] + 0.1 * np.sin(np.arange(1000))


def fit(label, elbo, se, sites, losses=FLAT):
    return FitSummary(label, elbo, se, 1.0, np.asarray(losses), sites)


def test_elbo_trend_tells_rising_from_flat():
    rng = np.random.default_rng(0)
    noisy_flat = 10.0 + rng.standard_normal(1000)
    assert not elbo_trend(noisy_flat).rising
    still_falling = np.linspace(100.0, 10.0, 1000) + rng.standard_normal(1000)
    trend = elbo_trend(still_falling)
    assert trend.rising and trend.window == 100 and trend.gain == pytest.approx(9.0, abs=0.5)
    assert elbo_trend(np.linspace(100.0, 10.0, 50)) is None  # too short to tell
    tiny_drift = 10.0 - np.linspace(0.0, 0.05, 1000) + 0.001 * rng.standard_normal(1000)
    assert not elbo_trend(tiny_drift).rising  # significant, but far below half a nat


def test_means_far_apart_and_sd_wider_than_prior_are_warned():
    """The issue's run: sd ratio 191, means 1.1 against 705."""
    c = Comparison("AutoNormal", 1000, [fit("original", -500.0, 0.5, {"b": (1.1, 0.5)}),
                                        fit("reparameterized", -499.0, 0.5, {"b": (705.0, 95.5)})],
                   prior_sd={"b": 10.0})
    table = c.table()
    assert "b: the means disagree (1.1 against 705" in table
    assert "reparameterized: not converged: the sd of b (95.5) is 9.55 times its prior sd (10)" in table
    assert "original: not converged" not in table
    assert "(the reparameterized fit has not converged: more --steps may change this)" in table.splitlines()[-1]


def test_a_worse_reparameterized_fit_is_said_in_one_line_and_the_original_kept():
    c = Comparison("AutoNormal", 1000, [fit("original", -10094.0, 3.0, {"b": (0.0, 1.0)}),
                                        fit("reparameterized", -168419.0, 50.0, {"b": (0.0, 1.0)})])
    last = c.table().splitlines()[-1]
    assert last.startswith("the reparameterized fit is worse (ELBO -168419.00 against -10094.00, lower by 1.58e+05")
    assert last.endswith("keep the original model")
    c.fits[1].elbo = -10093.0  # within two standard errors: no clear difference
    assert c.table().splitlines()[-1].startswith("no clear difference")
    c.fits[1].elbo = -9000.0
    assert c.table().splitlines()[-1].startswith("recommendation: the reparameterized model (ELBO higher by")


def test_the_hybrid_is_judged_against_the_better_autonormal_fit_when_its_elbo_is_exact():
    sites = {"b": (0.0, 1.0)}
    c = Comparison("hybrid", 1000, [fit("original", -35.28, 0.05, sites), fit("reparameterized", -31.71, 0.03, sites),
                                    fit("hybrid", -31.40, 0.01, sites)])
    lines = c.table().splitlines()
    assert lines[-2].startswith("recommendation: the reparameterized model (ELBO higher by 3.57")
    assert lines[-1].startswith("hybrid: the best fit, ELBO higher by 0.31 +- 0.032 than the reparameterized fit")
    c.fits[2].elbo = -31.72
    assert c.table().splitlines()[-1].startswith("hybrid: no clear difference in ELBO (-0.01")
    c.fits[2].elbo = -40.0
    assert c.table().splitlines()[-1].startswith("hybrid: ELBO lower by 8.29")
    c.fits[2].elbo = float("nan")  # a CG block: no exact ELBO, so no claim
    assert c.table().splitlines()[-1].startswith("recommendation: the reparameterized model")


def test_mcmc_table_marks_runs_with_divergences_or_high_rhat():
    runs = [MCMCSummary("original", 2.0, 1000, 7, 40.0, "tau", 1.08, "theta"),
            MCMCSummary("offsets", 2.0, 1000, 0, 400.0, "tau", 1.002, "mu")]
    table = MCMCComparison(2, 100, 100, runs).table()
    rows = {line.split()[0]: line for line in table.splitlines() if line.split()[:1] in (["original"], ["offsets"])}
    assert rows["original"].split()[-1] == "no" and rows["offsets"].split()[-1] == "yes"
    assert ("original: 7 divergent transitions after warm-up and R-hat 1.080 on theta: its ESS figures are not "
            "to be trusted") in table


def hierarchical(group, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    with numpyro.plate("data", len(group)):
        numpyro.sample("y", dist.Normal(a[group], 1.0), obs=y)


GROUP = np.tile(np.arange(3), 10)
Y = (30.0 + np.random.default_rng(0).standard_normal(30)).astype(np.float32)


def test_a_short_run_is_reported_as_not_converged():
    """Data far from the guide's start: 200 steps of Adam at 1e-2 are still climbing."""
    c = compare(hierarchical, (GROUP,), {"y": Y}, steps=200)
    table = c.table()
    rows = [line for line in table.splitlines() if line.startswith(("original ", "reparameterized "))]
    assert rows and all(line.endswith("RISING") for line in rows), table
    assert "original: not converged: the ELBO rose by" in table
    assert table.splitlines()[-1].startswith("no recommendation yet: the reparameterized fit is ahead (ELBO higher by")
    assert table.splitlines()[-1].endswith("but the original and reparameterized fits have not converged; run more --steps")


WRAPPED = """\
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


def model_args():
    return (np.array([15., 10., 16., 11., 9., 11., 10., 18.]),), {"y": np.array([28., 8., -3., 7., -1., 1., 18., 12.])}
"""


def test_an_empty_plan_fits_the_model_once_and_says_so(capsys, tmp_path, monkeypatch):
    path = tmp_path / "wrapped.py"
    path.write_text(WRAPPED)
    labels = []

    def one_fit(label, model, guide_name, args, kwargs, steps, lr, seed, progress, sites):
        labels.append(label)
        return FitSummary(label, -31.0, 0.05, 0.1, FLAT[:steps], {n: (0.0, 1.0) for n in sites})

    monkeypatch.setattr(compare_module, "_fit", one_fit)
    code = main(["compare", str(path), "--steps", "150", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert labels == ["original"]
    assert "the plan is empty: the reparameterized model is the original model, so it was fitted once" in out
    assert "same seed for both" not in out
    assert not any(line.startswith("reparameterized ") for line in out.splitlines())


def test_mcmc_with_an_empty_plan_runs_nuts_once(monkeypatch):
    def scale_only(y=None):
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        with numpyro.plate("n", 4):
            numpyro.sample("y", dist.Normal(0.0, s), obs=y)

    labels = []

    def nuts(label, model, args, kwargs, sites, warmup, samples, chains, seed, progress):
        labels.append(label)
        return MCMCSummary(label, 1.0, 100, 0, 50.0, "s", 1.0, "s")

    monkeypatch.setattr(compare_module, "_nuts", nuts)
    result = compare_module.compare_mcmc(scale_only, (), {"y": np.ones(4, np.float32)}, warmup=10, samples=10)
    assert labels == ["original"]
    assert "offsets: not run, the plan is empty (the reparameterized model is the original model)" in result.table()


def test_means_are_compared_element_by_element():
    """Opposite errors in two elements average out in the site's mean; the elements do not hide them."""
    sites = {"a": (0.0, 0.1)}
    orig = fit("original", -50.0, 0.1, sites)
    rep = fit("reparameterized", -50.0, 0.1, sites)
    orig.elements = {"a": (np.array([1.0, -1.0, 0.0]), np.full(3, 0.1))}
    rep.elements = {"a": (np.array([-1.0, 1.0, 0.02]), np.full(3, 0.1))}
    table = Comparison("AutoNormal", 1000, [orig, rep]).table()
    assert ("a: the means disagree at 2 of its 3 elements (worst: element 0, 1 against -1, 20 posterior sds apart)"
            in table), table
    assert table.splitlines()[-1].endswith("the simpler one (but the fits' means disagree: see the warnings)")
