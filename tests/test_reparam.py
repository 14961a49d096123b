"""Reparameterized models: exact, the same prior, the shrinkage they remove, and bad input.

Exactness: a reparameterized site ``a`` is sampled as ``a_base`` with density
``p_a(a_base + offset)`` and returned as the deterministic ``a = a_base + offset``: a change of
variables with unit Jacobian. So for ANY xi (random values of every ``*_offset_*`` param) the log
joint of the reparameterized model at its latent values equals the original log joint at the
values of the deterministic sites. Non-centred sites (written out as NumPyro's ``LocScaleReparam`` would) add the
known Jacobian ``sum (1 - c) log scale`` of the decentring, which the check accounts for.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
from jax.extend.core import jaxprs_in_params
import numpy as np
import numpyro
import numpyro.distributions as dist
import numpyro.primitives
import pytest
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoNormal
from numpyro.infer.util import log_density

import autoreparam
import eight_schools
import tensor_model
import zoo
from helpers import one_line
from autoreparam import InputError, PlanError, SitePlan
from autoreparam.reparam import apply_config, build_config
from autoreparam.trace import unwrap_distribution


# -- models ------------------------------------------------------------------------------------
TENSOR_ARGS = (3, 2, 4)  # I, J, T: GaussianRandomWalk sites z, A, B; plates i at dim -2, j at -1
TENSOR_KWARGS = {"y": tensor_model.simulate(*TENSOR_ARGS)}

SUB_Y = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)


def subsampled_model(y=None):
    """A local latent site ``a`` inside a subsampled plate (its shape is the subsample size),
    next to global sites ``mu`` and ``b`` (one per column)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("cols", y.shape[1]):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", y.shape[0], subsample_size=4) as gi:
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu + a[:, None] + b, 0.5).to_event(1), obs=jnp.asarray(y)[gi])


def plate_dim_model(x, y=None):
    """Plates at dims -2 and -1 (sites of shape (I, 1) and (J,)), a vector site with
    ``expand().to_event(1)`` inside a plate, and a GaussianRandomWalk site."""
    I, J = y.shape[:2]
    mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
    trend = numpyro.sample("trend", dist.GaussianRandomWalk(0.5, num_steps=J))  # (J,)
    with numpyro.plate("rows", I, dim=-2):
        r = numpyro.sample("r", dist.Normal(0.0, 1.0))  # (I, 1)
    with numpyro.plate("cols", J, dim=-1):
        c = numpyro.sample("c", dist.Normal(0.0, 1.0).expand([2]).to_event(1))  # (J, 2)
    loc = mu + r + trend + c[:, 0] + x * c[:, 1]  # (I, J)
    with numpyro.plate("rows", I, dim=-2), numpyro.plate("cols", J, dim=-1):
        numpyro.sample("y", dist.Normal(loc, 0.3), obs=y)


PD_X = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
PD_Y = np.random.default_rng(4).normal(size=(4, 3)).astype(np.float32)


def _zoo_case(name):
    zm = zoo.by_name(name)
    return zm.model, zm.args, zm.kwargs


CASES = {
    # tensor: offsets and (forced) non-centring on the same sites, see analysed()
    "tensor": (tensor_model.model, TENSOR_ARGS, TENSOR_KWARGS),
    "crossed": _zoo_case("crossed"),  # index arrays, unbalanced, an unobserved level
    "nested": _zoo_case("nested"),  # gather map; r is non-centred and has offsets
    "vector": _zoo_case("vector"),  # .expand([K]).to_event(1) and .to_event(2) sites
    "plate_dim": (plate_dim_model, (PD_X,), {"y": PD_Y}),
    "subsampled": (subsampled_model, (), {"y": SUB_Y}),
    "eight_schools": (eight_schools.model, *eight_schools.model_args()),  # non-centring only
}

_ANALYSED = {}


def analysed(case):
    """``(reparameterized model, plan)`` of a case, analysed once per session. The tensor
    model's plan also non-centres a (partially) and C (fully), so that offsets and non-centring
    compose on the same sites."""
    if case not in _ANALYSED:
        model, args, kwargs = CASES[case]
        rmodel = autoreparam.reparameterize(model)
        plan = rmodel.plan_for(*args, **kwargs)
        if case == "tensor":
            plan = plan.with_centredness("a", 0.3).with_centredness("C", 0.0)
            rmodel = autoreparam.reparameterize(model, plan)
        _ANALYSED[case] = rmodel, plan
    return _ANALYSED[case]


def plan_of(case):
    return analysed(case)[1]


def random_params(rmodel, plan, args, kwargs, rng):
    """Random values for every param: xi = init + step * param spans roughly init +- 1."""
    tr = handlers.trace(handlers.seed(rmodel, 0)).get_trace(*args, **kwargs)
    params = {}
    for name, site in tr.items():
        if site["type"] != "param":
            continue
        shape = np.shape(site["value"])
        if "_offset_" in name:
            params[name] = jnp.asarray(rng.normal(size=shape) / plan.xi_step, jnp.float32)
        elif name.endswith("_centered"):
            params[name] = jnp.asarray(rng.uniform(0.1, 0.9, size=shape), jnp.float32)
        else:
            raise AssertionError(f"unexpected param site {name}")
    return params


def decentring_log_jacobian(site, c, orig_trace):
    """``sum (1 - c) log scale`` of a non-centred site (LocScaleReparam's Jacobian)."""
    value = orig_trace[site.name]["value"]
    c = jnp.reshape(c, tuple(site.batch_shape) + (1,) * (value.ndim - len(site.batch_shape)))
    scale = unwrap_distribution(orig_trace[site.name]["fn"]).scale
    return jnp.sum(jnp.broadcast_to((1.0 - c) * jnp.log(scale), value.shape))


def site_log_probs(trace):
    out = {}
    for name, site in trace.items():
        if site["type"] == "sample":
            lp = jnp.sum(site["fn"].log_prob(site["value"]))
            out[name] = lp if site.get("scale") is None else lp * site["scale"]
    return out


def exactness_check(model, rmodel, plan, args, kwargs):
    """A jitted ``(params, key) -> log joints`` of both models: the reparameterized one at its
    latent values drawn with ``key``, the original one at the values of its deterministic sites."""
    handlers.seed(rmodel, 0)(*args, **kwargs)  # the first call is concrete (validates the plan)
    latent = [n for n, s in handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs).items()
              if s["type"] == "sample" and not s["is_observed"]]

    @jax.jit
    def check(params, key):
        tr = handlers.trace(handlers.substitute(handlers.seed(rmodel, key), data=params)).get_trace(
            *args, **kwargs)
        base = {n: s["value"] for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
        plates = {n: s["value"] for n, s in tr.items() if s["type"] == "plate"}  # subsample indices
        lp_reparam, rtr = log_density(rmodel, args, kwargs, {**params, **base, **plates})
        lp_orig, otr = log_density(model, args, kwargs, {**{n: tr[n]["value"] for n in latent}, **plates})
        jac = {s.name: decentring_log_jacobian(s, params.get(f"{s.name}_centered", jnp.asarray(s.centredness)),
                                               otr)
               for s in plan.sites if s.noncentred}
        shift = {s.name: jnp.max(jnp.abs(tr[s.name]["value"] - tr[f"{s.name}_base"]["value"]))
                 for s in plan.sites if not s.noncentred}
        return lp_reparam, lp_orig, site_log_probs(rtr), site_log_probs(otr), jac, shift

    return check


# -- exactness -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_log_joint_is_exact_for_random_xi(case):
    model, args, kwargs = CASES[case]
    rmodel, plan = analysed(case)
    assert not plan.is_empty()
    tr = handlers.trace(handlers.seed(rmodel, 0)).get_trace(*args, **kwargs)
    for s in plan.sites:
        assert tr[s.name]["type"] == "deterministic"
        assert tr[f"{s.name}_decentered" if s.noncentred else f"{s.name}_base"]["type"] == "sample"
    check = exactness_check(model, rmodel, plan, args, kwargs)
    rng = np.random.default_rng(7)
    for seed in (1, 2):
        params = random_params(rmodel, plan, args, kwargs, rng)
        # every offset has its param; every learned centredness too
        expected = {f"{s.name}_offset_{p}" for s in plan.sites for p in s.parents}
        expected |= {f"{s.name}_centered" for s in plan.sites if s.noncentred and s.learn_centredness}
        assert set(params) == expected
        lp_reparam, lp_orig, rsites, osites, jac, shift = jax.device_get(check(params, jax.random.PRNGKey(seed)))
        assert np.isfinite(lp_orig)
        for name, value in shift.items():  # the offsets really move the sites: not vacuous
            if plan[name].offsets:
                assert value > 1e-3, name
        # site by site: p_rep(a_base) = p_a(a_base + offset) (+ the decentring Jacobian)
        for name, lp in osites.items():
            s = plan[name] if name in plan.names else None
            if s is None:
                np.testing.assert_allclose(rsites[name], lp, rtol=1e-5, atol=1e-4, err_msg=name)
            elif s.noncentred:
                np.testing.assert_allclose(rsites[f"{name}_decentered"], lp + jac[name], rtol=1e-5, atol=1e-4,
                                           err_msg=name)
            else:
                np.testing.assert_allclose(rsites[f"{name}_base"], lp, rtol=1e-5, atol=1e-4, err_msg=name)
        # and in total
        np.testing.assert_allclose(lp_reparam, lp_orig + sum(jac.values()), rtol=1e-5, atol=1e-3)


def test_subsampled_model_draws_new_subsamples():
    model, args, kwargs = CASES["subsampled"]
    rmodel, _ = analysed("subsampled")
    idx = set()
    for seed in (3, 4, 5, 6):
        tr = handlers.trace(handlers.seed(rmodel, seed)).get_trace(*args, **kwargs)
        idx.add(tuple(np.asarray(tr["groups"]["value"]).tolist()))
        assert tr["a"]["value"].shape == (4,) and tr["y"]["value"].shape == (4, 3)
    assert len(idx) > 1


# -- the prior is unchanged ----------------------------------------------------------------------
def _compare_moments(orig, rep, names, transform=lambda x: x, z_max=5.0):
    """Means and variances agree within ``z_max`` Monte Carlo standard errors, elementwise."""
    for name in names:
        x = np.asarray(transform(orig[name]), np.float64).reshape(orig[name].shape[0], -1)
        z = np.asarray(transform(rep[name]), np.float64).reshape(rep[name].shape[0], -1)
        n, m = x.shape[0], z.shape[0]
        se_mean = np.sqrt(x.var(0) / n + z.var(0) / m)
        zs = np.abs(x.mean(0) - z.mean(0)) / se_mean
        assert zs.max() < z_max, (name, "mean", zs.max())
        dx, dz = (x - x.mean(0)) ** 2, (z - z.mean(0)) ** 2
        se_var = np.sqrt(dx.var(0) / n + dz.var(0) / m)
        zs = np.abs(dx.mean(0) - dz.mean(0)) / se_var
        assert zs.max() < z_max, (name, "variance", zs.max())


def _prior_samples(case, n, rng):
    model, args, kwargs = CASES[case]
    rmodel, plan = analysed(case)
    params = random_params(rmodel, plan, args, kwargs, rng)
    rep = Predictive(rmodel, params=params, num_samples=n)(jax.random.PRNGKey(11), *args, **kwargs)
    orig = Predictive(model, num_samples=n)(jax.random.PRNGKey(12), *args, **kwargs)
    latent = [k for k in orig if k != "y"]
    assert set(latent) <= set(rep)
    return orig, rep, latent, plan


def test_prior_is_unchanged_tensor_model():
    orig, rep, latent, plan = _prior_samples("tensor", 4000, np.random.default_rng(8))
    assert {"z", "a", "A", "b", "B", "C", "mu"} <= set(latent)
    _compare_moments(orig, rep, latent)
    # a reparameterized site stays uncorrelated with its offset parents
    n = orig["mu"].shape[0]
    for s in plan.sites:
        for parent in s.parents:
            for samples in (orig, rep):
                child = np.asarray(samples[s.name], np.float64).reshape(n, -1)
                p = np.asarray(samples[parent], np.float64).reshape(n, -1)[:, 0]
                prod = (child - child.mean(0)) * (p - p.mean())[:, None]
                zs = np.abs(prod.mean(0)) / (prod.std(0) / np.sqrt(n))
                assert zs.max() < 5.0, (s.name, parent, zs.max())


def test_prior_is_unchanged_eight_schools():
    orig, rep, latent, plan = _prior_samples("eight_schools", 6000, np.random.default_rng(9))
    assert plan["theta"].noncentred and "theta_decentered" in rep
    assert set(latent) == {"mu", "tau", "theta"}
    # tau is half-Cauchy, theta has no finite variance: compare moments of a bounded transform
    _compare_moments(orig, rep, latent, transform=lambda x: np.arctan(np.asarray(x) / 5.0))


# -- the mechanism: mean-field shrinkage, and its removal -----------------------------------------
N_OBS, S_Y, S_MU, S_A = 10, 1.0, 1.0, 1.0
Y_TWO = np.random.default_rng(1).normal(0.7, S_Y, N_OBS).astype(np.float32)


def two_effects(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, S_MU))
    a = numpyro.sample("a", dist.Normal(0.0, S_A))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a, S_Y), obs=y)


def _fit_autonormal(model, steps=3000):
    guide = AutoNormal(model)
    optim = numpyro.optim.Adam(step_size=lambda i: 0.05 * 0.998**i)  # decays to ~1e-4
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=4))
    result = svi.run(jax.random.PRNGKey(0), steps, Y_TWO, progress_bar=False)
    assert np.all(np.isfinite(np.asarray(result.losses)))
    return guide, result.params


def test_mean_field_shrinkage_and_its_removal_by_offsets():
    # exact Gaussian posterior of (mu, a)
    prec = np.array([[N_OBS / S_Y**2 + 1 / S_MU**2, N_OBS / S_Y**2],
                     [N_OBS / S_Y**2, N_OBS / S_Y**2 + 1 / S_A**2]])
    cov = np.linalg.inv(prec)
    rho = cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1])
    assert rho < -0.9  # a thin ridge

    # plain AutoNormal: var(mu) shrinks by (1 - rho^2)
    _, params = _fit_autonormal(two_effects)
    ratio = float(params["mu_auto_scale"]) ** 2 / cov[0, 0]
    np.testing.assert_allclose(ratio, 1 - rho**2, rtol=0.05)

    # with the offsets AutoNormal recovers the exact posterior sds
    rmodel = autoreparam.reparameterize(two_effects)
    plan = rmodel.plan_for(Y_TWO)
    assert plan["a"].parents == ("mu",)
    guide, params = _fit_autonormal(rmodel)
    assert "a_offset_mu" in params
    post = Predictive(rmodel, guide=guide, params=params, num_samples=20000, return_sites=["mu", "a"])(
        jax.random.PRNGKey(1), Y_TWO)
    np.testing.assert_allclose(np.std(post["mu"]), np.sqrt(cov[0, 0]), rtol=0.05)
    np.testing.assert_allclose(np.std(post["a"]), np.sqrt(cov[1, 1]), rtol=0.05)
    np.testing.assert_allclose(np.corrcoef(post["mu"], post["a"])[0, 1], rho, atol=0.02)


# -- guides, NUTS, the config by hand ----------------------------------------------------------
@pytest.fixture(scope="module")
def nested():
    """The nested model: d has offsets from mu and r; r has an offset from mu and is non-centred."""
    model, args, kwargs = CASES["nested"]
    rmodel, plan = analysed("nested")
    assert plan["d"].parents == ("mu", "r") and plan["r"].parents == ("mu",)
    if not plan["r"].noncentred:  # the default may leave r centred; these tests want both kinds
        plan = plan.with_centredness("r", 0.7)
        rmodel = autoreparam.reparameterize(model, plan)
    return rmodel, args, kwargs, plan


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoDiagonalNormal, AutoLowRankMultivariateNormal,
                                         AutoDelta])
def test_svi_with_autoguides(nested, guide_class):
    rmodel, args, kwargs, plan = nested
    guide = guide_class(rmodel)
    svi = SVI(rmodel, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 20, *args, progress_bar=False, **kwargs)
    assert np.all(np.isfinite(np.asarray(result.losses)))
    assert {"r_offset_mu", "d_offset_mu", "d_offset_r", "r_centered"} <= set(result.params)
    # the offsets are learned: they moved from their start
    assert any(float(jnp.max(jnp.abs(result.params[k]))) > 0 for k in ("d_offset_mu", "d_offset_r"))
    post = Predictive(rmodel, guide=guide, params=result.params, num_samples=3,
                      return_sites=["r", "d", "mu"])(jax.random.PRNGKey(1), *args, **kwargs)
    assert post["d"].shape == (3, 6) and np.all(np.isfinite(np.asarray(post["d"])))


def test_jitted_svi_update_with_numpy_inputs_reuses_the_plan():
    """The usual ``jax.jit(svi.update)`` loop: numpy int64/float64 inputs arrive as int32/float32
    tracers (x64 off), which must hit the plan cached by ``svi.init`` on the concrete inputs."""
    model, (ia, ib, n_a, n_b), kwargs = CASES["crossed"]
    rmodel, _ = analysed("crossed")
    ia, ib, y = np.asarray(ia, np.int64), np.asarray(ib, np.int64), np.asarray(kwargs["y"], np.float64)
    svi = SVI(rmodel, AutoNormal(rmodel), numpyro.optim.Adam(0.01), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), ia, ib, n_a, n_b, y=y)
    update = jax.jit(svi.update, static_argnums=(3, 4))
    for _ in range(2):
        state, loss = update(state, ia, ib, n_a, n_b, y=y)
    assert np.isfinite(float(loss))
    assert {"a_offset_mu", "b_offset_mu", "b_offset_a"} <= set(svi.get_params(state))


def test_nuts(nested):
    rmodel, args, kwargs, plan = nested
    mcmc = MCMC(NUTS(rmodel), num_warmup=60, num_samples=40, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), *args, **kwargs)
    samples = mcmc.get_samples()
    assert {"mu", "tau_r", "sigma", "r", "d", "r_decentered", "d_base"} <= set(samples)
    for v in samples.values():
        assert np.all(np.isfinite(np.asarray(v)))
    assert samples["r"].shape == (40, 3) and samples["d"].shape == (40, 6)
    tr = handlers.trace(handlers.seed(rmodel, 0)).get_trace(*args, **kwargs)
    assert tr["r"]["type"] == "deterministic" and tr["d"]["type"] == "deterministic"


def test_config_applied_by_hand(nested):
    rmodel, args, kwargs, plan = nested
    model = CASES["nested"][0]
    config = build_config(plan)
    by_hand = apply_config(model, config)
    tr = handlers.trace(handlers.seed(by_hand, 0)).get_trace(*args, **kwargs)
    assert tr["d"]["type"] == "deterministic" and tr["d_base"]["type"] == "sample"
    assert tr["r"]["type"] == "deterministic" and tr["r_decentered"]["type"] == "sample"
    assert {"r_offset_mu", "d_offset_mu", "d_offset_r"} <= {n for n, s in tr.items() if s["type"] == "param"}
    # the same log joint as reparameterize(model, plan)
    params = {n: s["value"] for n, s in tr.items()
              if s["type"] == "param" or (s["type"] == "sample" and not s["is_observed"])}
    lp_hand, _ = log_density(by_hand, args, kwargs, params)
    lp_auto, _ = log_density(rmodel, args, kwargs, params)
    assert float(lp_hand) == float(lp_auto)
    # the older spelling, two handlers composed by hand, is the same
    two_handlers = handlers.reparam(config.record(model), config=config)
    assert float(log_density(two_handlers, args, kwargs, params)[0]) == float(lp_hand)


def test_config_without_record_raises_naming_the_site(nested):
    _, args, kwargs, plan = nested
    model = CASES["nested"][0]
    config = build_config(plan)
    with pytest.raises(PlanError) as info:
        handlers.seed(handlers.reparam(model, config=config), 0)(*args, **kwargs)
    msg = one_line(info.value)
    assert "'r'" in msg and "apply_config(model, config)" in msg


# -- bad input at reparameterize time -----------------------------------------------------------
@pytest.fixture(scope="module")
def crossed_plan():
    return plan_of("crossed")


def crossed_swapped(ia, ib, n_a, n_b, y=None):
    """The crossed model with a sampled before mu."""
    with numpyro.plate("A", n_a):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("B", n_b):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    numpyro.sample("y", dist.Normal(mu + a[ia] + b[ib], sigma).to_event(1), obs=y)


def _expect_plan_error(model, plan, args, kwargs, *words):
    rmodel = autoreparam.reparameterize(model, plan)  # nothing checked before the first call
    with pytest.raises(PlanError) as info:
        handlers.seed(rmodel, 0)(*args, **kwargs)
    msg = one_line(info.value)
    for word in words:
        assert word in msg, msg
    return msg


def test_plan_with_unknown_site(crossed_plan):
    _, args, kwargs = CASES["crossed"]
    renamed = SitePlan("alpha", crossed_plan["a"].shape, crossed_plan["a"].batch_shape,
                       crossed_plan["a"].offsets)
    plan = crossed_plan.without_site("a").without_parent("b", "a")
    plan = dataclasses.replace(plan, sites=(renamed,) + plan.sites)
    _expect_plan_error(zoo.crossed_model, plan, args, kwargs, "'alpha'")


def test_plan_with_parent_sampled_after_its_child(crossed_plan):
    _, args, kwargs = CASES["crossed"]
    msg = _expect_plan_error(crossed_swapped, crossed_plan, args, kwargs, "'a'", "'mu'")
    assert "after" in msg


def test_plan_on_a_site_with_non_real_support(crossed_plan):
    _, args, kwargs = CASES["crossed"]
    plan = crossed_plan.with_centredness("sigma", 0.5)  # sigma is HalfNormal
    _expect_plan_error(zoo.crossed_model, plan, args, kwargs, "'sigma'", "support")


def test_plan_made_for_other_input_shapes(crossed_plan):
    _, (ia, ib, n_a, n_b), kwargs = CASES["crossed"]
    msg = _expect_plan_error(zoo.crossed_model, crossed_plan, (ia, ib, n_a + 1, n_b), kwargs, "'a'")
    assert "shape" in msg


def sample_shaped(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    a = numpyro.sample("a", dist.Normal(mu * jnp.ones(2), 1.0), sample_shape=(2,))  # shape (2, 2), batch (2,)
    numpyro.sample("y", dist.Normal(a.sum(), 1.0), obs=y)


def test_plan_with_a_wrong_sample_ndim():
    """sample_ndim 1 where the model has no sample dims (batch (2, 2)): the shapes coincide, so
    SitePlan.check cannot tell, and the emitter would place the batch wrongly; reparameterize names it."""
    plan = autoreparam.Plan("model", (SitePlan("a", (2, 2), (2,), centredness=(0.5, 0.5), sample_ndim=1),))
    right = dataclasses.replace(plan, sites=(dataclasses.replace(plan["a"], sample_ndim=0),))
    msg = _expect_plan_error(batched, plan, (), {"y": 0.5}, "'a'", "sample_ndim is 1", "0 sample dims")
    assert "re-run the analysis" in msg
    handlers.seed(autoreparam.reparameterize(batched, right), 0)(y=0.5)
    handlers.seed(autoreparam.reparameterize(sample_shaped, plan), 0)(y=0.5)


def batched(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    a = numpyro.sample("a", dist.Normal(mu * jnp.ones((2, 2)), 1.0))  # shape (2, 2), batch (2, 2)
    numpyro.sample("y", dist.Normal(a.sum(), 1.0), obs=y)


def test_stale_plan_is_recomputed_for_new_input_shapes():
    model, (ia, ib, n_a, n_b), kwargs = CASES["crossed"]
    rmodel = autoreparam.reparameterize(model)
    small = rmodel.plan_for(ia, ib, n_a, n_b, **kwargs)
    handlers.seed(rmodel, 0)(ia, ib, n_a, n_b, **kwargs)
    ia2, ib2 = np.concatenate([ia, [5, 5, 1]]), np.concatenate([ib, [3, 0, 3]])
    y2 = np.concatenate([kwargs["y"], [0.1, 0.2, -0.3]]).astype(np.float32)
    tr = handlers.trace(handlers.seed(rmodel, 0)).get_trace(ia2, ib2, n_a + 1, n_b + 1, y=y2)
    big = rmodel.plan_for(ia2, ib2, n_a + 1, n_b + 1, y=y2)
    assert big["a"].shape == (n_a + 1,) and big["b"].shape == (n_b + 1,)
    assert tr["a"]["value"].shape == (n_a + 1,) and tr["a_base"]["value"].shape == (n_a + 1,)
    assert tr["a_offset_mu"]["value"].shape == (n_a + 1,)
    # both plans stay cached, each for its own inputs
    assert rmodel.plan_for(ia, ib, n_a, n_b, **kwargs) is small
    tr = handlers.trace(handlers.seed(rmodel, 0)).get_trace(ia, ib, n_a, n_b, **kwargs)
    assert tr["a"]["value"].shape == (n_a,)


def discrete_model(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    k = numpyro.sample("k", dist.Bernoulli(0.5))
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", g.shape[0]):
        numpyro.sample("y", dist.Normal(mu + k + a[g], 0.5), obs=y)


def test_discrete_latent_site_is_left_alone():
    g, y = np.array([0, 1, 2, 0, 1, 2, 2]), np.zeros(7, np.float32)
    rmodel = autoreparam.reparameterize(discrete_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = handlers.trace(handlers.seed(rmodel, 0)).get_trace(g, y=y)
    plan = rmodel.plan_for(g, y=y)
    assert "k" not in plan.names and plan.names == ("a",)
    assert tr["k"]["type"] == "sample" and not tr["k"]["is_observed"]
    assert not any(n.startswith("k_") for n in tr)
    ours = [str(w.message) for w in caught if "autoreparam" in str(w.message)]
    assert all("'k'" in m and "\n" not in m for m in ours)  # a warning, if any, names the site


@pytest.mark.parametrize("kwargs, word", [
    (dict(init="exact"), "init"),
    (dict(init=0), "init"),
    (dict(noncentre="sometimes"), "noncentre"),
    (dict(noncentre=0.5), "noncentre"),
])
def test_bad_options_raise_input_error(kwargs, word):
    model = CASES["crossed"][0]
    with pytest.raises(InputError) as info:
        autoreparam.reparameterize(model, **kwargs)
    assert word in one_line(info.value)
    with pytest.raises(InputError) as info:
        autoreparam.auto(**kwargs)(model)
    assert word in one_line(info.value)


def test_bad_model_or_plan_argument():
    with pytest.raises(InputError):
        autoreparam.reparameterize("not a model")
    with pytest.raises(InputError):
        autoreparam.reparameterize(CASES["crossed"][0], plan={"a": "mu"})


# -- options: learn=False, init="zero", @auto, noncentre=False --------------------------------
SIGMA, TAU = 0.8, 1.3
N_I = np.array([1, 2, 5, 12, 30])
GROUP = np.repeat(np.arange(N_I.size), N_I)
Y_NN = np.random.default_rng(2).normal(1.0, 1.0, GROUP.size).astype(np.float32)


def normal_normal(group, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("groups", N_I.size):
        a = numpyro.sample("a", dist.Normal(0.0, TAU))
    with numpyro.plate("data", group.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[group], SIGMA), obs=y)


def test_learn_false_fixes_xi_at_the_analytic_values():
    rmodel = autoreparam.reparameterize(normal_normal, learn=False)
    plan = rmodel.plan_for(GROUP, y=Y_NN)
    xi = np.asarray(plan["a"].offsets[0].init)
    np.testing.assert_allclose(xi, -N_I * TAU**2 / (N_I * TAU**2 + SIGMA**2), rtol=1e-3)
    center = np.asarray(plan.anchor_of("mu"))
    for seed in (0, 1):
        tr = handlers.trace(handlers.seed(rmodel, seed)).get_trace(GROUP, y=Y_NN)
        assert not [n for n, s in tr.items() if s["type"] == "param"]
        offset = np.asarray(tr["a"]["value"] - tr["a_base"]["value"])
        np.testing.assert_allclose(offset, xi * (float(tr["mu"]["value"]) - center[0]), rtol=1e-4, atol=1e-5)
    svi = SVI(rmodel, AutoNormal(rmodel), numpyro.optim.Adam(0.05), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 10, GROUP, y=Y_NN, progress_bar=False)
    assert not [k for k in result.params if "_offset_" in k]
    assert sorted(result.params) == ["a_base_auto_loc", "a_base_auto_scale", "mu_auto_loc", "mu_auto_scale"]
    # the same plan with learn=True has the param, starting at the same xi
    learned = autoreparam.reparameterize(normal_normal, plan)
    tr = handlers.trace(handlers.seed(learned, 0)).get_trace(GROUP, y=Y_NN)
    assert tr["a_offset_mu"]["type"] == "param"
    np.testing.assert_allclose(np.asarray(tr["a"]["value"] - tr["a_base"]["value"]),
                               xi * (float(tr["mu"]["value"]) - center[0]), rtol=1e-4, atol=1e-5)


def test_learn_false_keeps_centredness_fixed():
    model, args, kwargs = CASES["eight_schools"]
    plan = plan_of("eight_schools")
    tr = handlers.trace(handlers.seed(autoreparam.reparameterize(model, plan, learn=False), 0)).get_trace(
        *args, **kwargs)
    assert "theta_decentered" in tr and not [n for n, s in tr.items() if s["type"] == "param"]
    config = build_config(plan, learn=False)
    tr = handlers.trace(handlers.seed(apply_config(model, config), 0)).get_trace(
        *args, **kwargs)
    assert not [n for n, s in tr.items() if s["type"] == "param"]


def test_auto_decorator_and_options():
    decorated = autoreparam.auto(normal_normal)
    assert decorated.__name__ == "normal_normal"
    assert decorated.plan_for(GROUP, y=Y_NN).init == "analytic"

    @autoreparam.auto(init="zero")
    def zero(group, y=None):
        return normal_normal(group, y)

    plan = zero.plan_for(GROUP, y=Y_NN)
    assert plan.init == "zero" and plan.xi_step == 1.0 and set(plan["a"].offsets[0].init) == {0.0}
    tr = handlers.trace(handlers.seed(zero, 0)).get_trace(GROUP, y=Y_NN)
    # xi = 0: the original parameterization, a == a_base
    np.testing.assert_array_equal(np.asarray(tr["a"]["value"]), np.asarray(tr["a_base"]["value"]))

    model, args, kwargs = CASES["eight_schools"]
    assert autoreparam.reparameterize(model, noncentre=False).plan_for(*args, **kwargs).is_empty()
    tr = handlers.trace(handlers.seed(autoreparam.reparameterize(model, noncentre=False), 0)).get_trace(
        *args, **kwargs)
    assert tr["theta"]["type"] == "sample"  # an empty plan leaves the model as it is


def test_noncentring_takes_one_log_of_a_shared_scale():
    """The log-Jacobian ``(1 - c) log(scale)`` comes from log(scale) taken before the scale is
    broadcast: no elementwise log (nor pow) of the site's shape in the log density's program."""
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfNormal(5.0))
        with numpyro.plate("groups", 8):
            theta = numpyro.sample("theta", dist.Normal(mu, tau))
            numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    plan = autoreparam.Plan("model", (SitePlan("theta", (8,), (8,), centredness=(0.2,) * 8),))
    rmodel = apply_config(model, build_config(plan, learn=False))
    y = jnp.arange(8.0)
    params = {"mu": 0.3, "tau": 1.7, "theta_decentered": jnp.linspace(-1.0, 1.0, 8)}
    jaxpr = jax.make_jaxpr(lambda p: log_density(rmodel, (y,), {}, p)[0])(params)

    def elementwise(j, names):
        found = []
        for eqn in j.eqns:
            if eqn.primitive.name in names and eqn.outvars[0].aval.shape == (8,):
                found.append(eqn.primitive.name)
            for sub in jaxprs_in_params(eqn.params):
                found += elementwise(sub, names)
        return found

    # The decentred law's sampler (scale ** c, for draws) may hold a pow that the gradient never uses.
    assert elementwise(jaxpr.jaxpr, {"log"}) == []
    # Still exact: the log density is the original one at theta plus the Jacobian.
    theta = params["mu"] + params["tau"] ** 0.8 * (params["theta_decentered"] - 0.2 * params["mu"])
    original = log_density(model, (y,), {}, {"mu": params["mu"], "tau": params["tau"], "theta": theta})[0]
    np.testing.assert_allclose(float(log_density(rmodel, (y,), {}, params)[0]),
                               float(original) + 8 * 0.8 * np.log(params["tau"]), rtol=1e-5)
