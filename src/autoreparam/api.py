"""The entry points, above every stage: ``analyze``, ``reparameterize`` and ``auto``.

``reparameterize(model)`` runs the whole pipeline on the model's first call with concrete
inputs: trace -> analysis -> Report -> plan -> reparam config, cached per input shapes.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import numpy as np
from numpyro import handlers

from .analysis import analyze
from .errors import InputError
from .plan import Plan, validate_plan
from .reparam import ReparamConfig, build_config
from .planning import build_plan
from .trace import TracedSite, isolated_from_handlers, trace_sites

__all__ = ["analyze", "reparameterize", "auto"]


def check_at(at, sites: dict[str, TracedSite]) -> None:
    """Raise InputError (one line, naming the site) unless ``at`` fits the model's latent sites."""
    if not isinstance(at, dict):
        return
    latent = {n: s for n, s in sites.items() if s.kind == "latent"}
    for name, value in at.items():
        if name not in latent:
            raise InputError(f"reparameterize: at names {name!r}, which is not a latent site of the model "
                             f"(latent sites: {', '.join(latent) or 'none'})")
        expected = latent[name].shape
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"reparameterize: at['{name}'] must be numbers of shape {expected}, "
                             f"got {type(value).__name__}") from None
        if array.shape != expected:
            raise InputError(f"reparameterize: at['{name}'] has shape {array.shape}, but site '{name}' "
                             f"has shape {expected}")
        if not np.all(np.isfinite(array)):
            raise InputError(f"reparameterize: at['{name}'] must be finite, got {array[~np.isfinite(array)][0]}")


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
    if plan is not None:
        plan.check()
    if init not in ("analytic", "zero"):
        raise InputError(f"reparameterize: init must be 'analytic' or 'zero', got {init!r}")
    if noncentre not in ("auto", False, None, True):
        raise InputError(f"reparameterize: noncentre must be 'auto' or False, got {noncentre!r}")
    if not (at is None or isinstance(at, dict) or (isinstance(at, str) and at in ("map", "median"))):
        raise InputError(f"reparameterize: at must be None, 'map', 'median' or a dict of latent values "
                         f"(site name -> array), got {type(at).__name__}")
    cache: dict = {}

    def config_for(args, kwargs) -> ReparamConfig:
        key = _signature(args, kwargs)
        config = cache.get(key)
        if config is None:
            # A call without data (Predictive with y=None) reuses the last plan made with data.
            with_data = [c.plan for c in cache.values() if c.observed]
            config = cache[key] = _prepare(model, plan, args, kwargs, init, noncentre, at, learn,
                                           with_data[-1] if with_data else None)
        return config

    @functools.wraps(model)
    def reparameterized(*args, **kwargs):
        config = config_for(args, kwargs)
        with handlers.reparam(config=config):
            return config.record(model)(*args, **kwargs)

    def plan_for(*args, **kwargs) -> Plan:
        """The plan used for these inputs (analysing the model if needed)."""
        return config_for(args, kwargs).plan

    reparameterized.plan_for = plan_for
    reparameterized.model = model
    return reparameterized


def _prepare(model, plan, args, kwargs, init, noncentre, at, learn, last_plan=None) -> ReparamConfig:
    """The config for one call's inputs: the given plan checked against the sampled sites, the
    last plan made with data when this call has no observed site, or else a new plan from the analysis."""
    leaves = jax.tree.leaves((args, kwargs))
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        raise InputError("reparameterize: the first call with these input shapes got traced (jit) inputs; "
                         "call the model once with concrete arrays (e.g. outside jit) so it can be analysed")
    sites = trace_sites(model, args, kwargs)
    observed = any(s.kind == "observed" for s in sites.values())
    if plan is None and last_plan is not None and not observed:
        plan = last_plan
    if plan is None:
        check_at(at, sites)
        with isolated_from_handlers():
            report = analyze(model, *args, **kwargs)
            plan = build_plan(report, init=init, noncentre=noncentre, at=at)
        for note in report.notes:
            if "support" in note or "discrete" in note or "cannot non-centre" in note:
                warnings.warn(f"autoreparam: {note}", stacklevel=4)
    validate_plan(plan, sites)
    config = build_config(plan, learn=learn, taken=sites)
    config.plan, config.observed = plan, observed
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

