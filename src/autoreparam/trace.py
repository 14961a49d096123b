"""Run a NumPyro model under effect handlers and record its sites.

The first pass is shape-only (``jax.eval_shape``, as ``numpyro.infer.inspect`` does);
a model whose Python code needs concrete data values falls back to one eager run.
Concrete points for the numerical checks come from ``init_to_uniform``: every
continuous latent site is drawn uniformly in (-2, 2) of its unconstrained space.
"""

from __future__ import annotations

import functools
import linecache
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.util import log_density
from numpyro.ops.provenance import eval_provenance
from numpyro.primitives import _PYRO_STACK, Messenger

from . import host_prng
from .errors import AutoreparamError, InputError, ModelError
from .notes import Note, NoteKind

__all__ = ["Plate", "Site", "ModelTrace", "trace_model", "LOC_SCALE_FAMILIES", "unwrap_distribution",
           "data_evaluated_eagerly", "TracedSite", "trace_sites", "log_joint"]

# The families that non-centring supports: a loc and a scale, and any other parameters kept as they are.
LOC_SCALE_FAMILIES = (dist.Normal, dist.Cauchy, dist.Laplace, dist.Logistic, dist.StudentT, dist.Gumbel,
                      dist.SoftLaplace)

NO_OBSERVED_SITE_NOTE = (
    "the model has no observed site (no numpyro.sample with obs=...): there is no likelihood, so "
    "there are no likelihood-invariant pairs; funnels are found and non-centred from the prior alone"
)

_TRACER_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


@dataclass(frozen=True)
class Plate:
    """A ``numpyro.plate`` as seen by a site: name, full size, batch dim, subsample size."""

    name: str
    size: int
    dim: int
    subsample_size: int

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "dim": self.dim,
                "subsample_size": self.subsample_size}


@dataclass(frozen=True)
class Site:
    """One site of the model, in program order.

    ``type`` is ``"latent"``, ``"observed"``, ``"deterministic"`` or ``"param"``.
    ``distribution`` is the name of the innermost distribution (``Normal`` for
    ``Normal(0, 1).expand([3]).to_event(1)``) and ``params`` its parameter names.
    """

    name: str
    type: str
    order: int
    shape: tuple[int, ...]
    distribution: str | None = None
    batch_shape: tuple[int, ...] = ()
    event_shape: tuple[int, ...] = ()
    support: str | None = None
    is_discrete: bool = False
    plates: tuple[Plate, ...] = ()
    params: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": self.type,
            "order": self.order,
            "distribution": self.distribution,
            "shape": list(self.shape),
            "batch_shape": list(self.batch_shape),
            "event_shape": list(self.event_shape),
            "support": self.support,
            "is_discrete": self.is_discrete,
            "plates": [p.to_json() for p in self.plates],
            "params": list(self.params),
        }


@contextmanager
def isolated_from_handlers():
    """Run with an empty NumPyro handler stack (e.g. analysing a model from inside a model run)."""
    saved = list(_PYRO_STACK)
    _PYRO_STACK.clear()
    try:
        yield
    finally:
        _PYRO_STACK[:] = saved


@contextmanager
def data_evaluated_eagerly():
    """Inside jit (or ``make_jaxpr``, ``fori_loop``), compute what does not depend on a traced value.

    JAX stages every operation under jit, so a model that computes a size from its data
    (``n = int(region.max()) + 1``) or indexes a numpy array with a plate's subsample index
    cannot be traced as it stands. Run the model under this context, with its inputs closed
    over (never passed as jit arguments): the data and the seeded random keys stay concrete,
    and only computations on the latent values are traced.
    """
    with jax.ensure_compile_time_eval():
        yield


@contextmanager
def data_staged():
    """Undo ``data_evaluated_eagerly`` inside: stage every operation under jit or ``eval_shape``.

    A shape-only trace under ``data_evaluated_eagerly`` would run every operation on the data
    (and on the seeded random keys) eagerly, each one compiled on its own: try it staged first.
    """
    from jax._src.config import eager_constant_folding

    with eager_constant_folding(False):
        yield


def staged(fn: Callable) -> Callable:
    """``fn`` traced with the data staged (``data_staged``): for the analysis's own programs around
    a log joint, which falls back to evaluating the data eagerly by itself (``log_joint``)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with data_staged():
            return fn(*args, **kwargs)

    return wrapped


def staged_if_possible(fn: Callable) -> Callable:
    """``fn`` traced with the data staged (``data_staged``), or, when the model's Python code
    needs the data's values, with the data evaluated eagerly. Wrap what jit or eval_shape traces."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            with data_staged():
                return fn(*args, **kwargs)
        except _TRACER_ERRORS:
            with data_evaluated_eagerly():
                return fn(*args, **kwargs)

    return wrapped


# XLA options for the analysis's own programs: each runs a few times on a small model, so
# compiling (3x faster without LLVM's optimisations and the new fusion emitters, measured on
# the tensor example) costs more than running. Elementwise IEEE arithmetic is the same either way.
QUICK_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
QUICK_COMPILE_MAX_SIZE = 200_000  # programs on more values than this compile with XLA's defaults
# Added to every helper program's options: XLA splits a program's LLVM module into parts compiled on
# a thread pool, which on programs this small costs more CPU than one piece (the draws compile in
# 0.14 s against 0.24 s on county_covariate). Every report and plan keeps its bits; the guard's dense
# Hessian (legacy emitters) moves by float32 rounding (3e-6 relative on eight schools).
SERIAL_CODEGEN = {"xla_cpu_parallel_codegen_split_count": 1}
# A helper program whose running outweighs its compiling gets LLVM's -O1 on top of its options: the
# quick options run the dense Hessian of the crossed logistic example (403 columns, each over 15,000
# observations; 6 runs) in 310 ms against 110 ms, and its Newton program (183 runs) in 2.8 ms against
# 0.8 ms, for 0.2-0.4 s more compile each. The work is the mean number of values an equation of the
# program makes times the runs expected: 2.3e6 and 1.1e6 there; at most 3e4 on the other examples,
# whose programs would compile 0.3-1.5 s slower for a few milliseconds of running.
RUNTIME_BOUND_OPTIONS = {"xla_backend_optimization_level": 1}
RUNTIME_BOUND_WORK = 200_000


def _equations(eqns):
    """Every equation of ``eqns`` and, depth first, of the jaxprs inside them."""
    for eqn in eqns:
        yield eqn
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(inner, (Jaxpr, ClosedJaxpr)):
                    yield from _equations(getattr(inner, "jaxpr", inner).eqns)


def _evaluate(eqns, env: dict) -> None:
    """Bind ``eqns`` in order, reading and writing their variables' values in ``env``; the equations
    of a nested ``jit`` are bound in its place (inlined)."""
    for eqn in eqns:
        args = [v.val if isinstance(v, Literal) else env[v] for v in eqn.invars]
        if eqn.primitive.name in ("jit", "pjit"):
            inner = eqn.params["jaxpr"]
            inner_env = {**dict(zip(inner.jaxpr.constvars, inner.consts)), **dict(zip(inner.jaxpr.invars, args))}
            _evaluate(inner.jaxpr.eqns, inner_env)
            outs = [v.val if isinstance(v, Literal) else inner_env[v] for v in inner.jaxpr.outvars]
        else:
            outs = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))


def inlined(closed) -> Callable:
    """A closed jaxpr as a function of its inputs (returning the list of its outputs) that binds its
    equations in order, the equations of nested jits in their place; under jit, also the equations
    on its constants alone are staged (``data_staged``), not run and compiled one by one."""

    def call(*args):
        env = {**dict(zip(closed.jaxpr.constvars, closed.consts)), **dict(zip(closed.jaxpr.invars, args))}
        with data_staged():
            _evaluate(closed.jaxpr.eqns, env)
        return [v.val if isinstance(v, Literal) else env[v] for v in closed.jaxpr.outvars]

    return call


def replayed(fn: Callable) -> Callable:
    """``fn`` traced once (with the data staged) per structure, shape and dtype of its arguments, and
    then replayed primitive by primitive with nested jits inlined.

    Wrap a log joint before differentiating it: grad, jvp and vmap then transform primitives alone,
    not the model's Python code with its numpyro handlers and the hundreds of nested jits of
    ``jax.numpy``, each of which they would otherwise trace, differentiate and batch on its own.
    The primitives, and so the compiled program's arithmetic, are the same.

    >>> f = replayed(lambda x: jnp.sum(jnp.sin(x) ** 2))
    >>> jax.grad(f)(jnp.zeros(2))
    Array([0., 0.], dtype=float32)
    """
    programs = {}

    @functools.wraps(fn)
    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        key = tree, tuple(jax.typeof(x) for x in leaves), bool(jax.config.jax_enable_x64)
        if key not in programs:
            with data_staged():
                closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
            programs[key] = closed, jax.tree.structure(out_shape)
        closed, out_tree = programs[key]
        return jax.tree.unflatten(out_tree, inlined(closed)(*leaves))

    return call


def _prng_part(closed) -> tuple[list, list, list] | None:
    """The program ``closed`` (nested jits inlined) cut in two: (the equations that make its random
    bits, the variables of theirs that the rest reads, the rest), or None when there are no random
    bits."""
    jaxpr = closed.jaxpr
    made_by = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    todo = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "random_bits"]
    prng = set()
    while todo:
        eqn = todo.pop()
        if id(eqn) not in prng:
            prng.add(id(eqn))
            todo.extend(made_by[v] for v in eqn.invars if not isinstance(v, Literal) and v in made_by)
    first = [eqn for eqn in jaxpr.eqns if id(eqn) in prng]
    rest = [eqn for eqn in jaxpr.eqns if id(eqn) not in prng]
    if not first:
        return None
    read = {v for eqn in rest for v in eqn.invars if not isinstance(v, Literal)} | \
        {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    return first, [v for eqn in first for v in eqn.outvars if v in read], rest


def _program_key(tree, leaves) -> tuple:
    """What a compiled program depends on besides its function: the arguments' structure, shapes and
    dtypes, and x64 (an int32 seed gives a float32 or a float64 program)."""
    return tree, tuple((np.shape(x), jnp.result_type(x)) for x in leaves), bool(jax.config.jax_enable_x64)


def jit_draws(fn: Callable, size: int = 0) -> Callable:
    """``jit_quick(fn)`` for a program of prior draws, with the part that makes its random bits (the
    seed's keys, their splits and JAX's threefry hashes) evaluated in numpy (``host_prng``) instead
    of compiled: that part cost 50-70 ms of lowering and compiling, a tenth of a small model's cold
    analysis, to run once. Where the evaluator does not cover it, the whole program compiles."""
    compiled = {}

    def build(args):
        traced = jax.jit(fn).trace(*args)
        closed = traced.jaxpr
        if size > QUICK_COMPILE_MAX_SIZE:
            return _compile(traced, QUICK_COMPILE_OPTIONS, size)

        with data_staged():
            flat = jax.make_jaxpr(inlined(closed))(*args)
        parts = _prng_part(flat)
        if parts is None:
            return _compile(traced, QUICK_COMPILE_OPTIONS, size)
        first, shared, rest = parts
        jaxpr, out_tree = flat.jaxpr, jax.tree.structure(traced.out_info)
        prng = host_prng.evaluator(flat, first, shared)
        try:
            bits = prng(*args)
        except host_prng.HostUnsupported:
            return _compile(traced, QUICK_COMPILE_OPTIONS, size)

        def remainder(args, bits):
            env = {**dict(zip(jaxpr.constvars, flat.consts)), **dict(zip(jaxpr.invars, args)),
                   **dict(zip(shared, bits))}
            _evaluate(rest, env)
            return [v.val if isinstance(v, Literal) else env[v] for v in jaxpr.outvars]

        with data_staged():  # the constants of the equations stay staged, not folded op by op
            remainder = _compile(jax.jit(remainder).trace(args, bits), QUICK_COMPILE_OPTIONS, size)
        return lambda *args: jax.tree.unflatten(out_tree, remainder(args, prng(*args)))

    @functools.wraps(fn)
    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return jax.jit(fn)(*args)  # inside a transformation: an ordinary jit
        key = _program_key(tree, leaves)
        if key not in compiled:
            compiled[key] = build(args)
        return compiled[key](*args)

    return call


def values_per_equation(jaxpr) -> float:
    """The mean number of values an equation of a (closed) jaxpr makes, over the jaxprs inside it too:
    how much running a program does for each thing its compiler has to compile.

    >>> values_per_equation(jax.make_jaxpr(lambda x: jnp.sum(x * 2.0))(jnp.ones(1000)))
    500.5
    """
    equations = list(_equations(getattr(jaxpr, "jaxpr", jaxpr).eqns))
    values = sum(int(np.prod(v.aval.shape, dtype=np.int64))
                 for eqn in equations for v in eqn.outvars if hasattr(v.aval, "shape"))
    return values / max(len(equations), 1)


def _compile(traced, options: dict | None, size: int, runs: int = 1):
    """Lower a traced program with the data staged and compile it with ``options`` (None: XLA's
    defaults) and ``SERIAL_CODEGEN``, or with XLA's defaults alone when it handles more than
    ``QUICK_COMPILE_MAX_SIZE`` values. ``runs`` is how often the program is expected to run: with
    ``options``, a program whose work (``values_per_equation`` x ``runs``) reaches
    ``RUNTIME_BOUND_WORK`` also gets ``RUNTIME_BOUND_OPTIONS``."""
    if options is not None and values_per_equation(traced.jaxpr) * runs >= RUNTIME_BOUND_WORK:
        options = {**options, **RUNTIME_BOUND_OPTIONS}
    options = None if size > QUICK_COMPILE_MAX_SIZE else {**SERIAL_CODEGEN, **(options or {})}
    with data_staged():
        lowered = traced.lower()
    try:
        return lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception:  # noqa: BLE001 - an XLA without these options: its defaults
        return lowered.compile()


def jit_quick(fn: Callable, size: int = 0, options: dict | None = QUICK_COMPILE_OPTIONS,
              runs: int = 1) -> Callable:
    """``jax.jit(fn)``, compiled with ``options`` (``QUICK_COMPILE_OPTIONS``; None: XLA's defaults)
    and ``SERIAL_CODEGEN`` when ``size`` (the number of values the program handles) is at most
    ``QUICK_COMPILE_MAX_SIZE``; with LLVM's optimisations too if the program, run about ``runs``
    times, is bound by its running (``_compile``).

    The program is traced where it is first called and lowered with the data staged: under
    ``data_evaluated_eagerly`` the lowering rules (the PRNG's) would otherwise run and compile
    their constant parts op by op.

    >>> double = jit_quick(lambda x: 2 * x)
    >>> double(jnp.arange(3.0))
    Array([0., 2., 4.], dtype=float32)
    """
    jitted = jax.jit(fn)
    compiled = {}

    @functools.wraps(fn)
    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return jitted(*args)  # inside a transformation: an ordinary jit
        key = _program_key(tree, leaves)
        if key not in compiled:
            compiled[key] = _compile(jitted.trace(*args), options, size, runs)
        return compiled[key](*args)

    return call


def has_array_bounds(constraint) -> bool:
    """Whether a constraint has array (or traced) bounds, which can move with the model's values."""
    base = getattr(constraint, "base_constraint", None)
    if base is not None:
        return has_array_bounds(base)
    return any(np.ndim(v) > 0 or isinstance(v, jax.Array) for v in vars(constraint).values()
               if isinstance(v, (np.ndarray, jax.Array, float, int)))


def _constant_support(constraint):
    """The constraint, if it cannot move with the model's values (no array or traced bounds), else None."""
    try:
        return None if has_array_bounds(constraint) else constraint
    except TypeError:  # a constraint without instance attributes to look at
        return None


def unwrap_distribution(fn):
    """The innermost distribution under Independent/Expanded/Masked wrappers."""
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def support_name(constraint) -> str:
    """A short name for a constraint: ``real``, ``positive``, ``interval(0, 2)``..."""
    if isinstance(constraint, constraints.independent):
        base = support_name(constraint.base_constraint)
        return f"{base}_vector" if base == "real" else f"{base}^{constraint.reinterpreted_batch_ndims}"
    name = type(constraint).__name__.lstrip("_")
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    bounds = [getattr(constraint, b) for b in ("lower_bound", "upper_bound") if hasattr(constraint, b)]
    if isinstance(constraint, (constraints.interval, constraints.greater_than)) and name not in (
        "positive", "unit_interval", "nonnegative"
    ):
        return f"{name}({', '.join(_fmt_bound(b) for b in bounds)})"
    return name


def _fmt_bound(b) -> str:
    try:
        return f"{float(b):g}"
    except (TypeError, ValueError):
        return "array"


class _SiteRecorder(Messenger):
    """Records static facts about every site (shapes, plates, distributions) in order."""

    def __init__(self, fn=None):
        super().__init__(fn)
        self.records: list[dict] = []
        self.plate_sizes: dict[str, tuple[int, int]] = {}
        self.subsamples: dict[str, jax.Array] = {}  # subsampled plates' indices, where concrete
        self.plates_seen: dict[str, int] = {}  # plate messages per name (a name can be used twice)
        self.scan_sites: list[str] = []
        self.last_site: str | None = None
        self.unchecked_observed: list[str] = []  # traced values: checked by an eager run

    def process_message(self, msg):
        if msg["type"] in ("sample", "deterministic", "param"):
            self.last_site = msg["name"]

    def postprocess_message(self, msg):
        kind = msg["type"]
        if kind == "plate":
            name, (size, subsample_size) = msg["name"], msg["args"][:2]
            self.plate_sizes[name] = (int(size), int(subsample_size or size))
            self.plates_seen[name] = self.plates_seen.get(name, 0) + 1
            if self.plates_seen[name] > 1:  # which indices belong to which use is not recorded
                self.subsamples.pop(name, None)
            elif subsample_size not in (None, size) and not isinstance(msg["value"], jax.core.Tracer):
                self.subsamples[name] = msg["value"]  # a JAX array: NumPyro's plate asserts one
            return
        if kind == "control_flow":
            inner = msg["value"][1][0].trace
            self.scan_sites += [n for n, s in inner.items() if s["type"] in ("sample", "deterministic")]
            return
        if kind not in ("sample", "deterministic", "param"):
            return
        if kind == "sample" and msg["is_observed"]:
            _check_observed_value(msg["name"], msg["value"])
        record = {"name": msg["name"], "shape": tuple(jnp.shape(msg["value"]))}
        if kind == "sample":
            fn = msg["fn"]
            base = unwrap_distribution(fn)
            if msg["is_observed"]:
                kind = "observed"
                _check_observed_shape(msg["name"], fn, record["shape"])
                if not _check_observed_support(msg["name"], fn, msg["value"]):
                    self.unchecked_observed.append(msg["name"])
            else:
                kind = "latent"
            record.update(
                distribution=type(base).__name__,
                batch_shape=tuple(fn.batch_shape),
                event_shape=tuple(fn.event_shape),
                support=support_name(fn.support),
                is_discrete=bool(fn.support.is_discrete),
                params=tuple(base.arg_constraints),
                constraint=_constant_support(fn.support) if kind == "latent" else None,
                plates=tuple(
                    (f.name, int(f.size), int(f.dim)) for f in msg["cond_indep_stack"]
                ),
            )
        elif kind == "param":
            constraint = msg["kwargs"].get("constraint", constraints.real)
            record.update(support=support_name(constraint))
        record["type"] = kind
        self.records.append(record)


def _check_observed_value(name, value):
    ok = isinstance(value, (jax.Array, np.ndarray, np.generic, int, float, bool)) and \
        np.dtype(getattr(value, "dtype", np.asarray(value).dtype)).kind in "biuf"
    if not ok:
        raise ModelError(f"observed site '{name}': its value is a {type(value).__name__}"
                         f"{' of dtype ' + str(value.dtype) if hasattr(value, 'dtype') else ''}; "
                         "expected a numeric array")


def _observed_mask(fn):
    """Where the observations count (False under handlers.mask, obs_mask or fn.mask), or True.

    Returned aligned with the elements of the innermost distribution's batch shape: a mask of
    a wrapper outside ``to_event`` gets a trailing axis for every dimension it reinterpreted.
    """
    layers = []
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        layers.append(fn)
        fn = fn.base_dist
    mask, inner_event_dims = True, 0
    for layer in reversed(layers):  # innermost first
        if isinstance(layer, dist.Independent):
            inner_event_dims += layer.reinterpreted_batch_ndims
        elif isinstance(layer, dist.MaskedDistribution) and layer._mask is not True:
            m = np.asarray(layer._mask, dtype=bool)
            m = m.reshape(m.shape + (1,) * inner_event_dims)
            mask = m if mask is True else mask & m
    return mask


def _where(flags) -> str:
    first = np.unravel_index(int(np.flatnonzero(flags)[0]), flags.shape)
    return f"index {first[0]}" if len(first) == 1 else f"index {tuple(int(i) for i in first)}"


def _support_at(support, shape, index) -> str:
    """The support's name, with array bounds (a Binomial's total_count) read at ``index``."""
    bounds = [getattr(support, b) for b in ("lower_bound", "upper_bound") if hasattr(support, b)]
    if not isinstance(support, constraints.integer_interval) or len(bounds) != 2:
        return support_name(support)
    try:
        low, high = (np.broadcast_to(np.asarray(b), shape)[index] for b in bounds)
    except ValueError:
        return support_name(support)
    return f"integers from {low:g} to {high:g}"


def _check_observed_support(name, fn, value) -> bool:
    """Raise ModelError for observed values NumPyro would score as nonsense (NaN, inf, 2.5 for a
    Poisson, -1 for a Binomial, 2 for a Bernoulli); masked-out values are not looked at.

    Returns False, without checking, when the value or the distribution is traced.
    """
    base = unwrap_distribution(fn)
    try:
        with jax.ensure_compile_time_eval():
            ok = base.support(value)
            mask = _observed_mask(fn)
    except jax.errors.TracerArrayConversionError:
        return False
    except (NotImplementedError, TypeError, ValueError):  # a dependent support (Delta): nothing to check
        return True
    if isinstance(ok, jax.core.Tracer) or isinstance(value, jax.core.Tracer):
        return False
    value, ok = np.asarray(value), np.asarray(ok)
    event = base.support.event_dim  # ok has one flag per event of the base distribution
    try:
        ok, counted = np.broadcast_arrays(ok, True if mask is True else mask)
    except ValueError:  # a mask that does not line up with the values: leave it to NumPyro
        return True
    if value.dtype.kind == "f":
        for what, flags in (("NaN", np.isnan(value)), ("infinite", np.isinf(value))):
            if event:  # an event with a NaN in it is one bad observation
                flags = flags.reshape(flags.shape[:flags.ndim - event] + (-1,)).any(-1)
            try:
                flags, kept = np.broadcast_arrays(flags, counted)
            except ValueError:
                return True
            flags = flags & kept
            if flags.any():
                n = int(flags.sum())
                raise ModelError(
                    f"observed site '{name}' has {n} {what} value{'s' if n != 1 else ''} (first at "
                    f"{_where(flags)}); drop them, or mask them (obs_mask= or numpyro.handlers.mask)"
                )
    bad = ~ok & counted
    if bad.any():
        n = int(bad.sum())
        first = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
        try:
            example = np.broadcast_to(value, bad.shape + value.shape[value.ndim - event:])[first]
            example = np.asarray(example)
            shown = (repr(example.item()) if example.ndim == 0
                     else np.array2string(example, threshold=6, precision=6)) + " "
        except ValueError:
            shown = ""
        raise ModelError(
            f"observed site '{name}' has {n} value{'s' if n != 1 else ''} outside the support of "
            f"{type(base).__name__} ({_support_at(base.support, bad.shape, first)}), the first "
            f"{shown}at {_where(bad)}"
        )
    return True


def check_observed_sites(trace: dict) -> None:
    """The checks of every observed site's data (numeric, shape, support: NaN, inf, counts) on a NumPyro
    trace, for entry points that run the model without tracing it here first (``AutoHybrid``)."""
    for name, site in trace.items():
        if site["type"] == "sample" and site["is_observed"]:
            _check_observed_value(name, site["value"])
            _check_observed_shape(name, site["fn"], tuple(jnp.shape(site["value"])))
            _check_observed_support(name, site["fn"], site["value"])


def _check_observed_shape(name, fn, value_shape):
    dist_shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
    try:
        np.broadcast_shapes(dist_shape, value_shape)
    except ValueError:
        raise ModelError(
            f"observed site '{name}': its value has shape {value_shape} but its "
            f"distribution has shape {dist_shape}; they must broadcast"
        ) from None


def check_model_inputs(args: tuple, kwargs: dict) -> None:
    """Raise InputError for model inputs that are not arrays, numbers, strings or None."""
    allowed = (np.ndarray, jax.Array, np.generic, int, float, complex, bool, str, type(None))

    def check(value, where):
        if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind not in "biufcUS":
            raise InputError(f"model input {where} is a numpy array of dtype {value.dtype}; expected a "
                             "numeric array (convert it, e.g. np.asarray(x, dtype=float) or an integer code)")
        if isinstance(value, allowed):
            return
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                check(v, f"{where}[{i}]")
            return
        if isinstance(value, dict):
            for k, v in value.items():
                check(v, f"{where}[{k!r}]")
            return
        raise InputError(
            f"model input {where} is a {type(value).__module__}.{type(value).__qualname__}; "
            "expected arrays (numpy or jax), numbers, strings, None, or lists/tuples/dicts of those"
        )

    for i, a in enumerate(args):
        check(a, f"args[{i}]")
    for k, v in kwargs.items():
        check(v, f"{k}=")


def describe_exception(exc: BaseException) -> str:
    """The first line of an exception message, prefixed with its type."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class ModelTrace:
    """The sites of a model run on example inputs, and a way to re-run it at chosen values."""

    model: Callable
    args: tuple
    kwargs: dict
    sites: dict[str, Site]
    shape_only: bool
    notes: list[str] = field(default_factory=list)
    # Latent site -> its support, where that has no array bounds (so cannot move with the values).
    supports: dict[str, Any] = field(default_factory=dict)
    # Subsampled plate -> its indices in the recording run (seed 0), where they were concrete there
    # (an eager run) and the plate's name is used once.
    subsamples: dict[str, jax.Array] = field(default_factory=dict)

    def seeded(self, rng_seed=0) -> Callable:
        """The model seeded with ``rng_seed``, and its subsampled plates given ``subsamples``.

        A model that indexes numpy data by a plate's subsample (``x[idx]``) cannot be traced with
        the indices traced; given as constants, every later run traces (compiled once, not op by
        op). The seed handler is innermost, so it still draws a key for each plate and every
        other draw keeps its key. Every seed gets seed 0's indices.
        """
        model = handlers.seed(self.model, rng_seed)
        return _GivenSubsamples(model, self.subsamples) if self.subsamples else model

    @property
    def latent_names(self) -> list[str]:
        """Continuous latent sample sites, in program order."""
        return [n for n, s in self.sites.items() if s.type == "latent" and not s.is_discrete]

    @property
    def observed_names(self) -> list[str]:
        return [n for n, s in self.sites.items() if s.type == "observed"]

    def run(self, values: dict[str, Any], rng_seed: int = 0):
        """Run the model with latent sites set to ``values``; returns the NumPyro trace.

        The seed is fixed so that plate subsamples and unset sites are the same on every run.
        """
        model = handlers.substitute(self.seeded(rng_seed), data=values)
        return handlers.trace(model).get_trace(*self.args, **self.kwargs)

    def point(self, rng_seed: int) -> dict[str, jax.Array]:
        """Values of all latent sample sites, uniform in (-2, 2) of the unconstrained space."""
        if self._fixed_bijections is not None:
            # Drawn in numpy and mapped by one small program: NumPyro's init_to_uniform draws inside the
            # model, whose PRNG and forward pass made this the costliest compile of a cold analysis.
            return self._uniform_point(np.random.default_rng(rng_seed))
        @staged_if_possible
        def draw(seed):
            # One compiled program (the seed is an argument, so nothing is folded at compile time)
            # rather than one compiled operation per sampling step.
            model = handlers.substitute(self.seeded(seed), substitute_fn=init_to_uniform(radius=2))
            tr = _run_guarded(lambda: handlers.trace(model).get_trace(*self.args, **self.kwargs))
            return {
                n: s["value"]
                for n, s in tr.items()
                if s["type"] == "sample" and not s["is_observed"]
            }

        jitted = self.__dict__.get("_draw")
        if jitted is None:
            jitted = self.__dict__["_draw"] = jit_quick(draw, sum(s.size for s in self.sites.values()))
        try:
            return jitted(np.int32(rng_seed))
        except _TRACER_ERRORS:  # the model needs a seeded value in Python (a plate's subsample as an int)
            return draw(rng_seed)

    @functools.cached_property
    def _fixed_bijections(self) -> dict[str, Any] | None:
        """Every latent site's bijection onto its support, if every latent site is continuous and its
        support cannot move with the values; else None (the model then draws the point itself)."""
        if any(s.type == "latent" and (s.is_discrete or n not in self.supports) for n, s in self.sites.items()):
            return None
        # trace_model's own run (init_to_uniform) already mapped every latent site through its bijection
        return {n: dist.biject_to(self.supports[n]) for n in self.latent_names}

    def unconstrained_shapes(self, names) -> dict[str, tuple] | None:
        """The shapes of the latent sites' unconstrained values (an LKJCholesky's are smaller than its
        matrix), or None when a support can move with the model's values."""
        transforms = self._fixed_bijections
        if transforms is None:
            return None
        return {n: tuple(transforms[n].inverse_shape(self.sites[n].shape)) for n in names}

    def _uniform_point(self, rng: np.random.Generator) -> dict[str, jax.Array]:
        dtype = jnp.result_type(float)
        u = {n: rng.uniform(-2.0, 2.0, shape).astype(dtype)
             for n, shape in self.unconstrained_shapes(self.latent_names).items()}
        return self._to_support(u)

    @functools.cached_property
    def _to_support(self) -> Callable:
        transforms = self._fixed_bijections
        return jit_quick(lambda u: {n: t(u[n]) for n, t in transforms.items()})

    def supports_at(self, names, values: dict[str, Any]) -> dict[str, Any]:
        """The supports of latent sites at ``values``: from the first trace where they cannot move
        with the values, else from one run of the model at ``values``."""
        found = {n: self.supports[n] for n in names if n in self.supports}
        missing = [n for n in names if n not in found]
        if missing:
            tr = self.run(values)
            found.update({n: tr[n]["fn"].support for n in missing})
        return {n: found[n] for n in names}

    def run_with_init(self, key: str, strategies: tuple, read: Callable, rng_seed: int = 0):
        """``read(traces)``: one trace of the model per NumPyro init strategy (``init_to_median``...),
        run and read by one compiled program (compiled once per ``key``).

        ``read`` returns arrays. Compiled with the quick options (``jit_draws``): the draws can differ
        from an op-by-op run in the last bit where the legacy emitters round a transcendental
        differently (tan for a Cauchy, log1p, tanh, atan, rsqrt). Falls back to running op by op when
        the model needs a seeded value in Python.
        """
        @staged_if_possible
        def program(seed):
            traces = []
            for strategy in strategies:
                model = handlers.substitute(self.seeded(seed), substitute_fn=strategy)
                traces.append(_run_guarded(lambda: handlers.trace(model).get_trace(*self.args, **self.kwargs)))
            return read(traces)

        cache = self.__dict__.setdefault("_programs", {})
        if key not in cache:
            cache[key] = jit_draws(program, sum(s.size for s in self.sites.values()))
        try:
            return cache[key](np.int32(rng_seed))
        except _TRACER_ERRORS:
            return program(rng_seed)

    def distribution_parameters(self, values: dict[str, Any], sites: tuple[str, ...]) -> dict[str, dict]:
        """The parameters of the innermost distribution of each of ``sites`` with the latent sites set
        to ``values`` ({site: {param: numpy array}}), by one compiled program per set of sites."""
        sites = tuple(sites)

        @staged_if_possible
        def program(values):
            tr = self.run(values)
            out = {}
            for name in sites:
                base = unwrap_distribution(tr[name]["fn"])
                out[name] = {p: jnp.asarray(getattr(base, p)) for p in base.arg_constraints if hasattr(base, p)}
            return out

        cache = self.__dict__.setdefault("_programs", {})
        key = ("distribution_parameters", sites)
        if key not in cache:
            cache[key] = jit_quick(program, sum(s.size for s in self.sites.values()))
        try:
            out = cache[key](values)
        except _TRACER_ERRORS:  # the model needs a concrete value in Python (a numpy index): op by op
            out = program(values)
        return jax.tree.map(np.asarray, out)


_LIBRARY_MODULES = ("jax", "jaxlib", "numpyro", "numpy", "autoreparam", "contextlib", "functools")


def _user_line(exc: BaseException) -> str | None:
    """``file.py:12 (n = int(mu))`` for the innermost traceback frame outside the libraries."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.split(".")[0] not in _LIBRARY_MODULES:
            found = tb
        tb = tb.tb_next
    if found is None:
        return None
    code = found.tb_frame.f_code
    line = linecache.getline(code.co_filename, found.tb_lineno).strip()
    where = f"{os.path.basename(code.co_filename)}:{found.tb_lineno}"
    return f"{where} `{line}`" if line else where


def site_of_exception(exc: BaseException, recorder=None) -> str:
    """" at site 'x'" when the error came from inside a numpyro.sample/deterministic/param call."""
    tb, name = exc.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in ("sample", "deterministic", "param") and \
                frame.f_globals.get("__name__") == "numpyro.primitives":
            name = frame.f_locals.get("name")
        tb = tb.tb_next
    if isinstance(name, str):
        return f" at site '{name}'"
    if recorder is not None and recorder.last_site:
        return f" (at or after site '{recorder.last_site}')"
    return ""


def untraceable_error(exc: BaseException, recorder=None) -> ModelError:
    """One line for a JAX tracer error: the model needs a concrete value of a latent site."""
    line = _user_line(exc)
    where = (f" at {line}" if line else "") + site_of_exception(exc, recorder)
    return ModelError(
        "the model uses the value of a latent site in Python control flow or a conversion "
        f"(if/while, int(), float(), np.asarray){where}, which cannot be traced; write it with "
        f"jnp.where or lax.cond ({type(exc).__name__})"
    )


@contextmanager
def untraceable_as_model_error():
    """Turn a JAX tracer error raised by the model under jit/grad into one ModelError line."""
    try:
        yield
    except _TRACER_ERRORS as exc:
        raise untraceable_error(exc) from None


def _run_guarded(fn, recorder: _SiteRecorder | None = None):
    try:
        return fn()
    except ModelError:
        raise
    except _TRACER_ERRORS:
        raise
    except Exception as exc:  # the user's model raised: say so in one line
        where = site_of_exception(exc, recorder)
        raise ModelError(
            f"the model raised {describe_exception(exc)}{where} when run on the example inputs"
        ) from exc


def trace_model(model: Callable, args: tuple = (), kwargs: dict | None = None) -> ModelTrace:
    """Trace ``model(*args, **kwargs)`` and return its sites in program order.

    >>> def model(y):
    ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
    ...     with numpyro.plate("n", 3):
    ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
    >>> [(s.name, s.type, s.shape) for s in trace_model(model, (jnp.zeros(3),)).sites.values()]
    [('mu', 'latent', ()), ('y', 'observed', (3,))]
    """
    if not callable(model):
        raise InputError(f"model must be a callable NumPyro model, got {type(model).__name__}")
    kwargs = dict(kwargs or {})
    check_model_inputs(tuple(args), kwargs)

    def run():
        recorder = _SiteRecorder()
        seeded = handlers.substitute(handlers.seed(model, 0), substitute_fn=init_to_uniform(radius=2))
        with recorder:
            _run_guarded(lambda: seeded(*args, **kwargs), recorder)
        return recorder

    shape_only = True
    box = {}

    def shape_run():
        box["recorder"] = run()
        return 0

    try:
        try:
            with data_staged():
                jax.eval_shape(shape_run)
        except _TRACER_ERRORS:
            # Python code on the data values (``int(idx.max())``): evaluate the data eagerly if
            # the caller asked for it (``data_evaluated_eagerly``), else the eager run below.
            from jax._src.config import eager_constant_folding

            if not eager_constant_folding.value:
                raise
            jax.eval_shape(shape_run)
    except _TRACER_ERRORS:
        # The model's Python code looks at data values (e.g. ``int(idx.max())``): run it eagerly.
        shape_only = False
        try:
            box["recorder"] = run()
        except _TRACER_ERRORS as exc:
            raise ModelError(f"the model cannot be run on the example inputs: {describe_exception(exc)}") from exc
    if box["recorder"].unchecked_observed:
        # The shape-only run traced some observed values (computed from the inputs inside the
        # model): one eager run checks them against their support.
        box["recorder"] = run()
    recorder = box["recorder"]

    if recorder.scan_sites:
        names = ", ".join(f"'{n}'" for n in recorder.scan_sites)
        raise ModelError(
            f"site {names} is sampled inside numpyro.contrib.control_flow.scan, which autoreparam "
            "cannot analyse; write the loop with plates or a vectorised distribution "
            "(e.g. dist.GaussianRandomWalk)"
        )

    sites: dict[str, Site] = {}
    for order, rec in enumerate(recorder.records):
        plates = tuple(
            Plate(name, *recorder.plate_sizes.get(name, (size, size))[:1], dim,
                  recorder.plate_sizes.get(name, (size, size))[1])
            for name, size, dim in sorted(rec.get("plates", ()), key=lambda p: p[2])
        )
        sites[rec["name"]] = Site(
            name=rec["name"],
            type=rec["type"],
            order=order,
            shape=rec["shape"],
            distribution=rec.get("distribution"),
            batch_shape=rec.get("batch_shape", ()),
            event_shape=rec.get("event_shape", ()),
            support=rec.get("support"),
            is_discrete=rec.get("is_discrete", False),
            plates=plates,
            params=rec.get("params", ()),
        )
    supports = {rec["name"]: rec["constraint"] for rec in recorder.records if rec.get("constraint") is not None}
    mt = ModelTrace(model, tuple(args), kwargs, sites, shape_only, supports=supports, subsamples=recorder.subsamples)
    if not mt.observed_names:
        # A prior (Neal's funnel with no data) still has funnels to non-centre.
        mt.notes.append(Note(NO_OBSERVED_SITE_NOTE, NoteKind.NO_OBSERVED_SITE))
    for name, site in sites.items():
        if site.type == "latent" and site.is_discrete:
            mt.notes.append(Note(
                f"site '{name}' is discrete ({site.distribution}, support {site.support}); "
                "it is held fixed and left out of the analysis", NoteKind.DISCRETE_SITE, name
            ))
    return mt


class _GivenSubsamples(Messenger):
    """Gives subsampled plates the recorded indices (``ModelTrace.subsamples``), where the
    subsample size matches; sample sites of the same name are left alone."""

    def __init__(self, fn, subsamples: dict):
        super().__init__(fn)
        self.subsamples = subsamples

    def process_message(self, msg):
        given = self.subsamples.get(msg.get("name"))
        if msg["type"] == "plate" and given is not None and msg["value"] is None \
                and msg["args"][1] == np.shape(given)[0]:
            msg["value"] = given


class _KeepComputedDeterministic(Messenger):
    """Innermost handler: keeps a deterministic site's computed value before substitution."""

    def __init__(self, fn=None):
        super().__init__(fn)
        self.computed: dict[str, Any] = {}

    def process_message(self, msg):
        if msg["type"] == "deterministic":
            self.computed[msg["name"]] = msg["value"]


def site_dependencies(mt: ModelTrace, values: dict[str, Any]) -> dict[str, set[str]] | None:
    """Direct parents of every sample and deterministic site, by exact provenance tracking.

    Deterministic and param sites are inputs of their own, so a site that reads a
    deterministic predictor depends on it rather than on the latents behind it. Returns None
    when the model cannot be traced abstractly (then callers fall back to JVP probes).
    """
    def input_values(values):
        tr = mt.run(values)
        return {
            n: jnp.asarray(s["value"])
            for n, s in tr.items()
            if s["type"] in ("deterministic", "param") or (s["type"] == "sample" and not s["is_observed"])
        }

    @staged_if_possible
    def outputs(**inp):
        keep = _KeepComputedDeterministic()
        # The seed inside the given subsamples, as in ModelTrace.seeded: it still draws a key for each
        # plate, so every other draw keeps the key it had in the recording run.
        with handlers.trace() as tr2, _GivenSubsamples(None, mt.subsamples), handlers.seed(rng_seed=0), \
                handlers.substitute(data=inp), keep:
            mt.model(*mt.args, **mt.kwargs)
        out = {}
        for name, site in tr2.items():
            if site["type"] == "sample":
                base = unwrap_distribution(site["fn"])
                out[name] = [jnp.asarray(getattr(base, p)) for p in base.arg_constraints
                             if hasattr(base, p)]
            elif site["type"] == "deterministic":
                out[name] = jnp.asarray(keep.computed[name])
        return out

    try:
        # Only their shapes are needed; the values are arguments, not constants, so that nothing
        # (NumPyro's argument validation) runs op by op.
        inputs = jax.eval_shape(staged_if_possible(input_values), values)
        prov = eval_provenance(outputs, **inputs)
    except Exception:  # noqa: BLE001 - abstract tracing is best effort; JVP probes are the fallback
        return None
    deps = {}
    for name, p in prov.items():
        found = set().union(*jax.tree.leaves(p, is_leaf=lambda x: isinstance(x, frozenset))) if p else set()
        deps[name] = {d for d in found if d != name}
    return deps


@dataclass(frozen=True)
class TracedSite:
    """What a plan is checked against: one site of the model, as traced on the call's inputs."""

    kind: str  # "latent", "observed", "deterministic", "param" or "plate"
    order: int
    shape: tuple[int, ...] = ()
    batch_shape: tuple[int, ...] = ()  # every dim of the value left of the event dims (sample_shape too)
    family: str = ""
    real: bool = False
    discrete: bool = False

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def trace_sites(model: Callable, args: tuple, kwargs: dict) -> dict[str, TracedSite]:
    """Every named site of one run of ``model`` (latent values set inside their support).

    Unlike the analysis this needs no observed site: a plan is checked against sampled sites.
    """

    def run():
        seeded = handlers.substitute(handlers.seed(model, 0), substitute_fn=init_to_uniform(radius=2))
        tr = handlers.trace(seeded).get_trace(*args, **kwargs)
        out = {}
        for order, (name, msg) in enumerate(tr.items()):
            kind, shape = msg["type"], tuple(jnp.shape(msg["value"])) if msg["type"] != "plate" else ()
            if kind != "sample":
                out[name] = TracedSite(kind, order, shape)
                continue
            fn = msg["fn"]
            support = fn.support.base_constraint if isinstance(fn.support, constraints.independent) else fn.support
            out[name] = TracedSite("observed" if msg["is_observed"] else "latent", order, shape,
                                   shape[:len(shape) - len(fn.event_shape)], type(unwrap_distribution(fn)).__name__,
                                   support is constraints.real, bool(fn.support.is_discrete))
        return out

    box = []
    with isolated_from_handlers():
        try:
            jax.eval_shape(lambda: box.append(run()) or 0)
        except Exception:  # the model looks at data values (int(x.max()), ...): run it eagerly
            try:
                box[:] = [run()]
            except AutoreparamError:
                raise
            except Exception as exc:
                raise ModelError(f"the model raised {describe_exception(exc)}{site_of_exception(exc)} "
                                 "when run on these inputs") from exc
    return box[-1]


# -- running the model again (with ModelTrace's methods, the curvature and the guard run it only through this)
def log_joint(mt: ModelTrace, values: dict[str, Any], handler: Messenger | None = None,
              fixed: dict[str, Any] | None = None):
    """The model's log joint density at ``values``, seeded as every other run (seed 0).

    ``fixed`` site values are substituted first; ``handler`` (a NumPyro handler made without a
    function, such as a change of variables) then wraps the model. The inputs are closed over:
    staged with the latent values, or evaluated eagerly under jit when the model computes sizes
    or numpy indices from its data (``staged_if_possible``).
    """

    def run():
        # Seeded here, inside: when the model needs concrete values in Python (its data's, or a
        # plate's subsample not recorded in ModelTrace.subsamples), the fallback evaluates the key
        # eagerly too.
        model = mt.seeded(0)
        if fixed is not None:
            model = handlers.substitute(model, data=fixed)
        if handler is not None:
            # Set, not handler(model): a Messenger takes its function only once, and the eager
            # fallback runs this again with the same handler.
            handler.fn = model
            model = handler
        return log_density(model, mt.args, mt.kwargs, values)[0]

    return staged_if_possible(run)()

