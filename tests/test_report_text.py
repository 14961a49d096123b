"""The report's list of pairs (issue 14): a pair shared by two observed sites is said once with both,
and an explanation mentions a covariate only when the model has one."""

import numpy as np
import numpyro
import numpyro.distributions as dist

import autoreparam

G = np.tile(np.arange(4), 3)
ONES = np.ones(12, np.float32)


def two_likelihoods(g, u, y=None, z=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    w = numpyro.sample("w", dist.Normal(0, 5))
    with numpyro.plate("groups", 4):
        a = numpyro.sample("a", dist.Normal(0, 1))
        b = numpyro.sample("b", dist.Normal(0, 1))
    with numpyro.plate("data", len(g)):
        numpyro.sample("y", dist.Normal(mu + 2.0 * a[g] + w * u[g], 1.0), obs=y)  # a fixed 2, a covariate u
        numpyro.sample("z", dist.Normal(mu + 2.0 * a[g] - b[g], 1.0), obs=z)


def test_a_shared_pair_is_listed_once_and_no_covariate_is_invented():
    report = autoreparam.analyze(two_likelihoods, G, np.array([0.3, 1.2, -0.5, 2.0]), y=ONES, z=ONES)
    pairs = report.pairs()
    assert pairs[("y", "mu", "a")] == pairs[("z", "mu", "a")] == 1  # the data keep both
    lines = [line.strip() for line in str(report).splitlines() if line.startswith("  {")]
    mu_a = [line for line in lines if line.startswith("{mu, a}")]
    assert len(mu_a) == 1 and " in y, z: a absorbs 0.5 x mu (broadcast) " in mu_a[0]
    assert any(line.startswith("{w, a}") and "a absorbs w times a covariate constant within levels of a" in line
               for line in lines)  # u is a real covariate
    assert any(line.startswith("{a, b}") and "in z: b absorbs -2 x a (each level of b sits in one level of a)"
               in line for line in lines), lines
    assert sum("covariate" in line for line in lines) == 1
    assert f"likelihood-invariant pairs ({len(lines)}):" in str(report)
    plan_text = str(report.plan)
    assert "a <- mu (scaled 0.5, xi" in plan_text and "w (covariate, xi" in plan_text
    assert report.plan["a"].offsets[0].structure == "covariate"  # the plan's data are unchanged
