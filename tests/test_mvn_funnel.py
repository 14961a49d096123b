"""MultivariateNormal funnels (issue 14): detected, reported, planned and non-centred exactly.

``MultivariateNormal(loc, scale_tril=diag(sigma) @ L)`` with latent ``sigma`` and ``L`` (Statistical
Rethinking's varying slopes) is a funnel. The plan non-centres it by its Cholesky factor:
``z ~ Normal(0, 1)`` per coordinate and ``a = loc + scale_tril @ z``. Exactness: the reparameterized
log joint equals the original at ``a`` plus ``log|det scale_tril|`` counted once, whatever the
model's ``scale`` and ``mask`` do (a subsampled plate weighs it by ``size / subsample_size``).
"""

import json
from contextlib import nullcontext
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer import Predictive
from numpyro.infer.util import log_density

import autoreparam
from autoreparam import Offset, Plan, PlanError, SitePlan
from autoreparam.plan import SparseMap
from autoreparam.trace import unwrap_distribution
from helpers import one_line

K = 4  # cafes
CAFE = jnp.asarray(np.repeat(np.arange(K), 3))
AFTERNOON = jnp.asarray(np.tile([0.0, 1.0, 1.0], K))
WAIT = jnp.asarray(np.random.default_rng(0).normal(3.0, 1.0, 3 * K), jnp.float32)
MASK = np.arange(K) % 2 == 0


def varying_slopes(cafe, afternoon, wait=None, handler=None, factor="scale_tril", subsample_size=None, events=False):
    """Cafe intercepts and slopes ``(a_cafe, b_cafe) ~ MVN((a, b), diag(sigma_cafe) L_Rho L_Rho^T diag(sigma_cafe))``."""
    a = numpyro.sample("a", dist.Normal(5.0, 2.0))
    b = numpyro.sample("b", dist.Normal(-1.0, 0.5))
    sigma_cafe = numpyro.sample("sigma_cafe", dist.Exponential(1.0).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.Exponential(1.0))
    L_Rho = numpyro.sample("L_Rho", dist.LKJCholesky(2, 2.0))
    scale_tril = sigma_cafe[:, None] * L_Rho
    loc = jnp.stack([a, b])
    law = {"scale_tril": lambda: dist.MultivariateNormal(loc, scale_tril=scale_tril),
           "covariance_matrix": lambda: dist.MultivariateNormal(loc, covariance_matrix=scale_tril @ scale_tril.T),
           "precision_matrix": lambda: dist.MultivariateNormal(
               loc, precision_matrix=jnp.linalg.inv(scale_tril @ scale_tril.T)),
           # a rank-one factor plus a diagonal: LowRankMultivariateNormal, non-centred by its scale_tril
           "low_rank": lambda: dist.LowRankMultivariateNormal(loc, cov_factor=scale_tril[:, :1],
                                                              cov_diag=0.5 * sigma_cafe ** 2)}[factor]
    if events:  # one site of K intercept-slope pairs: the MVN .expand([K]).to_event(1), no plate
        ab = numpyro.sample("ab_cafe", law().expand([K]).to_event(1))
    else:
        with numpyro.plate("cafes", K, subsample_size=subsample_size) as idx:
            context = {None: nullcontext, "scale": lambda: handlers.scale(scale=2.5),
                       "mask": lambda: handlers.mask(mask=jnp.asarray(MASK)[idx])}[handler]()
            with context:
                fn = law()
                ab = numpyro.sample("ab_cafe", fn)
    if subsample_size is not None:
        return
    mu = ab[cafe, 0] + ab[cafe, 1] * afternoon
    with numpyro.plate("visits", len(cafe)):
        numpyro.sample("wait", dist.Normal(mu, sigma), obs=wait)


def cholesky_plan(n=K) -> Plan:
    return Plan("varying_slopes", (SitePlan("ab_cafe", (n, 2), (n,), (), (0.0,) * n, False, True),))


# -- detection, report, plan ----------------------------------------------------------------------
def test_varying_slopes_funnel_is_detected_reported_and_planned():
    report = autoreparam.analyze(varying_slopes, CAFE, AFTERNOON, wait=WAIT)
    [funnel] = [f for f in report.funnels if f.site == "ab_cafe"]
    assert funnel.distribution == "MultivariateNormal"
    assert set(funnel.scale_parents) == {"sigma_cafe", "L_Rho"} and set(funnel.loc_parents) == {"a", "b"}
    assert "ab_cafe ~ MultivariateNormal: Cholesky factor depends on sigma_cafe, L_Rho" in str(report)
    assert {"site": "ab_cafe", "distribution": "MultivariateNormal", "scale_parents": ["sigma_cafe", "L_Rho"],
            "loc_parents": ["a", "b"]} in report.to_json()["funnels"]
    plan = report.plan
    assert plan["ab_cafe"] == cholesky_plan()["ab_cafe"]
    assert "ab_cafe  non-centred by its Cholesky factor" in str(plan)
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


@pytest.mark.parametrize("factor", ["covariance_matrix", "precision_matrix", "low_rank"])
def test_a_latent_covariance_or_precision_matrix_is_a_funnel_too(factor):
    report = autoreparam.analyze(varying_slopes, CAFE, AFTERNOON, wait=WAIT, factor=factor)
    assert {f.site: set(f.scale_parents) for f in report.funnels}["ab_cafe"] == {"sigma_cafe", "L_Rho"}
    assert report.plan["ab_cafe"] == cholesky_plan()["ab_cafe"]


def test_an_mvn_funnel_that_the_data_dominate_stays_centred():
    # 40 visits per cafe and cafe effects of sd 2 against noise 0.3: centredness near 1 per coordinate
    rng = np.random.default_rng(5)
    cafe = np.repeat(np.arange(K), 40)
    afternoon = np.tile([0.0, 1.0], 20 * K)
    effects = rng.normal(0.0, 2.0, (K, 2))
    wait = effects[cafe, 0] + effects[cafe, 1] * afternoon + rng.normal(0.0, 0.3, cafe.size)
    report = autoreparam.analyze(varying_slopes, jnp.asarray(cafe), jnp.asarray(afternoon),
                                 wait=jnp.asarray(wait, jnp.float32))
    assert "ab_cafe" in {f.site for f in report.funnels}
    assert "ab_cafe" not in report.plan.names


def test_an_mvn_with_a_fixed_factor_is_no_funnel():
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with numpyro.plate("g", 3):
            ab = numpyro.sample("ab", dist.MultivariateNormal(mu, scale_tril=jnp.array([[1.0, 0.0], [0.5, 1.0]])))
        numpyro.sample("y", dist.Normal(ab, 1.0).to_event(2), obs=y)

    report = autoreparam.analyze(model, y=jnp.zeros((3, 2)))
    assert report.funnels == [] and report.plan.is_empty()


# -- exactness -----------------------------------------------------------------------------------------
def assert_exact(model, plan, kwargs, jacobian_weight=1.0):
    """Reparameterized log joint == original log joint + weight * log|det scale_tril| at random points."""
    args = (CAFE, AFTERNOON)
    rmodel = autoreparam.reparameterize(model, plan)
    original_latent = [n for n, s in handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs).items()
                       if s["type"] == "sample" and not s["is_observed"]]
    for seed in (1, 2):
        tr = handlers.trace(handlers.seed(rmodel, seed)).get_trace(*args, **kwargs)
        assert "ab_cafe_decentered" in tr and tr["ab_cafe"]["type"] == "deterministic"
        latent = {n: s["value"] for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
        plates = {n: s["value"] for n, s in tr.items() if s["type"] == "plate"}
        lp_reparam, _ = log_density(rmodel, args, kwargs, {**latent, **plates})
        lp_orig, otr = log_density(model, args, kwargs, {**{n: tr[n]["value"] for n in original_latent}, **plates})
        core = unwrap_distribution(otr["ab_cafe"]["fn"])
        z = latent["ab_cafe_decentered"]
        # The transformation itself: the value is loc + L z with the original site's Cholesky factor.
        np.testing.assert_allclose(np.asarray(tr["ab_cafe"]["value"]),
                                   np.asarray(core.loc + jnp.einsum("...ij,...j->...i", core.scale_tril, z)),
                                   rtol=1e-5, atol=1e-5)
        diag = jnp.diagonal(jnp.broadcast_to(core.scale_tril, z.shape + (2,)), axis1=-2, axis2=-1)
        jac = float(jnp.sum(jnp.log(diag)))
        assert abs(jac) > 1e-2  # the Jacobian is not vacuous at this point
        np.testing.assert_allclose(float(lp_reparam), float(lp_orig) + jacobian_weight * jac, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("handler", [None, "scale", "mask"])
def test_cholesky_noncentring_is_exact_under_the_models_handlers(handler):
    assert_exact(varying_slopes, cholesky_plan(), {"wait": WAIT, "handler": handler})


@pytest.mark.parametrize("factor", ["covariance_matrix", "precision_matrix", "low_rank"])
def test_cholesky_noncentring_is_exact_for_a_covariance_or_precision_matrix(factor):
    assert_exact(varying_slopes, cholesky_plan(), {"wait": WAIT, "factor": factor})


def test_cholesky_noncentring_under_a_subsampled_plate_weighs_the_jacobian_by_the_subsample():
    assert_exact(varying_slopes, cholesky_plan(2), {"subsample_size": 2}, jacobian_weight=K / 2)


def test_cholesky_noncentring_is_exact_for_an_mvn_with_event_dims():
    # K pairs in one event: the Jacobian is counted once per pair, the density once (a regression: the
    # decentred law had batch shape (K,) and counted the site's whole density K times)
    plan = Plan("varying_slopes", (SitePlan("ab_cafe", (K, 2), (), (), (0.0,), False, True),))
    assert_exact(varying_slopes, plan, {"wait": WAIT, "events": True})


@pytest.mark.parametrize("factor", ["scale_tril", "low_rank"])
def test_prior_samples_are_unchanged(factor):
    """Location, spread and the correlation of intercepts and slopes, over many prior draws."""
    model = partial(varying_slopes, factor=factor)
    rmodel = autoreparam.reparameterize(model, cholesky_plan())
    args = (CAFE, AFTERNOON)
    orig = Predictive(model, num_samples=4000)(jax.random.PRNGKey(2), *args)
    rep = Predictive(rmodel, num_samples=4000)(jax.random.PRNGKey(1), *args)
    for name in ("ab_cafe", "wait"):
        x, z = np.asarray(orig[name], np.float64), np.asarray(rep[name], np.float64)
        moments = [lambda v: v, lambda v: np.abs(v - np.median(v, axis=0))]
        if name == "ab_cafe":
            moments.append(lambda v: (v[..., 0] - v[..., 0].mean(0)) * (v[..., 1] - v[..., 1].mean(0)))
        for f in moments:
            fx, fz = f(x), f(z)
            se = np.sqrt(fx.var(0) / len(fx) + fz.var(0) / len(fz))
            assert np.max(np.abs(fx.mean(0) - fz.mean(0)) / se) < 5, name


# -- plans that do not fit ----------------------------------------------------------------------------
def test_cholesky_needs_full_fixed_noncentring_without_offsets():
    offset = Offset("a", SparseMap((2 * K, 1), tuple(range(2 * K)), (0,) * (2 * K), (1.0,) * (2 * K)),
                    SparseMap((1, 1), (0,), (0,), (1.0,)), (0.0,) * K)
    for bad in (SitePlan("ab_cafe", (K, 2), (K,), (), (0.5,) * K, False, True),
                SitePlan("ab_cafe", (K, 2), (K,), (), (0.0,) * K, True, True),
                SitePlan("ab_cafe", (K, 2), (K,), (offset,), (0.0,) * K, False, True)):
        with pytest.raises(PlanError, match="site 'ab_cafe'.*'cholesky'") as exc:
            bad.check()
        one_line(exc.value)


def test_editing_the_centredness_of_a_cholesky_site_keeps_the_plan_valid():
    """It used to write a learned loc-scale centredness into the Cholesky site (refused only later)."""
    plan = cholesky_plan()
    assert plan.with_centredness("ab_cafe", 0.0) == plan and plan.with_centredness("ab_cafe", np.float32(0.0)) == plan
    assert "ab_cafe" not in plan.with_centredness("ab_cafe", None).names
    with pytest.raises(PlanError, match=r"site 'ab_cafe' is non-centred by its Cholesky factor, all or nothing: "
                                        r"centredness 0 or 1 \(None\), got 0.5") as exc:
        plan.with_centredness("ab_cafe", 0.5)
    one_line(exc.value)
    with pytest.raises(PlanError, match=r"centredness for site 'ab_cafe' must be a number in \[0, 1\] or None, "
                                        r"got '0.5'"):
        plan.with_centredness("ab_cafe", "0.5")
    # Centred, the plan no longer knows it is a MultivariateNormal: cholesky=True says so, and undoes it.
    plan = Plan("varying_slopes", plan.sites, (), (("ab_cafe", (K, 2), (K,)),))
    centred = plan.with_centredness("ab_cafe", None)
    assert "ab_cafe" not in centred.names and centred.with_centredness("ab_cafe", 0.0, cholesky=True) == plan
    with pytest.raises(PlanError, match=r"with_centredness\('ab_cafe', 0.0, cholesky=True\)"):
        handlers.seed(autoreparam.reparameterize(varying_slopes, centred.with_centredness("ab_cafe", 0.0)), 0)(
            CAFE, AFTERNOON)


def test_a_plan_that_noncentres_an_mvn_otherwise_or_a_normal_by_cholesky_is_refused():
    loc_scale = Plan("varying_slopes", (SitePlan("ab_cafe", (K, 2), (K,), (), (0.0,) * K, False),))
    with pytest.raises(PlanError, match="'ab_cafe' is a MultivariateNormal.*Cholesky") as exc:
        handlers.seed(autoreparam.reparameterize(varying_slopes, loc_scale), 0)(CAFE, AFTERNOON)
    one_line(exc.value)
    on_normal = Plan("varying_slopes", (SitePlan("a", (), (), (), (0.0,), False, True),))
    with pytest.raises(PlanError, match="'a' is Normal.*MultivariateNormal sites only") as exc:
        handlers.seed(autoreparam.reparameterize(varying_slopes, on_normal), 0)(CAFE, AFTERNOON)
    one_line(exc.value)


# -- emitted source ---------------------------------------------------------------------------------------
# The varying-slopes model as a file a user wrote; `handler` puts scale or mask around the MVN site.
SOURCE = '''from contextlib import nullcontext

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers


def model(cafe, afternoon, wait=None, handler=None, subsample_size=None):
    a = numpyro.sample("a", dist.Normal(5.0, 2.0))
    b = numpyro.sample("b", dist.Normal(-1.0, 0.5))
    sigma_cafe = numpyro.sample("sigma_cafe", dist.Exponential(1.0).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.Exponential(1.0))
    L_Rho = numpyro.sample("L_Rho", dist.LKJCholesky(2, 2.0))
    with numpyro.plate("cafes", 4, subsample_size=subsample_size) as idx:
        context = {None: nullcontext, "scale": lambda: handlers.scale(scale=2.5),
                   "mask": lambda: handlers.mask(mask=idx % 2 == 0)}[handler]()
        with context:
            ab = numpyro.sample("ab_cafe", dist.MultivariateNormal(jnp.stack([a, b]), scale_tril=sigma_cafe[:, None] * L_Rho))
    if subsample_size is not None:
        return
    mu = ab[cafe, 0] + ab[cafe, 1] * afternoon
    with numpyro.plate("visits", len(cafe)):
        numpyro.sample("wait", dist.Normal(mu, sigma), obs=wait)
'''


def emitted_pair(tmp_path, plan):
    """The user's model, the emitted model and the runtime reparameterization, all from SOURCE."""
    from emit_support import import_source

    result = autoreparam.emit_source(SOURCE, "model", plan)
    assert result.rewritten == ("ab_cafe",) and not result.warnings
    original = import_source(SOURCE, tmp_path, stem="original").model
    return original, import_source(result.source, tmp_path, stem="emitted").model, result


def test_the_emitter_noncentres_a_cholesky_site_in_the_source(tmp_path):
    _, _, result = emitted_pair(tmp_path, cholesky_plan())
    assert "'ab_cafe_decentered'" in result.source and "AutoreparamDecentredMVN(dist.MultivariateNormal(" \
        in result.source
    # A plan without Cholesky sites does not carry the MVN helper.
    one = SparseMap((1, 1), (0,), (0,), (1.0,))
    plain = autoreparam.emit_source(SOURCE, "model", Plan("model", (SitePlan("b", (), (), (Offset("a", one, one, (0.5,)),)),)))
    assert plain.rewritten == ("b",) and "DecentredMVN" not in plain.source


@pytest.mark.parametrize("handler", [None, "scale", "mask"])
def test_the_emitted_cholesky_site_has_the_runtimes_log_joint(handler, tmp_path):
    """Emitted and runtime reparameterizations give one log joint (the runtime's is exact, above)."""
    _, emitted, _ = emitted_pair(tmp_path, cholesky_plan())
    _same_log_joint(emitted, autoreparam.reparameterize(varying_slopes, cholesky_plan()),
                    {"wait": WAIT, "handler": handler})


def test_the_emitted_cholesky_site_under_a_subsampled_plate_weighs_its_jacobian_like_the_runtime(tmp_path):
    _, emitted, _ = emitted_pair(tmp_path, cholesky_plan(2))
    _same_log_joint(emitted, autoreparam.reparameterize(varying_slopes, cholesky_plan(2)), {"subsample_size": 2})


def _same_log_joint(emitted, runtime, kwargs):
    args = (CAFE, AFTERNOON)
    for seed in (3, 4):
        tr = handlers.trace(handlers.seed(runtime, seed)).get_trace(*args, **kwargs)
        values = {n: s["value"] for n, s in tr.items()
                  if s["type"] == "plate" or (s["type"] == "sample" and not s["is_observed"])}
        lp_runtime, _ = log_density(runtime, args, kwargs, values)
        lp_emitted, etr = log_density(emitted, args, kwargs, values)
        np.testing.assert_allclose(np.asarray(etr["ab_cafe"]["value"]), np.asarray(tr["ab_cafe"]["value"]),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(lp_emitted), float(lp_runtime), rtol=1e-5, atol=1e-4)


def test_the_emitted_cholesky_site_with_event_dims_has_the_runtimes_log_joint(tmp_path):
    from emit_support import import_source

    plan = Plan("model", (SitePlan("ab_cafe", (K, 2), (), (), (0.0,), False, True),))
    plated = '''    with numpyro.plate("cafes", 4, subsample_size=subsample_size) as idx:
        context = {None: nullcontext, "scale": lambda: handlers.scale(scale=2.5),
                   "mask": lambda: handlers.mask(mask=idx % 2 == 0)}[handler]()
        with context:
            ab = numpyro.sample("ab_cafe", dist.MultivariateNormal(jnp.stack([a, b]), scale_tril=sigma_cafe[:, None] * L_Rho))
'''
    assert plated in SOURCE
    source = SOURCE.replace(plated, '''    ab = numpyro.sample("ab_cafe", dist.MultivariateNormal(
        jnp.stack([a, b]), scale_tril=sigma_cafe[:, None] * L_Rho).expand([4]).to_event(1))
''')
    result = autoreparam.emit_source(source, "model", plan)
    assert result.rewritten == ("ab_cafe",)
    emitted = import_source(result.source, tmp_path, stem="emitted").model
    runtime = autoreparam.reparameterize(partial(varying_slopes, events=True), Plan("varying_slopes", plan.sites))
    _same_log_joint(emitted, runtime, {"wait": WAIT})


def test_the_emitted_cholesky_site_draws_the_original_prior(tmp_path):
    original, emitted, _ = emitted_pair(tmp_path, cholesky_plan())
    args = (CAFE, AFTERNOON)
    orig = Predictive(original, num_samples=4000)(jax.random.PRNGKey(2), *args)["ab_cafe"]
    emit = Predictive(emitted, num_samples=4000)(jax.random.PRNGKey(1), *args)["ab_cafe"]
    x, z = np.asarray(orig, np.float64), np.asarray(emit, np.float64)
    for f in (lambda v: v, lambda v: np.abs(v - np.median(v, axis=0)),
              lambda v: (v[..., 0] - v[..., 0].mean(0)) * (v[..., 1] - v[..., 1].mean(0))):
        fx, fz = f(x), f(z)
        se = np.sqrt(fx.var(0) / len(fx) + fz.var(0) / len(fz))
        assert np.max(np.abs(fx.mean(0) - fz.mean(0)) / se) < 5
