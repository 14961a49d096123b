"""NumPyro reparameterizers for a ``Plan``: learned conditional offsets and non-centring.

``ConditionalOffsetReparam`` follows NumPyro's ``Reparam.__call__(name, fn, obs)`` contract.
An offset needs the values of earlier sites, which the stock ``numpyro.handlers.reparam``
handler does not pass to a ``Reparam``; ``record_values`` is the small handler that records
them. Applying a plan's config by hand::

    config = plan.to_config()
    reparam_model = numpyro.handlers.reparam(config.record(model), config=config)

``reparameterize(model)`` and ``@auto`` do exactly that, analysing the model on first call.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpyro
from numpyro import handlers
from numpyro.distributions import constraints
import numpyro.distributions as dist
from numpyro.infer.reparam import LocScaleReparam, Reparam
from numpyro.primitives import Messenger

from .errors import InputError, ModelError
from .plan import Plan, PlanError, SitePlan

__all__ = ["ConditionalOffsetReparam", "ReparamConfig", "record_values", "reparameterize", "auto",
           "build_config"]

LOC_SCALE_FAMILIES = (dist.Normal, dist.Cauchy, dist.Laplace, dist.Logistic, dist.StudentT, dist.Gumbel,
                      dist.SoftLaplace)


class SiteValues(dict):
    """Values of the sites seen so far in the current model run (filled by ``record_values``)."""


class record_values(Messenger):
    """Record the value of every sample and deterministic site, for offsets of later sites.

    >>> store = SiteValues()
    >>> with record_values(store=store):
    ...     model()                                                   # doctest: +SKIP
    """

    def __init__(self, fn=None, store: SiteValues | None = None):
        super().__init__(fn)
        self.store = SiteValues() if store is None else store

    def __enter__(self):
        self.store.clear()
        self.store.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.store.clear()  # drop values (maybe tracers) from this run
        self.store.active = False
        return super().__exit__(*exc)

    def postprocess_message(self, msg):
        if msg["type"] not in ("sample", "deterministic"):
            return
        self.store[msg["name"]] = msg["value"]


class ReparamConfig(dict):
    """A reparam config (site name -> ``Reparam``) that also knows how to record site values."""

    def __init__(self, *args, store: SiteValues, **kwargs):
        super().__init__(*args, **kwargs)
        self.store = store

    def record(self, model: Callable) -> Callable:
        """``model`` run under ``record_values``, ready for ``handlers.reparam(..., config=self)``."""
        return record_values(model, store=self.store)


def _expand_batch(x, batch_shape, shape):
    """Reshape a batch-shaped array so that it broadcasts against the full site shape."""
    return jnp.reshape(x, tuple(batch_shape) + (1,) * (len(shape) - len(batch_shape)))


class ConditionalOffsetReparam(Reparam):
    """``a = a_base + sum_P xi_{a|P} * G_{a|P}(P)`` with ``a_base ~ p_a(. + offset)``.

    The change of variables has unit Jacobian, so the model's posterior is unchanged. With
    ``learn=True``, ``xi = init + xi_step * {a}_offset_{P}`` where ``{a}_offset_{P}`` is a
    ``numpyro.param`` starting at zero (``xi_step`` is 1 for ``init="zero"`` and small for the
    analytic start, see ``Plan.xi_step``); with ``learn=False`` xi stays at its initial value.
    Parents enter centred at the plan's ``centers`` (the point where xi was measured).
    With ``site.centered`` set, the shifted distribution is further decentred with NumPyro's
    ``LocScaleReparam`` (latent ``{a}_decentered``; learned centredness ``{a}_centered``).
    """

    def __init__(self, site: SitePlan, store: SiteValues, learn: bool = True, centers: dict | None = None,
                 xi_step: float = 1.0):
        self.site = site
        self.store = store
        self.learn = learn
        self.centers = centers or {}
        self.xi_step = xi_step

    def __repr__(self) -> str:
        return (f"ConditionalOffsetReparam(site={self.site.name!r}, parents={self.site.parents!r}, "
                f"noncentred={self.site.noncentred})")

    def __call__(self, name, fn, obs):
        site = self.site
        if obs is not None:
            raise PlanError(f"{type(self).__name__}: site '{name}' is observed; only latent sites can be "
                            "reparameterized")
        support = fn.support.base_constraint if isinstance(fn.support, constraints.independent) else fn.support
        if support is not constraints.real:
            raise PlanError(f"{type(self).__name__}: site '{name}' has support {fn.support}; offsets and "
                            "non-centring need real support")
        shape, batch_shape = tuple(fn.shape()), tuple(fn.batch_shape)
        if shape != tuple(site.shape):
            raise PlanError(f"{type(self).__name__}: site '{name}' has shape {shape} in the model but "
                            f"{tuple(site.shape)} in the plan; re-run the analysis on these inputs")

        # Offsets from the recorded values of earlier sites.
        offset = None
        for off in site.offsets:
            if not getattr(self.store, "active", False):
                raise PlanError(f"site '{name}' needs the value of '{off.parent}': apply the config with "
                                "handlers.reparam(config.record(model), config=config)")
            if off.parent not in self.store:
                raise PlanError(f"site '{name}' has offset parent '{off.parent}', which is not sampled "
                                f"before '{name}' in the model")
            xi = jnp.reshape(jnp.asarray(off.init, dtype=jnp.result_type(float)), batch_shape)
            if self.learn:
                # xi = init + step * param: a small step keeps Adam's noisy updates of xi (the
                # valley noise again) from undoing a good analytic start; step 1 learns xi directly.
                xi = xi + self.xi_step * numpyro.param(f"{name}_offset_{off.parent}", jnp.zeros_like(xi))
            parent_value = self.store[off.parent]
            if off.parent in self.centers:
                center = jnp.asarray(self.centers[off.parent], dtype=jnp.result_type(parent_value))
                parent_value = parent_value - jnp.reshape(center, jnp.shape(parent_value))
            term = _expand_batch(xi, batch_shape, shape) * off.absorb(parent_value, shape)
            offset = term if offset is None else offset + term

        if site.noncentred:
            # Draw the decentred value of the shifted loc-scale distribution.
            shifted = fn if offset is None else _shift_loc(self, fn, -offset, name)
            centered = jnp.reshape(jnp.asarray(site.centered, dtype=jnp.result_type(float)), batch_shape)
            if self.learn and site.learn_centered:
                centered = numpyro.param(f"{name}_centered", centered, constraint=constraints.unit_interval)
            _, base_value = LocScaleReparam(centered=_expand_batch(centered, batch_shape, shape))(
                name, shifted, None)
        else:
            # Draw the base value with density p_a(a_base + offset).
            shifted = fn if offset is None else shift_distribution(self, fn, -offset)
            base_value = numpyro.sample(f"{name}_base", shifted)

        # Differentiably transform; the handler turns the site into a deterministic one.
        value = base_value if offset is None else base_value + offset
        return None, value


class ShiftedDistribution(dist.Distribution):
    """The law of ``x + delta`` for ``x ~ base`` (real support, so the Jacobian is one)."""

    arg_constraints = {}
    pytree_data_fields = ("base", "delta")

    def __init__(self, base, delta, *, validate_args=None):
        ndim = jnp.ndim(delta) - len(base.event_shape)
        batch_shape = jnp.broadcast_shapes(base.batch_shape, jnp.shape(delta)[:max(ndim, 0)])
        self.base = base.expand(batch_shape)
        self.delta = delta
        super().__init__(batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def support(self):
        return self.base.support

    @property
    def has_rsample(self):
        return self.base.has_rsample

    def sample(self, key, sample_shape=()):
        return self.base.sample(key, sample_shape) + self.delta

    def log_prob(self, value):
        return self.base.log_prob(value - self.delta)


def shift_distribution(reparam: Reparam, fn, delta):
    """``fn`` shifted by ``delta``: the same family with a moved loc where possible."""
    base, _, _ = reparam._unwrap(fn)
    if isinstance(base, LOC_SCALE_FAMILIES):
        return _shift_loc(reparam, fn, delta, None)
    return ShiftedDistribution(fn, delta)


def _shift_loc(reparam: Reparam, fn, delta, name):
    """The same loc-scale family with ``loc + delta`` (so LocScaleReparam can decentre it)."""
    base, expand_shape, event_dim = reparam._unwrap(fn)
    if not isinstance(base, LOC_SCALE_FAMILIES):
        raise PlanError(f"site '{name}' is {type(base).__name__}, not a loc-scale distribution; "
                        "it cannot be non-centred")
    params = {k: getattr(base, k) for k in base.arg_constraints if hasattr(base, k)}
    params["loc"] = params["loc"] + delta
    return reparam._wrap(type(base)(**params), expand_shape, event_dim)


def build_config(plan: Plan, learn: bool = True) -> ReparamConfig:
    """The NumPyro reparam config of a plan (see the module docstring for how to apply it)."""
    store = SiteValues()
    store.active = False
    centers = dict(plan.centers)
    return ReparamConfig({s.name: ConditionalOffsetReparam(s, store, learn, centers, plan.xi_step)
                          for s in plan.sites}, store=store)


def validate_plan(plan: Plan, mt) -> None:
    """Raise PlanError naming the site when a plan does not fit a traced model."""
    sites = mt.sites
    for s in plan.sites:
        if s.name not in sites or sites[s.name].type != "latent":
            raise PlanError(f"plan site '{s.name}' is not a latent sample site of the model "
                            f"(latent sites: {', '.join(mt.latent_names)})")
        site = sites[s.name]
        if tuple(site.shape) != tuple(s.shape):
            raise PlanError(f"plan site '{s.name}' has shape {tuple(s.shape)} but the model samples "
                            f"shape {tuple(site.shape)}")
        if site.support not in ("real", "real_vector") or site.is_discrete:
            raise PlanError(f"plan site '{s.name}' has support {site.support}; offsets and non-centring "
                            "need real support")
        for off in s.offsets:
            parent = sites.get(off.parent)
            if parent is None or parent.type not in ("latent", "deterministic"):
                raise PlanError(f"plan site '{s.name}' has offset parent '{off.parent}', which is not a "
                                "site of the model")
            if parent.order >= site.order:
                raise PlanError(f"plan site '{s.name}' has offset parent '{off.parent}', which is sampled "
                                f"after '{s.name}'; a parent must come first in program order")
            if off.M.shape[1] != parent.size or off.E.shape[0] != site.size:
                raise PlanError(f"plan site '{s.name}': the offset from '{off.parent}' maps "
                                f"{off.M.shape[1]} values to {off.E.shape[0]}, but the model has "
                                f"{parent.size} and {site.size}")


def _signature(args, kwargs):
    def leaf(x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            # Canonical dtype: numpy int64 arrives as int32 under jit when x64 is off.
            return ("array", tuple(x.shape), str(jax.dtypes.canonicalize_dtype(x.dtype)))
        if isinstance(x, (int, float, bool, str, type(None))):
            return ("value", x)
        return ("object", type(x).__name__)
    leaves, tree = jax.tree.flatten((args, kwargs))
    return (str(tree), tuple(leaf(x) for x in leaves))


def reparameterize(model: Callable, plan: Plan | None = None, *, init: str = "analytic", learn: bool = True,
                   noncentre: Any = "auto", at: dict | None = None) -> Callable:
    """A model with the same signature whose latent sites carry conditional offsets.

    With ``plan=None`` the model is analysed on its first call (with concrete inputs) and the
    plan is cached per input shapes; a call with new shapes analyses again. ``init`` is
    ``"analytic"`` (xi from the log joint's curvature, the default) or ``"zero"``;
    ``learn=False`` keeps xi (and centredness) fixed at their initial values instead of
    making them ``numpyro.param`` sites; ``noncentre`` is ``"auto"`` (non-centre funnels)
    or False; ``at`` optionally fixes latent values at which the curvature is measured.

    >>> rmodel = autoreparam.reparameterize(model)
    >>> svi = SVI(rmodel, AutoNormal(rmodel), optax.adam(1e-2), Trace_ELBO())  # doctest: +SKIP
    """
    if not callable(model):
        raise InputError(f"reparameterize: model must be callable, got {type(model).__name__}")
    if plan is not None and not isinstance(plan, Plan):
        raise InputError(f"reparameterize: plan must be an autoreparam.Plan, got {type(plan).__name__}")
    if init not in ("analytic", "zero"):
        raise InputError(f"reparameterize: init must be 'analytic' or 'zero', got {init!r}")
    if noncentre not in ("auto", False, None, True):
        raise InputError(f"reparameterize: noncentre must be 'auto' or False, got {noncentre!r}")
    cache: dict = {}

    @functools.wraps(model)
    def reparameterized(*args, **kwargs):
        key = _signature(args, kwargs)
        config = cache.get(key)
        if config is None:
            from .trace import has_observed_site

            if cache and not has_observed_site(model, args, kwargs):
                # Predictive without data (y=None) would plan the prior alone: reuse the last plan,
                # whose sites are checked against this call's shapes as they are sampled.
                config = next(reversed(cache.values()))
            else:
                config = _prepare(model, plan, args, kwargs, init, noncentre, at, learn)
            cache[key] = config
        with handlers.reparam(config=config):
            return config.record(model)(*args, **kwargs)

    def plan_for(*args, **kwargs) -> Plan:
        """The plan used for these inputs (analysing the model if needed)."""
        key = _signature(args, kwargs)
        if key not in cache:
            cache[key] = _prepare(model, plan, args, kwargs, init, noncentre, at, learn)
        return cache[key].plan

    reparameterized.plan_for = plan_for
    reparameterized.model = model
    return reparameterized


def _prepare(model, plan, args, kwargs, init, noncentre, at, learn) -> ReparamConfig:
    from .analysis import analyze
    from .plan import build_plan
    from .trace import isolated_from_handlers, trace_model

    leaves = jax.tree.leaves((args, kwargs))
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        raise InputError("reparameterize: the first call with these input shapes got traced (jit) inputs; "
                         "call the model once with concrete arrays (e.g. outside jit) so it can be analysed")
    with isolated_from_handlers():
        if plan is None:
            report = analyze(model, *args, **kwargs)
            plan = build_plan(report, init=init, noncentre=noncentre, at=at)
            for note in report.notes:
                if "support" in note or "discrete" in note:
                    warnings.warn(f"autoreparam: {note}", stacklevel=3)
        else:
            validate_plan(plan, trace_model(model, args, kwargs))
    config = build_config(plan, learn=learn)
    config.plan = plan
    return config


def auto(model: Callable | None = None, *, plan: Plan | None = None, init: str = "analytic", learn: bool = True,
         noncentre: Any = "auto", at: dict | None = None):
    """Decorator form of ``reparameterize``: ``@auto`` or ``@auto(init="zero", ...)``.

    >>> @autoreparam.auto
    ... def model(group, y=None):
    ...     ...
    """
    if model is None:
        return lambda fn: reparameterize(fn, plan, init=init, learn=learn, noncentre=noncentre, at=at)
    return reparameterize(model, plan, init=init, learn=learn, noncentre=noncentre, at=at)
