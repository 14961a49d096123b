"""The random bits of a program of prior draws, computed in numpy instead of compiled.

A cold analysis draws the prior medians by one compiled program (``trace.jit_draws``). The part
of it that hashes the seed into random bits (JAX's threefry) costs 50-70 ms to lower and
compile, more than a small model's whole MAP point, and it runs once or twice. Here those
equations are evaluated in numpy: the key-level primitives (``random_seed``, ``random_split``,
``random_fold_in``, ``random_bits``) through the PRNG implementation's own functions, traced to
jaxprs of integer operations (so JAX's choices, such as ``jax_threefry_partitionable``, are
followed, not copied), and those integer operations and the ``threefry2x32`` hash by numpy's
unsigned arithmetic, which wraps as XLA's does. The bits are the same (tests/test_host_prng.py).

Only exact integer work is evaluated: anything else (floating point, another PRNG implementation,
a primitive not listed here) raises ``HostUnsupported`` and the caller compiles the program as it is.

>>> import jax, numpy as np
>>> closed = jax.make_jaxpr(lambda seed: jax.random.bits(jax.random.PRNGKey(seed), (3,)))(np.int32(0))
>>> bits = evaluate_jaxpr(closed, np.int32(0))[0]
>>> bool(np.all(bits == np.asarray(jax.random.bits(jax.random.PRNGKey(0), (3,)))))
True
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.extend.core import Literal

__all__ = ["HostUnsupported", "evaluate", "evaluate_jaxpr", "evaluator", "is_key", "to_device"]

THREEFRY = "threefry2x32"
MAX_KEYS = 256  # key batches up to this size are hashed one key at a time here
# Hashes per primitive up to this many: numpy's threefry takes 70 ms for a million, about what compiling
# the hashes costs; beyond that the compiled program is cheaper.
MAX_VALUES = 1_000_000
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


class HostUnsupported(Exception):
    """An equation that this evaluator does not compute exactly as XLA would."""


def is_key(aval) -> bool:
    """Whether an abstract value is an array of typed PRNG keys."""
    return jax.dtypes.issubdtype(getattr(aval, "dtype", None), jax.dtypes.prng_key)


def _impl(aval):
    impl = aval.dtype._impl
    if impl.name != THREEFRY:
        raise HostUnsupported(f"PRNG implementation {impl.name}")
    return impl


def to_device(value, aval):
    """A value computed here as JAX takes it: typed keys wrapped from their data."""
    if is_key(aval):
        return jax.random.wrap_key_data(value, impl=_impl(aval).name)
    return value


def _to_host(value, aval):
    """A value as this evaluator holds it: typed keys as their data, else in the dtype the jaxpr says
    (a Python int or an int64 seed where the jaxpr has int32: shifts then differ)."""
    if is_key(aval):
        return np.asarray(jax.random.key_data(value) if isinstance(value, jax.Array) else value)
    return np.asarray(value, dtype=aval.dtype)


def _bind(jaxpr, consts, args) -> dict:
    return {**{v: _to_host(c, v.aval) for v, c in zip(jaxpr.constvars, consts)},
            **{v: _to_host(a, v.aval) for v, a in zip(jaxpr.invars, args)}}


def evaluate_jaxpr(closed, *args) -> list:
    """The outputs of a closed jaxpr on ``args``, in numpy (typed keys as their raw data)."""
    jaxpr = closed.jaxpr
    env = _bind(jaxpr, closed.consts, args)
    evaluate(jaxpr.eqns, env)
    return [_read(v, env) for v in jaxpr.outvars]


def evaluator(closed, eqns, outvars) -> Callable:
    """A function of ``closed``'s arguments that evaluates ``eqns`` (some of its equations, in order)
    here and returns the values of ``outvars`` as JAX takes them (typed keys wrapped)."""
    jaxpr = closed.jaxpr
    read = {v for eqn in eqns for v in eqn.invars if not isinstance(v, Literal)}
    consts = {v: _to_host(c, v.aval) for v, c in zip(jaxpr.constvars, closed.consts) if v in read}

    def run(*args):  # only what the equations read goes to numpy (not the model's data)
        env = {**consts, **{v: _to_host(a, v.aval) for v, a in zip(jaxpr.invars, args) if v in read}}
        evaluate(eqns, env)
        return [to_device(env[v], v.aval) for v in outvars]

    return run


def evaluate(eqns, env: dict) -> None:
    """Evaluate ``eqns`` in order, reading and writing numpy values in ``env`` (a typed key array as
    its raw data: the key's own dimensions last)."""
    with np.errstate(over="ignore"):
        for eqn in eqns:
            args = [_read(v, env) for v in eqn.invars]
            outs = _apply(eqn, args)
            for var, value in zip(eqn.outvars, outs):
                env[var] = value


def _read(var, env):
    if isinstance(var, Literal):
        return np.asarray(var.val, dtype=var.aval.dtype)
    return env[var]


def _apply(eqn, args) -> list:
    name = eqn.primitive.name
    params = eqn.params
    if name in _KEY_PRIMITIVES:
        return _KEY_PRIMITIVES[name](eqn, args)
    if name in ("jit", "pjit", "closed_call"):
        inner = params.get("jaxpr", params.get("call_jaxpr"))
        return evaluate_jaxpr(inner, *args)
    if any(is_key(v.aval) for v in (*eqn.invars, *eqn.outvars)):
        trailing = len(_impl(next(v.aval for v in (*eqn.invars, *eqn.outvars) if is_key(v.aval))).key_shape)
        if name not in _STRUCTURAL:
            raise HostUnsupported(f"{name} on PRNG keys")
        return [_STRUCTURAL[name](args, params, trailing)]
    for var in (*eqn.invars, *eqn.outvars):  # integers and booleans only: XLA flushes float denormals
        dtype = np.dtype(var.aval.dtype)
        if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
            raise HostUnsupported(f"{name} on {dtype}")
    if name in _STRUCTURAL:
        return [_STRUCTURAL[name](args, params, 0)]
    if name in _MULTIPLE:
        return list(_MULTIPLE[name](args, params))
    if name not in _ELEMENTWISE:
        raise HostUnsupported(name)
    return [np.asarray(_ELEMENTWISE[name](args, params), dtype=eqn.outvars[0].aval.dtype)]


# -- integer operations, as XLA defines them -------------------------------------------------------------
def _unsigned(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"uint{8 * x.dtype.itemsize}")) if np.issubdtype(x.dtype, np.signedinteger) else x


def _shift(args, kind):
    x, s = (np.asarray(a) for a in args)
    bits = 8 * x.dtype.itemsize
    s_u = _unsigned(s).astype(np.uint64)
    big = s_u >= bits
    amount = np.where(big, 0, s_u).astype(_unsigned(x).dtype)
    if kind == "left":
        out = np.where(big, 0, _unsigned(x) << amount).astype(_unsigned(x).dtype)
        return out.view(x.dtype) if out.dtype != x.dtype else out
    if kind == "logical":
        out = np.where(big, 0, _unsigned(x) >> amount).astype(_unsigned(x).dtype)
        return out.view(x.dtype) if out.dtype != x.dtype else out
    signed = x.view(np.dtype(f"int{8 * x.dtype.itemsize}"))  # the top bit fills, unsigned types too
    out = np.where(big, np.where(signed < 0, -1, 0), signed >> amount.astype(signed.dtype)).astype(signed.dtype)
    return out.view(x.dtype)


def _convert(args, params):
    (x,), new = args, np.dtype(params["new_dtype"])
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise HostUnsupported(f"convert_element_type from {x.dtype}")
    return x.astype(new)  # integers wrap modulo 2^bits, as XLA's conversions do


def _select_n(args, params):
    which, *cases = args
    return np.choose(np.asarray(which, np.int64), np.broadcast_arrays(*cases))


def _iota(args, params):
    shape, dimension = tuple(params["shape"]), params["dimension"]
    line = np.arange(shape[dimension], dtype=np.dtype(params["dtype"]))
    return np.broadcast_to(line.reshape([-1 if i == dimension else 1 for i in range(len(shape))]), shape)


_ELEMENTWISE: dict[str, Callable] = {
    "add": lambda a, p: a[0] + a[1],
    "sub": lambda a, p: a[0] - a[1],
    "mul": lambda a, p: a[0] * a[1],
    "and": lambda a, p: a[0] & a[1],
    "or": lambda a, p: a[0] | a[1],
    "xor": lambda a, p: a[0] ^ a[1],
    "not": lambda a, p: ~a[0],
    "max": lambda a, p: np.maximum(a[0], a[1]),
    "min": lambda a, p: np.minimum(a[0], a[1]),
    "eq": lambda a, p: a[0] == a[1],
    "ne": lambda a, p: a[0] != a[1],
    "lt": lambda a, p: a[0] < a[1],
    "le": lambda a, p: a[0] <= a[1],
    "gt": lambda a, p: a[0] > a[1],
    "ge": lambda a, p: a[0] >= a[1],
    "shift_left": lambda a, p: _shift(a, "left"),
    "shift_right_logical": lambda a, p: _shift(a, "logical"),
    "shift_right_arithmetic": lambda a, p: _shift(a, "arithmetic"),
    "convert_element_type": _convert,
    "select_n": _select_n,
    "iota": _iota,
}


# -- data movement; ``trailing`` is the number of a key's own dimensions, kept last ----------------------
def _slice(args, params, trailing):
    (x,) = args
    strides = params.get("strides") or (1,) * len(params["start_indices"])
    return x[tuple(slice(s, e, st) for s, e, st in zip(params["start_indices"], params["limit_indices"], strides))]


def _reshape(args, params, trailing):
    if params.get("dimensions") is not None:
        raise HostUnsupported("reshape with dimensions")
    x = args[0]
    return x.reshape(tuple(params["new_sizes"]) + x.shape[x.ndim - trailing:])


def _broadcast_in_dim(args, params, trailing):
    x = args[0]
    shape, dims = tuple(params["shape"]), params["broadcast_dimensions"]
    own = x.shape[x.ndim - trailing:]
    placed = [1] * len(shape)
    for i, d in enumerate(dims):
        placed[d] = x.shape[i]
    return np.broadcast_to(x.reshape(tuple(placed) + own), shape + own)


_STRUCTURAL: dict[str, Callable] = {
    "slice": _slice,
    "squeeze": lambda a, p, t: np.squeeze(a[0], axis=tuple(p["dimensions"])) if p["dimensions"] else a[0],
    "reshape": _reshape,
    "broadcast_in_dim": _broadcast_in_dim,
    "concatenate": lambda a, p, t: np.concatenate(a, axis=p["dimension"]),
    "stack": lambda a, p, t: np.stack(a, axis=p["axis"]),
    "copy": lambda a, p, t: a[0],
    "copy_p": lambda a, p, t: a[0],
}


def _threefry2x32(args, params):
    """The Threefry-2x32 hash (20 rounds, Salmon et al. 2011), with JAX's rotations and key schedule."""
    k1, k2, x1, x2 = np.broadcast_arrays(*(np.asarray(a, np.uint32) for a in args))
    keys = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x = [x1 + keys[0], x2 + keys[1]]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x[0] = x[0] + x[1]
            x[1] = (x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r))
            x[1] = x[0] ^ x[1]
        x[0] = x[0] + keys[(i + 1) % 3]
        x[1] = x[1] + keys[(i + 2) % 3] + np.uint32(i + 1)
    return np.asarray(x[0], np.uint32), np.asarray(x[1], np.uint32)


def _iota_2x32_shape(args, params):
    """The row-major index of every element of ``shape`` as 64 bits: (high 32 bits, low 32 bits)."""
    shape = tuple(params["shape"])
    index = np.arange(math.prod(shape), dtype=np.uint64).reshape(shape)
    return (index >> np.uint64(32)).astype(np.uint32), (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _split(args, params):
    (x,) = args
    return np.split(x, np.cumsum(params["sizes"])[:-1].astype(int), axis=params["axis"])


_MULTIPLE: dict[str, Callable] = {"threefry2x32": _threefry2x32, "iota_2x32_shape": _iota_2x32_shape,
                                  "split": _split}


# -- the key-level primitives, by the implementation's own functions ------------------------------------
def _impl_jaxpr(impl, function: str, static: tuple, in_avals: tuple):
    # JAX's flags that change the PRNG's functions are part of the key
    flags = (jax.config.jax_threefry_partitionable, jax.config.jax_enable_x64)
    return _impl_jaxpr_cached(impl, function, static, in_avals, flags)


@functools.lru_cache(maxsize=256)
def _impl_jaxpr_cached(impl, function: str, static: tuple, in_avals: tuple, flags: tuple):
    from jax._src.config import eager_constant_folding

    fn = getattr(impl, function)
    specs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in in_avals]
    with eager_constant_folding(False):  # staged even where the caller folds constants eagerly
        return jax.make_jaxpr(lambda *a: fn(*a, *static))(*specs)


def _per_key(impl, function: str, static: tuple, batch: tuple, operands: list, per_element: list[bool]):
    """``impl.<function>`` on every element of the key batch; ``per_element[i]``: operand ``i`` has the
    batch dimensions in front (keys, messages), else it is passed whole."""
    if not 0 < math.prod(batch) <= MAX_KEYS:  # an empty batch; or many keys, which compile cheaper than
        raise HostUnsupported(f"{math.prod(batch)} keys")  # a Python loop over them runs
    outs = []
    for index in np.ndindex(*batch):
        ops = [np.asarray(op[index]) if each else op for op, each in zip(operands, per_element)]
        closed = _impl_jaxpr(impl, function, static, tuple((op.shape, op.dtype) for op in ops))
        outs.append(evaluate_jaxpr(closed, *ops)[0])
    first = outs[0]
    return np.stack(outs).reshape(batch + first.shape) if batch else first


def _random_seed(eqn, args):
    (seeds,) = args
    impl = _impl(eqn.outvars[0].aval)
    return [_per_key(impl, "seed", (), seeds.shape, [seeds], [True])]


def _random_split(eqn, args):
    (keys,) = args
    impl = _impl(eqn.invars[0].aval)
    batch = keys.shape[:keys.ndim - len(impl.key_shape)]
    _check_size(batch, eqn.params["shape"])
    return [_per_key(impl, "split", (tuple(eqn.params["shape"]),), batch, [keys], [True])]


def _random_fold_in(eqn, args):
    keys, messages = args
    impl = _impl(eqn.invars[0].aval)
    own = len(impl.key_shape)
    batch = np.broadcast_shapes(keys.shape[:keys.ndim - own], messages.shape)
    keys = np.broadcast_to(keys, batch + keys.shape[keys.ndim - own:])
    messages = np.broadcast_to(messages, batch)
    return [_per_key(impl, "fold_in", (), batch, [keys, messages], [True, True])]


def _random_bits(eqn, args):
    (keys,) = args
    impl = _impl(eqn.invars[0].aval)
    batch = keys.shape[:keys.ndim - len(impl.key_shape)]
    static = (eqn.params["bit_width"], tuple(eqn.params["shape"]))
    _check_size(batch, eqn.params["shape"])
    return [_per_key(impl, "random_bits", static, batch, [keys], [True])]


def _check_size(batch, shape):
    if math.prod(batch) * math.prod(shape) > MAX_VALUES:
        raise HostUnsupported(f"{math.prod(batch) * math.prod(shape)} hashes")


def _random_wrap(eqn, args):
    _impl(eqn.outvars[0].aval)
    return [args[0]]


def _random_unwrap(eqn, args):
    _impl(eqn.invars[0].aval)
    return [args[0]]


_KEY_PRIMITIVES: dict[str, Callable[[Any, list], list]] = {
    "random_seed": _random_seed,
    "random_split": _random_split,
    "random_fold_in": _random_fold_in,
    "random_bits": _random_bits,
    "random_wrap": _random_wrap,
    "random_unwrap": _random_unwrap,
}
