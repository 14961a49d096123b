"""The entry points, above every stage: ``analyze``, ``reparameterize`` and ``auto``.

``reparameterize(model)`` runs the whole pipeline on the model's first call with concrete
inputs: trace -> analysis -> Report -> plan -> reparam config, cached per input shapes.
"""

from __future__ import annotations

import copy
import functools
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import jax
import numpy as np
from numpyro import handlers
from numpyro.infer import NUTS
from numpyro.infer.reparam import LocScaleReparam
from numpyro.primitives import Messenger

from .analysis import analyze_model
from .errors import InputError
from .plan import Plan, validate_plan
from .planning import plan_with_notes
from .reparam import ReparamConfig, apply_config, build_config
from .report import Existing, Report
from .trace import TracedSite, isolated_from_handlers, trace_sites

__all__ = ["analyze", "reparameterize", "auto", "auto_mcmc", "unwrap", "ReparameterizedModel"]


def analyze(model: Callable, *args, unwrap: bool = False, **kwargs) -> Report:
    """Trace ``model(*args, **kwargs)`` and find its likelihood-invariant directions.

    What the model already reparameterizes is in ``report.existing``: a ``handlers.reparam`` or
    ``@autoreparam.auto`` wrapper, ``x_decentered`` sites, ``a = mu + tau * a_raw`` by hand.
    ``unwrap=True`` analyses the model under such wrappers instead (a model keyword argument
    named ``unwrap`` cannot be passed through ``analyze``).

    >>> def model(group, y=None):
    ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
    ...     with numpyro.plate("groups", 4):
    ...         a = numpyro.sample("a", dist.Normal(0, 1))
    ...     with numpyro.plate("data", len(group)):
    ...         numpyro.sample("y", dist.Normal(mu + a[group], 0.1), obs=y)
    >>> report = analyze(model, jnp.array([0, 1, 2, 3, 0, 1]), y=jnp.zeros(6))
    >>> [t.site for t in report.terms["y"]]
    ['mu', 'a']
    >>> report.pairs()
    {('y', 'mu', 'a'): 1}
    >>> report.invariances[0].absorption.absorb(np.array([2.0]))  # a absorbs mu by broadcast
    array([2., 2., 2., 2.])
    >>> report.plan is report.plan  # made on first access, then kept
    True
    """
    wrappers = []
    if unwrap:
        model, wrappers = unwrap_model(model)
        if not wrappers:
            warnings.warn(f"autoreparam: unwrap=True, but {_name(model)} has no handlers.reparam or "
                          "@autoreparam.auto wrapper; analysed as it is", stacklevel=2)
    else:
        _, wrappers = unwrap_model(model)
    report, model_trace = analyze_model(model, args, kwargs)
    covered = {e.site for e in wrappers if e.site}
    report.existing[:] = [replace(e, unwrapped=unwrap) for e in wrappers] + \
        [e for e in report.existing if not (e.how == "decentered" and e.site in covered)]
    return report.attach_planner(functools.partial(plan_with_notes, report, model_trace))


def _name(model) -> str:
    return getattr(model, "__name__", None) or type(model).__name__


def _describe_reparam(r) -> tuple[str, bool]:
    """A NumPyro reparameterizer in words, and whether it non-centres its site."""
    name = type(r).__name__
    if isinstance(r, LocScaleReparam):
        c = r.centered
        if c is None:
            return f"{name}(centered=None): centredness learned", False
        if np.ndim(c):
            return f"{name}(centered=array): partly centred (per element)", False
        c = float(c)
        what = {0.0: "non-centred", 1.0: "centred: no change"}.get(c, f"partly centred ({c:g})")
        return f"{name}(centered={c:g}): {what}", c == 0.0
    return name, False


def unwrap_model(model: Callable) -> tuple[Callable, list[Existing]]:
    """The model under its ``handlers.reparam`` and ``@autoreparam.auto`` wrappers, and what they did.

    Other NumPyro handlers around them (``condition``, ``scale``...) are kept, each copied with the
    stripped model inside. ``unwrap`` is the public form.
    """
    found: list[Existing] = []

    def strip(m):
        if isinstance(m, ReparameterizedModel):
            found.append(Existing("", "wrapper", f"an autoreparam wrapper (@autoreparam.auto or reparameterize) "
                                                 f"around {_name(m.model)}"))
            return strip(m.model)
        if isinstance(m, handlers.reparam):
            if isinstance(m.config, dict):
                for site, r in m.config.items():
                    described, noncentred = _describe_reparam(r)
                    found.append(Existing(site, "wrapper", f"{site}: {described} (handlers.reparam wrapper)",
                                          reparam=described, noncentred=noncentred))
            else:
                found.append(Existing("", "wrapper", f"a handlers.reparam wrapper with a config function "
                                                     f"({_name(m.config)}): its sites show only when it runs"))
            return strip(m.fn)
        if isinstance(m, Messenger) and callable(getattr(m, "fn", None)):
            inner = strip(m.fn)
            if inner is m.fn:
                return m
            outer = copy.copy(m)
            outer.fn = inner
            return outer
        return m

    return strip(model), found


def unwrap(model: Callable) -> Callable:
    """``model`` without its ``handlers.reparam`` and ``@autoreparam.auto`` wrappers.

    >>> from numpyro.infer.reparam import LocScaleReparam
    >>> def base(y=None):
    ...     numpyro.sample("theta", dist.Normal(0, 1))
    >>> wrapped = handlers.reparam(base, config={"theta": LocScaleReparam(0)})
    >>> unwrap(wrapped) is base
    True
    """
    return unwrap_model(model)[0]


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
                   noncentre: Any = "auto", at: dict | None = None, unwrap: bool = False) -> ReparameterizedModel:
    """A model with the same signature whose latent sites carry conditional offsets.

    With ``plan=None`` the model is analysed on its first call (with concrete inputs) and the
    plan is cached per input shapes; a call with new shapes analyses again. ``init`` is
    ``"analytic"`` (xi from the log joint's curvature, the default) or ``"zero"``;
    ``learn=False`` keeps xi (and centredness) fixed at their initial values instead of
    making them ``numpyro.param`` sites; ``noncentre`` is ``"auto"`` (non-centre funnels)
    or False; ``at`` optionally fixes latent values at which the curvature is measured.
    ``unwrap=True`` drops the model's ``handlers.reparam`` / ``@autoreparam.auto`` wrappers first,
    so the plan replaces them instead of stacking on them.

    >>> def model(group, y=None):
    ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
    ...     with numpyro.plate("groups", 3):
    ...         a = numpyro.sample("a", dist.Normal(0, 1))
    ...     with numpyro.plate("data", len(group)):
    ...         numpyro.sample("y", dist.Normal(mu + a[group], 0.5), obs=y)
    >>> group, y = jnp.array([0, 1, 2, 0]), jnp.array([0.5, 1.0, -0.3, 0.2])
    >>> rmodel = reparameterize(model)  # use it as the model: SVI, MCMC, Predictive
    >>> tr = handlers.trace(handlers.seed(rmodel, 0)).get_trace(group, y=y)
    >>> tr["a"]["type"], tr["a_base"]["type"], tr["a_offset_mu"]["type"]
    ('deterministic', 'sample', 'param')
    >>> rmodel.plan_for(group, y=y).names
    ('a',)
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
    if unwrap:
        model = unwrap_model(model)[0]
    return ReparameterizedModel(model, plan, init=init, learn=learn, noncentre=noncentre, at=at)


@dataclass(frozen=True)
class _Prepared:
    """What one input signature of a reparameterized model uses."""

    config: ReparamConfig
    observed: bool  # the call had an observed site (its plan was made with data)


class ReparameterizedModel:
    """What ``reparameterize`` returns: the model, with its plan applied on every call.

    It has the model's signature and name; ``model`` is the model as written and ``plan_for``
    the plan used for given inputs (analysing the model if needed).
    """

    def __init__(self, model: Callable, plan: Plan | None = None, *, init: str = "analytic", learn: bool = True,
                 noncentre: Any = "auto", at: dict | None = None):
        functools.update_wrapper(self, model)
        self.model = model
        self.plan, self.init, self.learn, self.noncentre, self.at = plan, init, learn, noncentre, at
        self._prepared: dict[Any, _Prepared] = {}

    def __call__(self, *args, **kwargs):
        config = self._config_for(args, kwargs)
        return apply_config(self.model, config)(*args, **kwargs)

    def plan_for(self, *args, **kwargs) -> Plan:
        """The plan used for these inputs (analysing the model if needed)."""
        return self._config_for(args, kwargs).plan

    def _config_for(self, args, kwargs) -> ReparamConfig:
        key = _signature(args, kwargs)
        prepared = self._prepared.get(key)
        if prepared is None:
            # A call without data (Predictive with y=None) reuses the last plan made with data.
            with_data = [p.config.plan for p in self._prepared.values() if p.observed]
            prepared = self._prepared[key] = _prepare(self.model, self.plan, args, kwargs, self.init,
                                                      self.noncentre, self.at, self.learn,
                                                      with_data[-1] if with_data else None)
        return prepared.config


def _prepare(model, plan, args, kwargs, init, noncentre, at, learn, last_plan=None) -> _Prepared:
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
            report, model_trace = analyze_model(model, args, kwargs)
            plan, planning_notes = plan_with_notes(report, model_trace, init=init, noncentre=noncentre, at=at)
        for note in report.notes + planning_notes:
            if note.kind.warns:
                warnings.warn(f"autoreparam: {note}", stacklevel=4)
    validate_plan(plan, sites)
    return _Prepared(build_config(plan, learn=learn, taken=sites), observed)


def auto_mcmc(model: Callable, *args, num_warmup: int = 500, num_samples: int = 500, num_chains: int = 1,
              chain_method: str = "sequential", rng_key=0, progress_bar: bool = True, **kwargs):
    """NUTS by the method ``autoreparam.collapsed.choose_mcmc`` picks for ``model(*args, **kwargs)``.

    Collapsed NUTS (``collapsed_mcmc``) where the Gaussian block is exact and small enough for a
    dense marginal, else NUTS on ``reparameterize(model)``. Returns a ``CollapsedResult``: every
    site of the model by chain, ``result.method`` and the one-line ``result.reason``.

    >>> result = autoreparam.auto_mcmc(model, sigma, y=y)  # doctest: +SKIP
    >>> print(result.method, "-", result.reason)  # doctest: +SKIP
    """
    # Here, not at the top: only auto_mcmc needs collapsed (with conditional and precision), and
    # every cold `autoreparam analyze` imports api.
    from .collapsed import CollapsedResult, _check_chain_sizes, _key, _run_mcmc, choose_mcmc, collapsed_mcmc

    _check_chain_sizes("auto_mcmc", num_warmup, num_samples, num_chains)
    choice = choose_mcmc(model, *args, **kwargs)
    if choice.method == "collapsed":
        result = collapsed_mcmc(model, *args, block=choice.block, num_warmup=num_warmup, num_samples=num_samples,
                                num_chains=num_chains, chain_method=chain_method, rng_key=rng_key,
                                progress_bar=progress_bar, **kwargs)
        result.reason = choice.reason
        return result
    start = time.perf_counter()
    mcmc, counts = _run_mcmc(NUTS(reparameterize(model)), num_warmup, num_samples, num_chains, chain_method,
                             progress_bar, _key(rng_key), *args, **kwargs)
    samples = mcmc.get_samples(group_by_chain=True)
    jax.block_until_ready(samples)
    return CollapsedResult(samples, mcmc, "NUTS on the offsets", seconds=time.perf_counter() - start,
                           reason=choice.reason, **counts)


def auto(model: Callable | None = None, *, plan: Plan | None = None, init: str = "analytic", learn: bool = True,
         noncentre: Any = "auto", at: dict | None = None):
    """Decorator form of ``reparameterize``: ``@auto`` or ``@auto(init="zero", ...)``.

    >>> @auto(init="zero")
    ... def model(y=None):
    ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
    ...     with numpyro.plate("groups", 3):
    ...         a = numpyro.sample("a", dist.Normal(mu, 1))
    ...         numpyro.sample("y", dist.Normal(a, 0.5), obs=y)
    >>> print(model.plan_for(y=jnp.zeros(3)))
    plan for model: 0 sites with offsets, 0 non-centred (xi init: zero)
      (empty: the model is left as it is)
    """
    if model is None:
        return lambda fn: reparameterize(fn, plan, init=init, learn=learn, noncentre=noncentre, at=at)
    return reparameterize(model, plan, init=init, learn=learn, noncentre=noncentre, at=at)

