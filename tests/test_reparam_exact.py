"""The change of variables is exact under the model's own handlers and for every loc-scale family.

Exactness: at any point, the reparameterized log joint equals the original log joint at the
values of its deterministic sites plus the log-Jacobian of the non-centring,
``sum (1 - c) log scale``, counted ONCE, whatever the model's ``handlers.scale`` and
``handlers.mask`` do to the site's density (they weigh the density of ``a``, not the change of
variables). Under a subsampled plate the log joint estimates the full model's, which has a
Jacobian per element the subsample stands for: there it is weighted by ``size / subsample_size``,
and the average over every subsample is the full reparameterized model's log joint.

The plans are written by hand (offsets along a broadcast map and non-centring), so that no
analysis runs: any offset and any centredness must be exact.
"""

from contextlib import nullcontext
from itertools import combinations

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
from autoreparam.reparam import apply_config, build_config
from autoreparam.trace import LOC_SCALE_FAMILIES
from autoreparam.trace import unwrap_distribution
from helpers import one_line

N = 6
MASK = np.arange(N) % 3 != 0  # elements 0 and 3 masked out
Y = np.random.default_rng(0).normal(size=N).astype(np.float32)


def broadcast_offset(parent: str, site_size: int, xi) -> Offset:
    """``xi * parent`` added to every element of a site (a scalar parent)."""
    e = SparseMap((site_size, 1), tuple(range(site_size)), (0,) * site_size, (1.0,) * site_size)
    m = SparseMap((1, 1), (0,), (0,), (1.0,))
    return Offset(parent, e, m, tuple(float(v) for v in np.broadcast_to(xi, (site_size,))), "broadcast")


def hand_plan(name, shape, batch_shape, parent=None, centredness=None, xi=-0.4) -> Plan:
    n_batch = int(np.prod(batch_shape, dtype=int))
    offsets = () if parent is None else (broadcast_offset(parent, int(np.prod(shape, dtype=int)), xi),)
    offsets = tuple(Offset(o.parent, o.E, o.M, o.init[:n_batch]) for o in offsets)
    cen = None if centredness is None else tuple(float(c) for c in np.broadcast_to(centredness, (n_batch,)))
    return Plan("m", (SitePlan(name, tuple(shape), tuple(batch_shape), offsets, cen),))


def family_law(family):
    """``(loc, scale) -> distribution`` of a family (StudentT with 4 degrees of freedom)."""
    if family is dist.StudentT:
        return lambda loc, scale: dist.StudentT(4.0, loc, scale)
    return family


def make_model(handler=None, family=dist.Normal, subsample_size=None, event=False):
    """mu, tau; a_i ~ family(mu, tau) under ``handler``; y_i ~ Normal(a_i, 0.5)."""
    law = family_law(family)

    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
        tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        if event:
            with handlers.scale(scale=2.0):
                a = numpyro.sample("a", law(mu, tau).expand([N]).to_event(1))
            numpyro.sample("y", dist.Normal(a, 0.5).to_event(1), obs=y)
            return
        with numpyro.plate("i", N, subsample_size=subsample_size) as idx:
            if handler == "scale":
                context = handlers.scale(scale=2.0)
            elif handler == "mask":
                context = handlers.mask(mask=jnp.asarray(MASK)[idx])
            elif handler == "scale_and_mask":
                context = handlers.mask(mask=jnp.asarray(MASK)[idx])
            else:
                context = nullcontext()
            with context, (handlers.scale(scale=jnp.linspace(0.5, 2.0, len(idx))) if handler == "scale_and_mask"
                           else nullcontext()):
                fn = law(mu, tau)
                if handler == "masked_distribution":
                    fn = fn.expand([len(idx)]).mask(jnp.asarray(MASK)[idx])
                a = numpyro.sample("a", fn)
            numpyro.sample("y", dist.Normal(a, 0.5), obs=None if y is None else y[idx])

    return model


def log_jacobian(otr, name, c):
    """``sum (1 - c) log scale`` over the site's value, from the original trace (independent of the code)."""
    value = otr[name]["value"]
    scale = jnp.broadcast_to(unwrap_distribution(otr[name]["fn"]).scale, value.shape)
    c = jnp.reshape(jnp.asarray(c), jnp.shape(c) + (1,) * (value.ndim - jnp.ndim(c)))
    return jnp.sum((1.0 - c) * jnp.log(scale))


def random_point(rmodel, plan, args, kwargs, seed):
    """A trace of the reparameterized model at random xi and centredness; its params and latent values."""
    rng = np.random.default_rng(seed)
    tr = handlers.trace(handlers.seed(rmodel, seed)).get_trace(*args, **kwargs)
    params = {}
    for n, s in tr.items():
        if s["type"] == "param":
            shape = np.shape(s["value"])
            params[n] = jnp.asarray(rng.uniform(0.1, 0.9, shape) if "_centered" in n else rng.normal(size=shape),
                                    jnp.float32)
    tr = handlers.trace(handlers.substitute(handlers.seed(rmodel, seed), data=params)).get_trace(*args, **kwargs)
    latent = {n: s["value"] for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
    plates = {n: s["value"] for n, s in tr.items() if s["type"] == "plate"}
    return tr, params, latent, plates


def assert_exact(model, plan, args=(), kwargs=None, jacobian_weight=1.0, seeds=(1, 2)):
    kwargs = kwargs or {}
    rmodel = autoreparam.reparameterize(model, plan)
    original_latent = [n for n, s in handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs).items()
                       if s["type"] == "sample" and not s["is_observed"]]
    for seed in seeds:
        tr, params, latent, plates = random_point(rmodel, plan, args, kwargs, seed)
        lp_reparam, _ = log_density(rmodel, args, kwargs, {**params, **latent, **plates})
        lp_orig, otr = log_density(model, args, kwargs, {**{n: tr[n]["value"] for n in original_latent}, **plates})
        jac = 0.0
        for s in plan.sites:
            if s.noncentred:
                c = params.get(f"{s.name}_centered", jnp.asarray(s.centredness))
                jac = jac + log_jacobian(otr, s.name, jnp.reshape(c, s.batch_shape))
        assert abs(float(jac)) > 1e-2  # the Jacobian is not vacuous at this point
        np.testing.assert_allclose(float(lp_reparam), float(lp_orig + jacobian_weight * jac), rtol=1e-5, atol=1e-3)


# -- scale, mask, subsampling ------------------------------------------------------------------------
@pytest.mark.parametrize("handler", ["scale", "mask", "scale_and_mask", "masked_distribution"])
@pytest.mark.parametrize("parent", [None, "mu"])
def test_noncentring_is_exact_under_the_models_handlers(handler, parent):
    plan = hand_plan("a", (N,), (N,), parent, centredness=np.linspace(0.0, 0.8, N))
    assert_exact(make_model(handler), plan, kwargs={"y": Y})


def test_noncentring_of_an_event_shaped_site_is_exact_under_scale():
    plan = hand_plan("a", (N,), (), "mu", centredness=0.2)
    assert_exact(make_model(event=True), plan, kwargs={"y": Y})


@pytest.mark.parametrize("handler", [None, "scale"])
def test_noncentring_under_a_subsampled_plate_weighs_the_jacobian_by_the_subsample(handler):
    plan = hand_plan("a", (2,), (2,), "mu", centredness=0.3)
    assert_exact(make_model(handler, subsample_size=2), plan, kwargs={"y": Y}, jacobian_weight=N / 2)


def test_subsampled_log_joint_averages_to_the_full_reparameterized_one():
    """Over every subsample, the subsampled estimate averages to the full model's log joint."""
    c, xi = 0.3, -0.4
    full = autoreparam.reparameterize(make_model("scale"), hand_plan("a", (N,), (N,), "mu", c, xi))
    sub = autoreparam.reparameterize(make_model("scale", subsample_size=2), hand_plan("a", (2,), (2,), "mu", c, xi))
    z = jnp.asarray(np.random.default_rng(3).normal(size=N), jnp.float32)
    point = {"mu": jnp.asarray(0.7), "tau": jnp.asarray(1.8)}
    params = {"a_centered": jnp.full(N, c), "a_offset_mu": jnp.zeros(N)}
    lp_full, _ = log_density(full, (), {"y": Y}, {**point, **params, "a_decentered": z})
    estimates = []
    for subset in combinations(range(N), 2):
        idx = jnp.asarray(subset)
        values = {**point, "a_centered": jnp.full(2, c), "a_offset_mu": jnp.zeros(2), "a_decentered": z[idx], "i": idx}
        estimates.append(float(log_density(sub, (), {"y": Y}, values)[0]))
    np.testing.assert_allclose(np.mean(estimates), float(lp_full), rtol=1e-5)


@pytest.mark.parametrize("handler", ["scale", "mask"])
def test_prior_of_the_original_sites_is_unchanged_under_the_models_handlers(handler):
    model = make_model(handler)
    rmodel = autoreparam.reparameterize(model, hand_plan("a", (N,), (N,), "mu", centredness=0.3))
    rep = Predictive(rmodel, num_samples=4000)(jax.random.PRNGKey(1))
    orig = Predictive(model, num_samples=4000)(jax.random.PRNGKey(2))
    for name in ("a", "y"):
        x, z = np.asarray(orig[name], np.float64), np.asarray(rep[name], np.float64)
        for f in (lambda v: v, lambda v: np.abs(v - np.median(v, axis=0))):  # location and spread
            fx, fz = f(x), f(z)
            se = np.sqrt(fx.var(0) / len(fx) + fz.var(0) / len(fz))
            assert np.max(np.abs(fx.mean(0) - fz.mean(0)) / se) < 5, name


# -- every loc-scale family ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", LOC_SCALE_FAMILIES, ids=lambda f: f.__name__)
def test_every_loc_scale_family_is_non_centred_exactly(family):
    plan = hand_plan("a", (N,), (N,), "mu", centredness=np.linspace(0.0, 0.8, N))
    assert_exact(make_model(None, family), plan, kwargs={"y": Y}, seeds=(1,))


def asymmetric_laplace_model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("i", N):
        a = numpyro.sample("a", dist.AsymmetricLaplace(mu, tau, 2.0))
        numpyro.sample("y", dist.Normal(a, 0.5), obs=y)


def test_non_centring_a_family_without_loc_scale_decentring_is_refused_in_one_line():
    rmodel = autoreparam.reparameterize(asymmetric_laplace_model, hand_plan("a", (N,), (N,), centredness=0.0))
    with pytest.raises(PlanError) as info:
        handlers.seed(rmodel, 0)(y=Y)
    msg = one_line(info.value)
    assert "'a'" in msg and "AsymmetricLaplace" in msg


def test_analysed_funnel_of_another_family_is_left_centred_with_a_warning():
    rmodel = autoreparam.reparameterize(asymmetric_laplace_model)
    with pytest.warns(UserWarning, match="'a' is AsymmetricLaplace") as caught:
        tr = handlers.trace(handlers.seed(rmodel, 0)).get_trace(y=Y)
    plan = rmodel.plan_for(y=Y)
    assert "a" not in plan.names or not plan["a"].noncentred
    assert tr["a"]["type"] == "sample"  # no offsets either: nothing to do but non-centring
    assert all("\n" not in str(w.message) for w in caught)


# -- sample_shape instead of a plate --------------------------------------------------------------------
TANK = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
Y_TANK = np.random.default_rng(5).normal(size=TANK.size).astype(np.float32)


def sample_shape_model(tank, y=None):
    """As the Statistical Rethinking ports write it: ``sample_shape=`` instead of a plate."""
    a_bar = numpyro.sample("a_bar", dist.Normal(0.0, 1.5))
    sigma = numpyro.sample("sigma", dist.Exponential(1.0))
    a = numpyro.sample("a", dist.Normal(a_bar, sigma), sample_shape=(N,))
    numpyro.sample("y", dist.Normal(a[tank], 1.0), obs=y)


@pytest.mark.parametrize("centredness", [None, 0.25])
def test_site_with_sample_shape_is_reparameterized_exactly(centredness):
    for batch_shape in ((), (N,)):  # the plan's batch shape may or may not include the sample_shape
        plan = hand_plan("a", (N,), batch_shape, "a_bar", centredness=centredness)
        if centredness is None:
            rmodel = autoreparam.reparameterize(sample_shape_model, plan)
            tr = handlers.trace(handlers.seed(rmodel, 0)).get_trace(TANK, y=Y_TANK)
            assert tr["a"]["value"].shape == (N,) and tr["a_base"]["value"].shape == (N,)
            continue
        rmodel = autoreparam.reparameterize(sample_shape_model, plan)
        tr, params, latent, _ = random_point(rmodel, plan, (TANK,), {"y": Y_TANK}, 1)
        lp_reparam, _ = log_density(rmodel, (TANK,), {"y": Y_TANK}, {**params, **latent})
        lp_orig, otr = log_density(sample_shape_model, (TANK,), {"y": Y_TANK},
                                   {n: tr[n]["value"] for n in ("a_bar", "sigma", "a")})
        c = jnp.reshape(params["a_centered"], batch_shape)
        np.testing.assert_allclose(float(lp_reparam), float(lp_orig + log_jacobian(otr, "a", c)), rtol=1e-5,
                                   atol=1e-3)


def test_analysed_sample_shape_model_runs():
    rmodel = autoreparam.reparameterize(sample_shape_model)
    tr = handlers.trace(handlers.seed(rmodel, 0)).get_trace(TANK, y=Y_TANK)
    plan = rmodel.plan_for(TANK, y=Y_TANK)
    assert "a" in plan.names and tr["a"]["type"] == "deterministic" and tr["a"]["value"].shape == (N,)


# -- names the model already uses --------------------------------------------------------------------------
def fresh_name_cases():
    from autoreparam.names import fresh_name

    assert fresh_name("a_base", set()) == "a_base"
    assert fresh_name("a_base", {"a_base"}) == "a_base_1"
    assert fresh_name("a_base", {"a_base", "a_base_1", "a_base_3"}) == "a_base_2"


def test_fresh_name():
    fresh_name_cases()


def colliding_model(y=None):
    """A model with its own ``a_base``, ``a_decentered`` and ``a_offset_mu`` next to ``a``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    shift = numpyro.param("a_offset_mu", jnp.asarray(0.5))
    with numpyro.plate("i", N):
        a_base = numpyro.sample("a_base", dist.Normal(0.0, 3.0))
        a = numpyro.sample("a", dist.Normal(mu + shift, tau))
        numpyro.deterministic("a_decentered", a - mu)
        b = numpyro.sample("b", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(a + a_base + b, 0.5), obs=y)


@pytest.mark.parametrize("centredness", [None, 0.3])
def test_introduced_names_avoid_the_models_own_names(centredness):
    plan = hand_plan("a", (N,), (N,), "mu", centredness=centredness)
    plan = Plan("m", plan.sites + hand_plan("b", (N,), (N,), "mu").sites)
    rmodel = autoreparam.reparameterize(colliding_model, plan)
    tr = handlers.trace(handlers.seed(rmodel, 0)).get_trace(y=Y)
    assert tr["a_base"]["type"] == "sample" and tr["a_decentered"]["type"] == "deterministic"
    assert tr["a_offset_mu"]["type"] == "param" and tr["a_offset_mu_1"]["type"] == "param"
    introduced = "a_decentered_1" if centredness is not None else "a_base_1"
    assert tr[introduced]["type"] == "sample" and tr["b_base"]["type"] == "sample"
    # the model's own param keeps its value and meaning; the log joint stays exact
    params = {"a_offset_mu": jnp.asarray(0.5), "a_offset_mu_1": jnp.asarray(np.linspace(-1, 1, N), jnp.float32),
              "b_offset_mu": jnp.zeros(N)}
    if centredness is not None:
        params["a_centered"] = jnp.full(N, 0.3)
    tr = handlers.trace(handlers.substitute(handlers.seed(rmodel, 1), data=params)).get_trace(y=Y)
    latent = {n: s["value"] for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
    lp_reparam, _ = log_density(rmodel, (), {"y": Y}, {**params, **latent})
    lp_orig, otr = log_density(colliding_model, (), {"y": Y},
                               {"a_offset_mu": params["a_offset_mu"],
                                **{n: tr[n]["value"] for n in ("mu", "tau", "a_base", "a", "b")}})
    jac = 0.0 if centredness is None else log_jacobian(otr, "a", jnp.full(N, 0.3))
    np.testing.assert_allclose(float(lp_reparam), float(lp_orig + jac), rtol=1e-5, atol=1e-3)


def test_config_by_hand_on_a_model_using_an_introduced_name_raises_in_one_line():
    config = build_config(hand_plan("a", (N,), (N,), "mu"))
    with pytest.raises(PlanError) as info:
        handlers.seed(apply_config(colliding_model, config), 0)(y=Y)
    msg = one_line(info.value)
    assert "'a_offset_mu'" in msg and "'a'" in msg and "reparameterize" in msg
