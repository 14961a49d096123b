"""The conditionally Gaussian block: found in a traced model, checked numerically, and its plain data.

Given the hyperparameters theta (every continuous latent site outside the block), the block z is
jointly Gaussian a priori and enters each likelihood it touches only through an affine natural
parameter:

    log p(y, z, theta) = -1/2 z^T H(theta) z + b(theta)^T z + c(theta)   (``exact``: Normal likelihoods)

and for Bernoulli/Binomial logits or a Poisson log rate the conditional is approximated by
Laplace (``exact`` is False).

``find_block`` reads the structure off the model's jaxpr: every distribution parameter is traced
back to the latent sites it depends on, and each operation on the way is known to keep it affine
(sums, gathers, broadcasts, products with something that does not depend on the block) or not.
Sites are then taken out of the block until what is left is a fixed point, each with its reason.
The result is checked with one compiled call: the Hessian-vector products of the log joint in z
(without the Laplace likelihoods) must be the same at two random z, for two random theta, and the
Laplace natural parameters must have the same JVPs there.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from math import prod
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.extend import core as jax_core

from .errors import ModelError
from .trace import (
    _TRACER_ERRORS,
    SERIAL_CODEGEN,
    ModelTrace,
    data_evaluated_eagerly,
    describe_exception,
    inlined,
    isolated_from_handlers,
    trace_model,
    untraceable_error,
    unwrap_distribution,
)

__all__ = ["LIKELIHOOD_LINKS", "BlockSite", "BlockLikelihood", "GaussianBlock", "find_block", "search_block",
           "block_for_report", "block_of_model", "natural_parameter", "refuse_discrete_latent",
           "discrete_latent_sites"]

#: How each supported likelihood family enters: the natural parameter that must be affine in z.
LIKELIHOOD_LINKS = {
    "Normal": "identity",
    "Bernoulli": "logit",
    "BernoulliLogits": "logit",
    "BernoulliProbs": "logit",  # only when probs is visibly sigmoid(eta)
    "Binomial": "logit",
    "BinomialLogits": "logit",
    "BinomialProbs": "logit",  # only when probs is visibly sigmoid(eta)
    "Poisson": "log",  # only when the rate is visibly exp(eta) (times constants)
}

#: Gaussian priors a block site may have, and the parameter that may be affine in the block.
GAUSSIAN_PRIORS = {
    dist.Normal: "loc",
    dist.MultivariateNormal: "loc",
    dist.LowRankMultivariateNormal: "loc",
    dist.GaussianRandomWalk: None,  # no loc: every parameter must be free of the block
}

#: Supported likelihoods and the parameter through which the block may enter them.
LIKELIHOOD_PARAMS = {
    dist.Normal: "loc",
    dist.BernoulliLogits: "logits",
    dist.BernoulliProbs: "probs",
    dist.BinomialLogits: "logits",
    dist.BinomialProbs: "probs",
    dist.Poisson: "rate",
}

# The probe compares its own outputs at two points against HESSIAN_RTOL: the legacy emitters (about
# 4x quicker to compile than the fusion emitters: 0.045 s against 0.16 s on county_covariate) leave
# every example's block and residuals as they were.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False, **SERIAL_CODEGEN}
# Relative difference of Hessian-vector products (or JVPs) that still counts as equal. The check runs
# in the model's own precision (float32 unless the user enabled x64): along a quadratic log joint the
# HVP's graph reads only v and constants, so it is equal to the bit at two points, and a log/exp
# link (Poisson) adds rounding near 1e-7; a term that is not quadratic changes it by O(1).
# Measured on the examples and the test zoo: 0 everywhere, 3e-8 on a Poisson model.
HESSIAN_RTOL = 1e-4


@dataclass(frozen=True)
class BlockSite:
    """One latent site of the block, with the shape of its value as traced."""

    name: str
    shape: tuple[int, ...]
    family: str

    @property
    def size(self) -> int:
        return prod(self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "family": self.family}

    @classmethod
    def from_json(cls, d: dict) -> "BlockSite":
        return cls(d["name"], tuple(int(n) for n in d["shape"]), d["family"])


@dataclass(frozen=True)
class BlockLikelihood:
    """An observed site whose natural parameter is affine in the block.

    ``param`` is the distribution parameter the block enters (``loc``, ``logits``, ``probs`` as
    ``sigmoid(eta)``, ``rate`` as ``exp(eta)``); ``natural_parameter(fn)`` returns eta.
    """

    name: str
    family: str
    link: str
    param: str = ""

    @property
    def exact(self) -> bool:
        return self.link == "identity"

    def to_json(self) -> dict:
        return {"name": self.name, "family": self.family, "link": self.link, "param": self.param,
                "exact": self.exact}

    @classmethod
    def from_json(cls, d: dict) -> "BlockLikelihood":
        return cls(d["name"], d["family"], d["link"], d.get("param", ""))


@dataclass(frozen=True)
class GaussianBlock:
    """The block z, the likelihoods it enters, theta, and why other latent sites were left out.

    ``theta`` holds every continuous latent site outside the block, in program order; discrete
    latent sites are in neither (``left_out`` says so). ``residual`` is the largest relative
    difference measured by the numerical check (Hessian-vector products of the log joint in z
    at two points, JVPs of the Laplace natural parameters), or None when it was not run.
    """

    sites: tuple[BlockSite, ...]
    likelihoods: tuple[BlockLikelihood, ...]
    theta: tuple[str, ...]
    left_out: dict[str, str] = field(default_factory=dict)  # latent site -> reason
    residual: float | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.sites)

    @property
    def exact(self) -> bool:
        """True when every likelihood is Normal, so p(z | theta, y) is exactly Gaussian."""
        return all(lik.exact for lik in self.likelihoods)

    def to_json(self) -> dict:
        return {
            "sites": [s.to_json() for s in self.sites],
            "likelihoods": [lik.to_json() for lik in self.likelihoods],
            "theta": list(self.theta),
            "left_out": dict(self.left_out),
            "size": self.size,
            "exact": self.exact,
            "residual": self.residual,
        }

    @classmethod
    def from_json(cls, d: dict) -> "GaussianBlock":
        return cls(
            tuple(BlockSite.from_json(s) for s in d["sites"]),
            tuple(BlockLikelihood.from_json(lik) for lik in d["likelihoods"]),
            tuple(d["theta"]),
            dict(d.get("left_out", {})),
            d.get("residual"),
        )

    def describe(self) -> list[str]:
        """The lines of the report's block section."""
        kind = ("exact: every likelihood is Normal" if self.exact
                else "Laplace: a likelihood is not Normal")
        lines = [f"Gaussian block ({kind}): {len(self.sites)} sites, {self.size} values"]
        width = max(len(s.name) for s in self.sites)
        for s in self.sites:
            shape = "scalar" if not s.shape else "(" + ", ".join(str(d) for d in s.shape) + ")"
            lines.append(f"  {s.name:<{width}}  {s.family} {shape}")
        for lik in self.likelihoods:
            how = "exact" if lik.exact else "Laplace"
            lines.append(f"  likelihood {lik.name}: {lik.family}, {lik.link} link on {lik.param} ({how})")
        if not self.likelihoods:
            lines.append("  likelihoods: none (the block enters no observed site)")
        lines.append(f"  theta (the other latent sites): {', '.join(self.theta) if self.theta else 'none'}")
        lines.extend(describe_left_out(self.left_out))
        if self.residual is not None:
            what = "Hessian-vector products in the block" if self.exact else \
                "Hessian-vector products (Laplace likelihoods aside) and the natural parameters' JVPs"
            lines.append(f"  checked: {what} equal at two points (residual {self.residual:.0e})")
        return lines


def describe_left_out(left_out: dict[str, str]) -> list[str]:
    """``left out:`` and one indented line per latent site with its reason."""
    if not left_out:
        return []
    width = max(len(n) for n in left_out)
    return ["  left out:"] + [f"    {n:<{width}}  {why}" for n, why in left_out.items()]


def refuse_discrete_latent(trace: dict, where: str) -> None:
    """A ModelError naming the first discrete latent site of a NumPyro trace: the block's methods hold
    nothing fixed, so each continuous latent site is in the block or in theta and a discrete one has no place.

    >>> import numpyro, numpyro.distributions as dist
    >>> from numpyro import handlers
    >>> def model():
    ...     numpyro.sample("k", dist.Bernoulli(0.5))
    >>> refuse_discrete_latent(handlers.trace(handlers.seed(model, 0)).get_trace(), "collapsed NUTS")
    Traceback (most recent call last):
    ...
    autoreparam.errors.ModelError: collapsed NUTS: latent site 'k' is discrete (Bernoulli...); ...
    """
    for name in discrete_latent_sites(trace):
        raise ModelError(f"{where}: latent site '{name}' is discrete ({type(trace[name]['fn']).__name__}); the "
                         "block's methods need every latent site outside the block continuous: marginalise "
                         "it out of the model (e.g. a mixture), or condition on it")


def discrete_latent_sites(trace: dict) -> list[str]:
    """The discrete latent sample sites of a NumPyro trace, in program order."""
    return [name for name, site in trace.items()
            if site["type"] == "sample" and not site["is_observed"] and site["fn"].support.is_discrete]


def natural_parameter(fn):
    """The natural parameter eta of a supported likelihood: loc, logits, logit(probs) or log(rate).

    >>> float(natural_parameter(dist.Poisson(jnp.exp(1.5))))
    1.5
    """
    base = unwrap_distribution(fn)
    kind = type(base)
    if kind is dist.Normal:
        return base.loc
    if kind in (dist.BernoulliLogits, dist.BinomialLogits):
        return base.logits
    if kind in (dist.BernoulliProbs, dist.BinomialProbs):
        return jnp.log(base.probs) - jnp.log1p(-base.probs)
    if kind is dist.Poisson:
        return jnp.log(base.rate)
    raise ModelError(f"natural_parameter: {kind.__name__} is not a supported likelihood; expected one of "
                     f"{', '.join(c.__name__ for c in LIKELIHOOD_PARAMS)}")


# -- the structure: how every distribution parameter depends on the latent sites -----------------

class _Flow(NamedTuple):
    """What one value of the jaxpr depends on, relative to the current block.

    ``deps``: latent sites it depends on. ``bad``: block sites it is not affine in, each with the
    operation that broke it. ``joint``: block sites it is not jointly affine in (``bad`` plus the
    factors of products of block values). ``link``: ("exp" | "logistic", flow of the argument)
    when the value is exp(eta) times constants, or sigmoid(eta).
    """

    deps: frozenset
    bad: dict
    joint: frozenset
    link: tuple | None = None


_CONST = _Flow(frozenset(), {}, frozenset())

# One data operand, kept elementwise: a link (exp, sigmoid) passes through.
_SHAPE_OPS = {"reshape", "broadcast_in_dim", "squeeze", "expand_dims", "transpose", "rev", "slice", "copy",
              "copy_p", "reduce_precision", "gather", "dynamic_slice"}
# Affine in all their data operands together.
_LINEAR_OPS = {"add", "sub", "neg", "add_any", "reduce_sum", "cumsum", "concatenate", "pad",
               "dynamic_update_slice", "scatter", "scatter-add", "scatter_add", "split"}
# Operand positions that are indices (must not depend on the block), from this position on.
_INDEX_FROM = {"gather": 1, "dynamic_slice": 1, "dynamic_update_slice": 2}
_INDEX_AT = {"scatter": (1,), "scatter-add": (1,), "scatter_add": (1,)}
_PASS_THROUGH = {"device_put", "optimization_barrier", "sharding_constraint"}
_LOOPS = {"scan", "while", "fori_loop"}


def _merge(flows, block, bad_sites=frozenset(), why: str = "", joint_sites=frozenset(), link=None) -> _Flow:
    deps = frozenset().union(*(f.deps for f in flows)) if flows else frozenset()
    bad: dict = {}
    for f in flows:
        for k, v in f.bad.items():
            bad.setdefault(k, v)
    for k in sorted(bad_sites & block):
        bad.setdefault(k, why)
    joint = frozenset().union(*(f.joint for f in flows)) if flows else frozenset()
    joint = joint | (bad_sites & block) | (joint_sites & block)
    return _Flow(deps, bad, joint, link)


def _nonlinear(flows, block, why) -> _Flow:
    out = _merge(flows, block)
    return _merge([out], block, out.deps, why)


def _sub_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        if isinstance(sub, jax_core.ClosedJaxpr):
            return sub.jaxpr
        if isinstance(sub, jax_core.Jaxpr):
            return sub
    return None


def _propagate(jaxpr, ins: list[_Flow], block: frozenset) -> list[_Flow]:
    env: dict = dict(zip(jaxpr.invars, ins))

    def read(v):
        return _CONST if isinstance(v, jax_core.Literal) else env.get(v, _CONST)

    for eqn in jaxpr.eqns:
        flows = [read(v) for v in eqn.invars]
        outs = _rule(eqn, flows, block)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _rule(eqn, ins: list[_Flow], block: frozenset) -> list[_Flow]:
    """The flows of one equation's outputs from those of its inputs."""
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if not any(f.deps for f in ins):
        return [_CONST] * n_out
    if name == "cond":
        index, operands = ins[0], ins[1:]
        branches = [_propagate(b.jaxpr, operands, block) for b in eqn.params["branches"]]
        why = "lax.cond on a block value"
        return [_merge([index, *col], block, index.deps, why) for col in zip(*branches)]
    if name in _LOOPS:
        return [_nonlinear(ins, block, f"a {name} loop")] * n_out
    sub = _sub_jaxpr(eqn)
    if sub is not None:
        if len(sub.invars) == len(ins):
            return _propagate(sub, ins, block)
        return [_nonlinear(ins, block, name)] * n_out
    if name in _PASS_THROUGH and len(ins) == n_out:
        return list(ins)
    index_at = _INDEX_AT.get(name, tuple(range(_INDEX_FROM.get(name, len(ins)), len(ins))))
    index_sites = frozenset().union(*(ins[i].deps for i in index_at)) if index_at else frozenset()
    data = [f for i, f in enumerate(ins) if i not in index_at]
    index = [ins[i] for i in index_at]
    if name == "convert_element_type" and not jnp.issubdtype(eqn.params["new_dtype"], jnp.inexact):
        return [_nonlinear(ins, block, f"conversion to {np.dtype(eqn.params['new_dtype']).name}")]
    if name in _SHAPE_OPS or name == "convert_element_type":
        link = data[0].link if len(data) == 1 else None
        return [_merge(data + index, block, index_sites, "an index computed from it", link=link)] * n_out
    if name in _LINEAR_OPS:
        return [_merge(data + index, block, index_sites, "an index computed from it")] * n_out
    if name == "select_n":
        predicate = ins[0]
        return [_merge(ins, block, predicate.deps, "jnp.where/select on a block value")]
    if name in ("mul", "dot_general"):
        return [_product(name, ins[0], ins[1], block)]
    if name == "div":
        x, y = ins
        if y.deps & block:
            return [_merge(ins, block, y.deps, "division by a block value", x.deps)]
        link = ("exp", _merge([x.link[1], y], block)) if x.link and x.link[0] == "exp" else None
        return [_merge(ins, block, link=link)]
    if name in ("exp", "logistic") and len(ins) == 1:
        kind = "exp" if name == "exp" else "logistic"
        return [_merge(ins, block, ins[0].deps, name, link=(kind, ins[0]))]
    return [_nonlinear(ins, block, name)] * n_out


def _product(name, x: _Flow, y: _Flow, block) -> _Flow:
    xb, yb = x.deps & block, y.deps & block
    if xb and yb:
        link = None
        if name == "mul" and x.link and y.link and x.link[0] == y.link[0] == "exp":
            link = ("exp", _merge([x.link[1], y.link[1]], block))
        return _merge([x, y], block, xb & yb, f"{name} of a block value with itself", xb | yb, link=link)
    link = None
    dependent, other = (x, y) if xb else (y, x)
    if name == "mul" and dependent.link and dependent.link[0] == "exp":
        link = ("exp", _merge([dependent.link[1], other], block))
    return _merge([x, y], block, link=link)


@dataclass
class _Structure:
    """The model as one jaxpr: continuous latent values -> every sample site's distribution slots,
    then each sample site's log density and each supported likelihood's natural parameter.

    The slots feed the structural rules; the log densities and natural parameters feed the
    numerical check, which differentiates this jaxpr instead of tracing the model again.
    """

    jaxpr: Any
    inputs: list[str]
    labels: list[tuple[str, str]]  # (site, slot) of the first len(labels) outputs
    families: dict[str, type]  # innermost distribution class of every sample site
    log_prob_at: dict[str, int]  # sample site -> output index of its summed log density
    eta_at: dict[str, int]  # observed site of a supported family -> output index of its eta
    masked: set[str] = field(default_factory=set)  # latent sites whose density is masked

    def flows(self, block: frozenset) -> dict[str, dict[str, _Flow]]:
        ins = [_Flow(frozenset([n]), {}, frozenset()) for n in self.inputs]
        out: dict[str, dict[str, _Flow]] = {}
        for (site, slot), f in zip(self.labels, _propagate(self.jaxpr.jaxpr, ins, block)):
            out.setdefault(site, {})[slot] = f
        return out


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer))


def _is_masked(fn) -> bool:
    """True when a wrapper masks the density (handlers.mask, obs_mask's missing values, .mask())."""
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        if isinstance(fn, dist.MaskedDistribution) and fn._mask is not True:
            return True
        fn = fn.base_dist
    return False


def _slots(site) -> dict[str, Any]:
    """The arrays a sample site's log density reads: parameters, masks, the observed value, scale."""
    fn = site["fn"]
    base = unwrap_distribution(fn)
    slots = {p: v for p, v in vars(base).items() if p in base.arg_constraints and _is_array(v)}
    layer, masks = fn, []
    while isinstance(layer, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        if isinstance(layer, dist.MaskedDistribution) and _is_array(layer._mask):
            masks.append(layer._mask)
        layer = layer.base_dist
    slots.update({"mask" if i == 0 else f"mask {i}": m for i, m in enumerate(masks)})
    try:
        leaves = jax.tree_util.tree_leaves(fn)
    except Exception:  # noqa: BLE001 - a distribution that is not a pytree: its named parameters suffice
        leaves = []
    known = list(slots.values())
    extra = [leaf for leaf in leaves if _is_array(leaf) and not any(leaf is k for k in known)]
    slots.update({"parameters" if i == 0 else f"parameters {i}": leaf for i, leaf in enumerate(extra)})
    if site["is_observed"]:
        slots["value"] = site["value"]
    if _is_array(site.get("scale")):
        slots["scale factor"] = site["scale"]
    return {k: jnp.asarray(v) for k, v in slots.items()}


def _structure(mt: ModelTrace, point: dict) -> _Structure:
    names = mt.latent_names
    fixed = {n: v for n, v in point.items() if n not in names}
    labels: list[tuple[str, str]] = []
    families: dict[str, type] = {}
    log_prob_at: dict[str, int] = {}
    eta_at: dict[str, int] = {}
    masked: set[str] = set()

    def outputs(values):
        tr = mt.run({**dict(zip(names, values)), **fixed})
        labels.clear()
        slots, extra = [], []
        for name, site in tr.items():
            if site["type"] != "sample":
                continue
            families[name] = type(unwrap_distribution(site["fn"]))
            if not site["is_observed"] and _is_masked(site["fn"]):
                masked.add(name)
            for slot, value in _slots(site).items():
                labels.append((name, slot))
                slots.append(value)
            log_prob_at[name] = len(extra)
            extra.append(_log_prob(site))
            if site["is_observed"] and families[name] in LIKELIHOOD_PARAMS:
                eta_at[name] = len(extra)
                extra.append(jnp.asarray(natural_parameter(site["fn"])))
        log_prob_at.update({n: len(slots) + i for n, i in log_prob_at.items()})
        eta_at.update({n: len(slots) + i for n, i in eta_at.items()})
        return slots + extra

    example = [jnp.asarray(point[n]) for n in names]
    with isolated_from_handlers():
        try:
            with _staged():  # cheapest: nothing runs (or compiles) until the check
                closed = jax.make_jaxpr(outputs)(example)
        except _TRACER_ERRORS:  # the model computes with its data in Python (int(idx.max()) + 1)
            with data_evaluated_eagerly():
                closed = jax.make_jaxpr(outputs)(example)
    return _Structure(closed, list(names), list(labels), families, log_prob_at, eta_at, masked)


# -- the search: a fixed point of the structural rules, then the numerical check ---------------------

def find_block(model_trace: ModelTrace) -> GaussianBlock | None:
    """The conditionally Gaussian block of a traced model, or None when no latent site qualifies.

    >>> def model(group, y=None):
    ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
    ...     tau = numpyro.sample("tau", dist.HalfNormal(1))
    ...     with numpyro.plate("groups", 4):
    ...         a = numpyro.sample("a", dist.Normal(mu, tau))
    ...     with numpyro.plate("data", len(group)):
    ...         numpyro.sample("y", dist.Normal(a[group], 0.5), obs=y)
    >>> block = find_block(trace_model(model, (jnp.array([0, 1, 2, 3, 0, 1]),), {"y": jnp.zeros(6)}))
    >>> block.names, block.theta, block.exact
    (('mu', 'a'), ('tau',), True)
    >>> block.left_out
    {'tau': 'HalfNormal is not Gaussian (support positive)'}
    """
    return search_block(model_trace)[0]


def search_block(model_trace: ModelTrace) -> tuple[GaussianBlock | None, dict[str, str]]:
    """``(block or None, left_out)``: like ``find_block``, with the reasons also when there is no block."""
    mt = model_trace
    with isolated_from_handlers():
        points = [mt.point(1), mt.point(2)]
    try:
        structure = _structure(mt, points[0])
    except ModelError:
        raise
    except _TRACER_ERRORS as exc:
        raise untraceable_error(exc) from None
    except Exception as exc:
        raise ModelError(f"the model raised {describe_exception(exc)} when traced for its Gaussian block") \
            from exc
    left_out = _not_gaussian(mt, structure)
    block = frozenset(n for n in mt.latent_names if n not in left_out)
    while True:  # every failed check takes at least one site out
        block, flows = _fixed_point(mt, structure, block, left_out)
        if not block:
            return None, {n: left_out[n] for n in mt.sites if n in left_out}
        likelihoods = _likelihoods(mt, structure, flows, block)
        try:
            failed, residual = _check(mt, structure, block, likelihoods, flows, points)
        except Exception as exc:
            raise ModelError(f"the numerical check of the Gaussian block failed: {describe_exception(exc)}") \
                from exc
        if not failed:
            break
        left_out.update({n: why for n, why in failed.items() if n not in left_out})
        block = block - frozenset(failed)
    left_out = {n: left_out[n] for n in mt.sites if n in left_out}
    names = [n for n in mt.latent_names if n in block]
    sites = tuple(BlockSite(n, tuple(mt.sites[n].shape), structure.families[n].__name__) for n in names)
    theta = tuple(n for n in mt.latent_names if n not in block)
    return GaussianBlock(sites, likelihoods, theta, left_out, residual), left_out


def _not_gaussian(mt: ModelTrace, structure: _Structure) -> dict[str, str]:
    out = {}
    for name, site in mt.sites.items():
        if site.type != "latent":
            continue
        family = structure.families[name]
        if site.is_discrete:
            out[name] = f"discrete ({site.distribution}): held fixed, in neither the block nor theta"
        elif family in GAUSSIAN_PRIORS and name in structure.masked:
            out[name] = ("its Gaussian prior is masked (handlers.mask or obs_mask): masked elements have "
                         "no density, so their conditional is improper")
        elif family in GAUSSIAN_PRIORS:
            continue
        elif issubclass(family, tuple(GAUSSIAN_PRIORS)):
            out[name] = (f"{family.__module__}.{family.__qualname__} subclasses a Gaussian family; only "
                         "numpyro's own Gaussian families are trusted")
        else:
            out[name] = f"{site.distribution} is not Gaussian (support {site.support})"
    return out


def _fixed_point(mt, structure: _Structure, block: frozenset, left_out: dict):
    """Take sites out of the block until every rule holds; returns (block, flows)."""
    while True:
        flows = structure.flows(block)
        removed: dict[str, str] = {}
        for site, slots in flows.items():
            for name, why in _violations(mt, structure, site, slots, block).items():
                removed.setdefault(name, why)
        if not removed:
            return block, flows
        left_out.update({n: why for n, why in removed.items() if n not in left_out})
        block = block - frozenset(removed)


def _violations(mt, structure: _Structure, s: str, slots: dict[str, _Flow], block) -> dict[str, str]:
    """Block sites that must leave because of how they enter site ``s``, with the reason."""
    site, family = mt.sites[s], structure.families[s]
    touched = frozenset().union(*(f.deps for f in slots.values())) & block - {s}
    if not touched:
        return {}
    if site.type == "latent" and s not in block:
        return {n: f"enters the prior of '{s}' ({site.distribution}), which is outside the block"
                for n in _in_order(mt, touched)}
    if site.type == "latent":
        natural, where = GAUSSIAN_PRIORS[family], f"the loc of '{s}'"
    elif family in LIKELIHOOD_PARAMS:
        natural, where = LIKELIHOOD_PARAMS[family], f"observed '{s}'"
    else:
        return {n: f"'{s}' is {site.distribution}: no supported link" for n in _in_order(mt, touched)}
    out: dict[str, str] = {}
    for slot, f in slots.items():
        hit = f.deps & block
        if not hit:
            continue
        if slot != natural:
            what = f"the observed value of '{s}'" if slot == "value" else \
                f"the {slot} of {'observed ' if site.type == 'observed' else ''}'{s}'"
            out.update({n: f"enters {what}" for n in _in_order(mt, hit) if n not in out})
        elif slot in ("loc", "logits"):
            out.update(_culprits(mt, f, block, where))
        else:
            kind, needed = (("exp", "exp(eta)") if slot == "rate" else
                            ("logistic", f"sigmoid(eta); write {family.__name__.removesuffix('Probs')}(logits=eta)"))
            if f.link and f.link[0] == kind:
                out.update(_culprits(mt, f.link[1], block, where))
            else:
                out.update({n: f"enters the {slot} of observed '{s}' other than as {needed}"
                            for n in _in_order(mt, hit) if n not in out})
    return out


_PRIMITIVE_WORDS = {"gt": "a comparison", "lt": "a comparison", "ge": "a comparison", "le": "a comparison",
                    "eq": "a comparison", "ne": "a comparison", "integer_pow": "a power", "pow": "a power",
                    "max": "max", "min": "min", "abs": "abs", "sign": "sign", "logistic": "sigmoid"}


def _culprits(mt, f: _Flow, block, where: str) -> dict[str, str]:
    """The block sites to take out so that ``f`` is affine in the block (all of ``bad``, or one factor)."""
    joint = f.joint & block
    if not joint:
        return {}
    bad = {k: why for k, why in f.bad.items() if k in block}
    if bad:
        return {k: f"enters {where} through a non-affine function ({_PRIMITIVE_WORDS.get(why, why)})"
                for k, why in bad.items()}
    # Only a product of block values: taking out one factor (the smallest) leaves the rest affine.
    pick = min(joint, key=lambda n: (mt.sites[n].size, -mt.sites[n].order))
    others = ", ".join(f"'{n}'" for n in _in_order(mt, joint - {pick}))
    return {pick: f"multiplies {others} in {where}; a product of block sites is not affine"}


def _in_order(mt, names) -> list[str]:
    return sorted(names, key=lambda n: mt.sites[n].order)


def _likelihoods(mt, structure: _Structure, flows, block) -> tuple[BlockLikelihood, ...]:
    out = []
    for s, slots in flows.items():
        if mt.sites[s].type != "observed" or not any(f.deps & block for f in slots.values()):
            continue
        family = structure.families[s]
        out.append(BlockLikelihood(s, family.__name__, LIKELIHOOD_LINKS[family.__name__], LIKELIHOOD_PARAMS[family]))
    return tuple(out)


def _log_prob(site):
    fn, value = site["fn"], site["value"]
    lp = fn.log_prob(value, site["intermediates"]) if site.get("intermediates") else fn.log_prob(value)
    if site.get("scale") is not None:
        lp = site["scale"] * lp
    return jnp.sum(lp)


def _check(mt, structure: _Structure, block, likelihoods, flows, points) -> tuple[dict[str, str], float]:
    """Sites the numerical check takes out (with reasons), and the largest relative difference seen.

    One compiled function of the model's jaxpr, run at (z1, theta1), (z2, theta1), (z1, theta2)
    and (z2, theta2): the Hessian-vector product along one random v of the log joint without the
    Laplace likelihoods, and the JVPs along v of the Laplace natural parameters.
    """
    z_names = [n for n in structure.inputs if n in block]
    laplace = [lik.name for lik in likelihoods if not lik.exact]
    quadratic = [i for s, i in structure.log_prob_at.items() if s not in laplace]
    # The data (the jaxpr's constants) go in as arguments: closed over, every operation on them
    # alone would run eagerly under data_evaluated_eagerly, each compiling a kernel of its own.
    consts = list(structure.jaxpr.consts)
    rng = np.random.default_rng(0)
    with isolated_from_handlers(), data_evaluated_eagerly():
        zs = [{n: jnp.asarray(p[n]) for n in z_names} for p in points]
        thetas = [{n: jnp.asarray(p[n]) for n in structure.inputs if n not in block} for p in points]
        v = {n: rng.standard_normal(np.shape(zs[0][n])).astype(zs[0][n].dtype) for n in z_names}

        def parts(z, theta, consts):
            # Nested jits inlined: differentiated twice, each would be traced and transformed on its own.
            outs = inlined(jax_core.ClosedJaxpr(structure.jaxpr.jaxpr, consts))(
                *[z[n] if n in z else theta[n] for n in structure.inputs])
            return sum(outs[i] for i in quadratic), {y: outs[structure.eta_at[y]] for y in laplace}

        def probe(z, theta, v, consts):
            hv = jax.jvp(jax.grad(lambda zz: parts(zz, theta, consts)[0]), (z,), (v,))[1]
            eta_dot = jax.jvp(lambda zz: parts(zz, theta, consts)[1], (z,), (v,))[1]
            return hv, eta_dot

        with _staged():
            compiled = _compile(probe, zs[0], thetas[0], v, consts)
        runs = [[jax.tree.map(np.asarray, compiled(z, t, v, consts)) for z in zs] for t in thetas]
    failed: dict[str, str] = {}
    worst = 0.0
    for first, second in runs:
        for n in z_names:
            rel = _relative_difference(first[0][n], second[0][n])
            worst = max(worst, rel)
            if rel > HESSIAN_RTOL:
                failed.setdefault(n, "the log joint is not quadratic in it: Hessian-vector products at two "
                                     f"points differ by {rel:.0e} (relative)")
        for y in laplace:
            rel = _relative_difference(first[1][y], second[1][y])
            worst = max(worst, rel)
            if rel > HESSIAN_RTOL:
                hit = frozenset().union(*(f.deps for f in flows[y].values())) & block
                for n in _in_order(mt, hit):
                    failed.setdefault(n, f"the natural parameter of '{y}' is not affine in it: JVPs at two "
                                         f"points differ by {rel:.0e} (relative)")
    return failed, worst


def _staged():
    """A context in which jit stages every operation, also inside ``data_evaluated_eagerly``.

    The check's function reads no data outside its arguments, but differentiating it creates
    constants (symbolic zeros made concrete, their reshapes and sums); under eager constant
    folding each would run, and compile, on its own. Without JAX's private switch, nothing
    changes but the cost.
    """
    try:
        from jax._src.config import eager_constant_folding
    except ImportError:  # pragma: no cover - a JAX without the switch
        return nullcontext()
    return eager_constant_folding(False)


def _compile(fn, *example_args):
    """``jax.jit(fn)`` compiled for these arguments with XLA's cheap settings: it runs four times."""
    lowered = jax.jit(fn).lower(*example_args)
    try:
        return lowered.compile(compiler_options=FAST_COMPILE)
    except Exception:  # noqa: BLE001 - an XLA without these options: compile with its defaults
        return lowered.compile()


def _relative_difference(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    scale = max(np.abs(a).max(), np.abs(b).max())
    return float(np.abs(a - b).max() / scale) if scale > 0 else 0.0


def block_for_report(model_trace: ModelTrace) -> tuple[GaussianBlock | None, str | None]:
    """``(block, None)``, or ``(None, note)`` saying why there is no block (each site with its reason,
    or the one-line error that stopped the search: the rest of the analysis stands without it)."""
    try:
        block, left_out = search_block(model_trace)
    except ModelError as exc:
        return None, f"the Gaussian block was not searched: {exc}"
    if block is not None:
        return block, None
    if not left_out:
        return None, "no conditionally Gaussian block: the model has no continuous latent site"
    reasons = "; ".join(f"'{n}' ({why})" for n, why in left_out.items())
    return None, f"no conditionally Gaussian block: {reasons}"


def block_of_model(model, args: tuple = (), kwargs: dict | None = None) -> tuple[GaussianBlock | None, str | None]:
    """``block_for_report`` of ``model(*args, **kwargs)``, traced on its own (isolated from the
    caller's handlers, as ``analyze`` traces it), for the entry points that need only the block."""
    with isolated_from_handlers(), data_evaluated_eagerly():
        return block_for_report(trace_model(model, tuple(args), dict(kwargs or {})))
