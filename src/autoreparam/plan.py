"""Plans: which latent sites get conditional offsets (and from which parents) or non-centring.

A ``Plan`` is plain, frozen data derived from a ``Report`` (by ``planning.build_plan``); it can
be edited, saved and loaded as JSON, checked against a traced model (``validate_plan``), and
turned into a NumPyro reparam config by ``reparam.build_config``.

For every latent site B it lists offset parents A (earlier additive partners) with the
absorption map ``G_{B|A} = E @ M`` and the initial ``xi_{B|A}`` (shape of B's batch shape):

    B = B_base + sum_A xi_{B|A} * G_{B|A}(A)

The analytic ``xi`` is the response of B to a shift of A along their shared direction, with
all sites before B held fixed and B and the later sites that share the direction free to
respond: the minimiser of the log joint's local quadratic, restricted to those directions and
solved by preconditioned conjugate gradients on Hessian-vector products (O(model) each).
For ``y_ij ~ Normal(mu + a_i, sigma)``, ``a_i ~ Normal(0, tau)`` it is exactly
``-n_i tau^2 / (n_i tau^2 + sigma^2)``.
"""

from __future__ import annotations

import functools
import json
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .errors import InputError
from .files import write_atomic
from .trace import LOC_SCALE_FAMILIES

if TYPE_CHECKING:
    from .trace import TracedSite

__all__ = ["Plan", "SitePlan", "Offset", "SparseMap", "PlanError", "MVN_FAMILIES"]

# A (low-rank) multivariate normal site is non-centred by its Cholesky factor (fully: centredness 0).
MVN_FAMILIES = ("MultivariateNormal", "LowRankMultivariateNormal")

PLAN_FORMAT = 1

class PlanError(InputError):
    """A plan that does not fit its model, or an edit that makes no sense."""


# -- checking plan fields (JSON from disk or hand-built dataclasses) ---------------------------------
_MISSING = object()


def _fail(where: str, what: str):
    raise PlanError(f"malformed plan: {what}" if where == "plan" else f"malformed plan: {where}: {what}")


def _values(n: int) -> str:
    return f"{n} value{'' if n == 1 else 's'}"


def _kind(x) -> str:
    return {dict: "a JSON object", list: "a list", str: "a string", type(None): "null",
            bool: "a boolean"}.get(type(x), type(x).__name__)


def _get(d, key: str, where: str, default=_MISSING):
    if not isinstance(d, dict):
        _fail(where, f"must be a JSON object, got {_kind(d)}")
    if key not in d:
        if default is _MISSING:
            _fail(where, f"missing field '{key}'")
        return default
    return d[key]


def _notes(x, where: str) -> tuple[str, ...]:
    if not isinstance(x, list) or not all(isinstance(n, str) for n in x):
        _fail(where, f"'notes' must be a list of strings, got {_kind(x)}")
    return tuple(x)


def _text(x, where: str, field_name: str) -> str:
    if not isinstance(x, str) or not x:
        _fail(where, f"'{field_name}' must be a non-empty string, got "
                     f"{'an empty string' if isinstance(x, str) else _kind(x)}")
    return x


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _ints(x, where: str, field_name: str) -> tuple[int, ...]:
    """A tuple of non-negative integers (a shape, or sparse indices)."""
    if not isinstance(x, (list, tuple)):
        _fail(where, f"'{field_name}' must be a list of non-negative integers, got {_kind(x)}")
    for v in x:
        if not _is_int(v) or v < 0:
            _fail(where, f"'{field_name}' must be a list of non-negative integers, got {v!r}")
    return tuple(int(v) for v in x)


def _count(x, where: str, field_name: str) -> int:
    """A non-negative integer."""
    if not _is_int(x) or x < 0:
        _fail(where, f"'{field_name}' must be a non-negative integer, got {x!r}")
    return int(x)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _numbers(x, where: str, field_name: str) -> tuple[float, ...]:
    """A tuple of finite floats."""
    if not isinstance(x, (list, tuple)):
        _fail(where, f"'{field_name}' must be a list of numbers, got {_kind(x)}")
    for v in x:
        if not (_is_int(v) or isinstance(v, (float, np.floating))):
            _fail(where, f"'{field_name}' must be a list of numbers, got {_kind(v) if not isinstance(v, str) else repr(v)}")
        try:
            value = float(v)
        except OverflowError:  # a JSON integer beyond any float
            _fail(where, f"'{field_name}' must be finite in float32 (at most {_FLOAT32_MAX:.3g} in size), "
                         f"got an integer of {len(str(abs(int(v))))} digits")
        if not np.isfinite(value):
            _fail(where, f"'{field_name}' must be finite, got {value}")
        if abs(value) > _FLOAT32_MAX:  # the model runs in float32, where it would be infinite
            _fail(where, f"'{field_name}' must be finite in float32 (at most {_FLOAT32_MAX:.3g} in size), "
                         f"got {float(v):g}")
    return tuple(float(v) for v in x)


def _number(x, where: str, field_name: str) -> float:
    """One finite float."""
    if not (_is_int(x) or isinstance(x, (float, np.floating))):
        _fail(where, f"'{field_name}' must be a number, got {_kind(x) if not isinstance(x, str) else repr(x)}")
    return _numbers([x], where, field_name)[0]


def _prod(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


@dataclass(frozen=True)
class SparseMap:
    """A sparse matrix as plain data (rows, cols, vals, shape); JSON-friendly."""

    shape: tuple[int, int]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    vals: tuple[float, ...]

    @classmethod
    def from_scipy(cls, m) -> "SparseMap":
        m = sp.coo_matrix(m)
        return cls((int(m.shape[0]), int(m.shape[1])), tuple(int(r) for r in m.row),
                   tuple(int(c) for c in m.col), tuple(float(v) for v in m.data))

    def to_scipy(self) -> sp.csr_matrix:
        return sp.csr_matrix((np.asarray(self.vals, dtype=np.float64),
                              (np.asarray(self.rows, dtype=np.int64), np.asarray(self.cols, dtype=np.int64))),
                             shape=self.shape)

    def apply(self, x):
        """``self @ x`` for a flat JAX or numpy vector, as a segment sum (jit-friendly)."""
        rows = np.asarray(self.rows, dtype=np.int32)
        cols = np.asarray(self.cols, dtype=np.int32)
        vals = jnp.asarray(np.asarray(self.vals), dtype=jnp.result_type(x))
        return jax.ops.segment_sum(vals * x[cols], rows, num_segments=self.shape[0])

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "rows": list(self.rows), "cols": list(self.cols),
                "vals": list(self.vals)}

    @classmethod
    def from_json(cls, d: dict, where: str = "sparse map") -> "SparseMap":
        return cls(_ints(_get(d, "shape", where), where, "shape"), _ints(_get(d, "rows", where), where, "rows"),
                   _ints(_get(d, "cols", where), where, "cols"), _numbers(_get(d, "vals", where), where, "vals"))

    def check(self, where: str) -> None:
        """Raise PlanError (naming ``where``) unless this is a well-formed sparse matrix."""
        shape = _ints(self.shape, where, "shape")
        if len(shape) != 2:
            _fail(where, f"'shape' must have 2 entries, got {len(shape)}")
        rows, cols = _ints(self.rows, where, "rows"), _ints(self.cols, where, "cols")
        vals = _numbers(self.vals, where, "vals")
        if not len(rows) == len(cols) == len(vals):
            _fail(where, f"'rows', 'cols' and 'vals' must have the same length, got {len(rows)}, "
                         f"{len(cols)} and {len(vals)}")
        for field_name, index, bound in (("rows", rows, shape[0]), ("cols", cols, shape[1])):
            bad = [i for i in index if i >= bound]
            if bad:
                _fail(where, f"'{field_name}' has index {bad[0]}, out of range for shape {shape}")


@dataclass(frozen=True)
class Offset:
    """``xi * G(parent)`` added to a site; ``G = E @ M`` maps the parent into the site's coordinates."""

    parent: str
    E: SparseMap
    M: SparseMap
    init: tuple[float, ...]  # xi's initial value, flattened over the site's batch shape
    structure: str = "linear"

    def absorb(self, parent_value, site_shape):
        """``G(parent)`` reshaped to the site's full shape."""
        site_shape = tuple(site_shape)
        dtype = jnp.result_type(parent_value)
        axes = self._axes_kernel(tuple(jnp.shape(parent_value)), site_shape)
        if axes is not None:  # G = diag(coef) . broadcast . sum over axes . diag(weights)
            reduced, weights, kept_shape, coef = axes
            out = parent_value if weights is None else jnp.asarray(weights, dtype=dtype) * parent_value
            if reduced:
                out = jnp.sum(out, axis=reduced)
            out = jnp.broadcast_to(jnp.reshape(out, kept_shape), site_shape)
            return out if coef is None else jnp.asarray(coef, dtype=dtype) * out
        flat = jnp.reshape(parent_value, (-1,))
        kind, data = self._kernel
        if kind == "scaled":  # one parent element per child element: a gather with coefficients
            index, coef = data
            out = jnp.asarray(coef, dtype=dtype) * flat[index]
        elif kind == "dense":
            out = jnp.asarray(data, dtype=dtype) @ flat
        else:
            out = self.E.apply(self.M.apply(flat))
        return jnp.reshape(out, site_shape)

    def _axes_kernel(self, parent_shape: tuple, site_shape: tuple):
        """G as array operations, when ``M`` sums the parent over some of its axes (with weights)
        and ``E`` broadcasts the result along some of the site's axes (with coefficients): then
        ``(reduced axes, weights or None, shape to broadcast from, coef or None)``, else None.

        The usual maps (broadcast, gather by a plate index, group means) are of this form; as
        array operations they fuse with the rest of the model, where a gather, a scatter (its
        gradient) or a dense product each run as their own kernel.
        """
        key = (parent_shape, site_shape)
        cache = self._axes_kernels
        if key not in cache:
            cache[key] = _axes_map(self.M, self.E, parent_shape, site_shape)
        return cache[key]

    @functools.cached_property
    def _axes_kernels(self) -> dict:
        return {}

    @functools.cached_property
    def _kernel(self):
        """The cheapest exact way to apply G (the factored segment sums cost ~3x a plain gather)."""
        e, mm = self.E.to_scipy(), self.M.to_scipy()
        n_b, n_a = e.shape[0], mm.shape[1]
        if e.nnz + mm.nnz == 0:
            return "scaled", (np.zeros(n_b, dtype=np.int32), np.zeros(n_b))
        g = (e @ mm).tocsr()
        per_row = np.diff(g.indptr)
        if per_row.max(initial=0) <= 1:
            index = np.zeros(n_b, dtype=np.int32)
            coef = np.zeros(n_b)
            rows = np.flatnonzero(per_row)
            index[rows] = g.indices[g.indptr[rows]]
            coef[rows] = g.data[g.indptr[rows]]
            return "scaled", (index, coef)
        if n_b * n_a <= 65536:
            return "dense", g.toarray()
        return "factored", None

    def described_structure(self) -> str:
        """``structure`` for people: a "covariate" map whose entries are one fixed coefficient c
        (``mu + 2 * a[g]``) is ``scaled c``, since the model has no covariate there."""
        if self.structure != "covariate" or not self.E.vals:
            return self.structure
        values = (self.E.to_scipy() @ self.M.to_scipy()).tocsr().data
        values = values[values != 0]
        if values.size and np.ptp(values) <= 1e-6 * np.abs(values).max():
            return f"scaled {values[0]:.4g}"
        return self.structure

    def to_json(self) -> dict:
        return {"parent": self.parent, "structure": self.structure, "init": list(self.init),
                "E": self.E.to_json(), "M": self.M.to_json()}

    @classmethod
    def from_json(cls, d: dict, where: str = "offset") -> "Offset":
        parent = _text(_get(d, "parent", where), where, "parent")
        where = f"{where} from '{parent}'"
        return cls(parent, SparseMap.from_json(_get(d, "E", where), f"{where}, field 'E'"),
                   SparseMap.from_json(_get(d, "M", where), f"{where}, field 'M'"),
                   _numbers(_get(d, "init", where), where, "init"),
                   _text(_get(d, "structure", where, "linear"), where, "structure"))

    def check(self, where: str, site_size: int, n_batch: int, batch_shape=()) -> None:
        """Raise PlanError (naming ``where``) unless the offset fits a site of ``site_size`` elements."""
        _text(self.parent, where, "parent")
        where = f"{where} from '{self.parent}'"
        _text(self.structure, where, "structure")
        init = _numbers(self.init, where, "init")
        if len(init) != n_batch:
            _fail(where, f"'init' has {_values(len(init))}, expected {n_batch} (one per element of the "
                         f"batch shape {tuple(batch_shape)})")
        for field_name, m in (("E", self.E), ("M", self.M)):
            if not isinstance(m, SparseMap):
                _fail(where, f"'{field_name}' must be a sparse map, got {type(m).__name__}")
            m.check(f"{where}, field '{field_name}'")
        if self.E.shape[0] != site_size:
            _fail(where, f"'E' has {self.E.shape[0]} rows, expected {site_size} (the site's size)")
        if self.E.shape[1] != self.M.shape[0]:
            _fail(where, f"'E' has {self.E.shape[1]} columns but 'M' has {self.M.shape[0]} rows")


def _one_per_line(m: sp.csr_matrix, n_lines: int):
    """(line -> its single column, its value) of a sparse matrix with at most one entry per row
    (lines without one get -1 and 0), or None."""
    m = m.tocsr()
    m.sum_duplicates()
    per_row = np.diff(m.indptr)
    if per_row.max(initial=0) > 1:
        return None
    index = np.full(n_lines, -1, dtype=np.int64)
    value = np.zeros(n_lines)
    rows = np.flatnonzero(per_row)
    index[rows] = m.indices[m.indptr[rows]]
    value[rows] = m.data[m.indptr[rows]]
    return index, value


def _kept_axes(index: np.ndarray, shape: tuple, size: int):
    """The axes of ``shape`` whose coordinates, in row-major order, number the entries of
    ``index`` (an array of that shape, -1 where any number goes) from 0 to ``size - 1``; or None."""
    coords = np.indices(shape).reshape(len(shape), -1) if shape else np.zeros((0, 1), dtype=np.int64)
    index = index.reshape(-1)
    known = index >= 0
    varying = [ax for ax in range(len(shape)) if shape[ax] > 1]
    for mask in range(1 << len(varying)):
        kept = [ax for i, ax in enumerate(varying) if mask >> i & 1]
        if _prod([shape[ax] for ax in kept]) != size:
            continue
        numbering = np.ravel_multi_index(coords[kept], [shape[ax] for ax in kept]) if kept \
            else np.zeros(index.shape, dtype=np.int64)
        if np.array_equal(numbering[known], index[known]):
            return kept
    return None


def _axes_map(m_map: SparseMap, e_map: SparseMap, parent_shape: tuple, site_shape: tuple):
    """``Offset._axes_kernel``'s arrays for ``G = E @ M``, or None (see there)."""
    groups = m_map.shape[0]
    if _prod(parent_shape) != m_map.shape[1] or _prod(site_shape) != e_map.shape[0] or e_map.shape[1] != groups \
            or len(parent_shape) > 8 or len(site_shape) > 8:
        return None
    columns = _one_per_line(m_map.to_scipy().T, m_map.shape[1])  # parent element -> its group, weight
    entries = _one_per_line(e_map.to_scipy(), e_map.shape[0])  # site element -> its group, coefficient
    if columns is None or entries is None:
        return None
    group_of, weights = columns
    read_from, coef = entries
    summed = _kept_axes(group_of.reshape(parent_shape), parent_shape, groups)
    spread = _kept_axes(read_from.reshape(site_shape), site_shape, groups)
    if summed is None or spread is None:
        return None
    reduced = tuple(ax for ax in range(len(parent_shape)) if ax not in summed and parent_shape[ax] > 1)
    kept_shape = tuple(n if ax in spread else 1 for ax, n in enumerate(site_shape))
    return reduced, _factor(weights, parent_shape), kept_shape, _factor(coef, site_shape)


def _factor(values: np.ndarray, shape: tuple):
    """None for ones (no product to take), a float when all equal, else the array in ``shape``."""
    if np.all(values == 1.0):
        return None
    if values.size and np.all(values == values[0]):
        return float(values[0])
    return values.reshape(shape)


@dataclass(frozen=True)
class SitePlan:
    """What happens to one latent site: its offsets, and its centredness if non-centred.

    ``centredness`` is None (left centred, no decentring), or a tuple of per-element values in
    [0, 1] over the batch shape (0 = fully non-centred), used as the initial value when
    ``learn_centredness`` is True. (NumPyro's ``LocScaleReparam`` calls it ``centered``.)
    ``cholesky`` marks a MultivariateNormal site non-centred by its Cholesky factor
    (``a = loc + scale_tril @ z``): fully (centredness 0, not learned) and without offsets.
    ``sample_ndim`` counts the leading dims of ``shape`` that come from ``sample_shape=`` (before the
    batch dims; those after the batch are event dims).
    """

    name: str
    shape: tuple[int, ...]
    batch_shape: tuple[int, ...]
    offsets: tuple[Offset, ...] = ()
    centredness: tuple[float, ...] | None = None
    learn_centredness: bool = True
    cholesky: bool = False
    sample_ndim: int = 0

    @property
    def parents(self) -> tuple[str, ...]:
        return tuple(o.parent for o in self.offsets)

    @property
    def noncentred(self) -> bool:
        return self.centredness is not None

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "batch_shape": list(self.batch_shape),
                "offsets": [o.to_json() for o in self.offsets],
                "centredness": None if self.centredness is None else list(self.centredness),
                "learn_centredness": self.learn_centredness, **({"cholesky": True} if self.cholesky else {}),
                **({"sample_ndim": self.sample_ndim} if self.sample_ndim else {})}

    @classmethod
    def from_json(cls, d: dict, where: str = "site") -> "SitePlan":
        name = _text(_get(d, "name", where), where, "name")
        where = f"site '{name}'"
        offsets = _get(d, "offsets", where)
        if not isinstance(offsets, list):
            _fail(where, f"'offsets' must be a list, got {_kind(offsets)}")
        # Plans saved before the names were settled have "centered" and "learn_centered".
        centredness = _get(d, "centredness", where, _get(d, "centered", where, None))
        return cls(name, _ints(_get(d, "shape", where), where, "shape"),
                   _ints(_get(d, "batch_shape", where), where, "batch_shape"),
                   tuple(Offset.from_json(o, f"{where}, offset") for o in offsets),
                   None if centredness is None else _numbers(centredness, where, "centredness"),
                   _get(d, "learn_centredness", where, _get(d, "learn_centered", where, True)),
                   _get(d, "cholesky", where, False), _get(d, "sample_ndim", where, 0))

    def check(self) -> None:
        """Raise PlanError naming the site and field unless every field is well-formed."""
        where = f"site '{_text(self.name, 'site', 'name')}'"
        shape = _ints(self.shape, where, "shape")
        batch_shape = _ints(self.batch_shape, where, "batch_shape")
        sample_ndim = _count(self.sample_ndim, where, "sample_ndim")
        if not any(shape[i:i + len(batch_shape)] == batch_shape for i in range(len(shape) - len(batch_shape) + 1)):
            _fail(where, f"'batch_shape' {batch_shape} is not part of 'shape' {shape}")
        if sample_ndim and shape[sample_ndim:sample_ndim + len(batch_shape)] != batch_shape:
            _fail(where, f"'batch_shape' {batch_shape} does not follow the {sample_ndim} sample dims of 'shape' {shape}")
        size, n_batch = _prod(shape), _prod(batch_shape)
        if not isinstance(self.offsets, tuple) or not all(isinstance(o, Offset) for o in self.offsets):
            _fail(where, "'offsets' must be a tuple of Offset")
        seen = set()
        for off in self.offsets:
            off.check(f"{where}, offset", size, n_batch, batch_shape)
            if off.parent == self.name:
                _fail(where, "has an offset from itself")
            if off.parent in seen:
                _fail(where, f"has two offsets from '{off.parent}'")
            seen.add(off.parent)
        if self.centredness is not None:
            centredness = _numbers(self.centredness, where, "centredness")
            if len(centredness) != n_batch:
                _fail(where, f"'centredness' has {_values(len(centredness))}, expected {n_batch} (one per element "
                             f"of the batch shape {batch_shape})")
            outside = [c for c in centredness if not 0.0 <= c <= 1.0]
            if outside:
                _fail(where, f"'centredness' must be in [0, 1], got {outside[0]}")
        if not isinstance(self.learn_centredness, bool):
            _fail(where, f"'learn_centredness' must be true or false, got {self.learn_centredness!r}")
        if not isinstance(self.cholesky, bool):
            _fail(where, f"'cholesky' must be true or false, got {self.cholesky!r}")
        if self.cholesky and (self.offsets or self.learn_centredness or self.centredness is None
                              or any(c != 0.0 for c in self.centredness)):
            _fail(where, "'cholesky' (non-centred by its Cholesky factor) needs centredness 0, not learned, "
                         "and no offsets")


@dataclass(frozen=True)
class Plan:
    """The reparameterization of a model, as plain data.

    >>> def model(group, y=None):
    ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
    ...     with numpyro.plate("groups", 3):
    ...         a = numpyro.sample("a", dist.Normal(0, 1))
    ...     with numpyro.plate("data", len(group)):
    ...         numpyro.sample("y", dist.Normal(mu + a[group], 0.5), obs=y)
    >>> report = autoreparam.analyze(model, jnp.array([0, 1, 2, 0]), y=jnp.zeros(4))
    >>> plan = report.make_plan(init="zero")  # report.plan: the default, analytic xi
    >>> print(plan)
    plan for model: 1 site with offsets, 0 non-centred (xi init: zero)
      a <- mu (broadcast, xi 0.00)
    >>> plan.without_parent("a", "mu").is_empty()
    True
    >>> Plan.from_json(plan.to_json()) == plan  # plan.save(path) and Plan.load(path) write and read it
    True
    """

    model: str
    sites: tuple[SitePlan, ...]
    candidates: tuple[tuple[str, Offset], ...] = field(default=(), compare=False)
    latent: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()  # (name, shape, batch shape)
    init: str = "analytic"
    # Offset parents enter as ``G(P - anchor)``: anchoring them at the point where xi was measured
    # keeps a change of xi from moving the site's mean (and keeps xi's SVI gradient quiet).
    anchors: tuple[tuple[str, tuple[float, ...]], ...] = ()
    # Learned xi = init + xi_step * param; see ConditionalOffsetReparam.
    xi_step: float = 1.0
    # What the planning left out and why (e.g. an item that made the geometry worse).
    notes: tuple[str, ...] = field(default=(), compare=False)
    # Latent sites drawn with sample_shape=: how many leading dims that adds (SitePlan.sample_ndim).
    sample_ndims: tuple[tuple[str, int], ...] = ()

    def anchor_of(self, name: str):
        for n, values in self.anchors:
            if n == name:
                return values
        return None

    # -- lookup -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> SitePlan:
        for s in self.sites:
            if s.name == name:
                return s
        raise PlanError(f"the plan has no site '{name}' (sites: {', '.join(self.names) or 'none'})")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    def is_empty(self) -> bool:
        return not any(s.offsets or s.noncentred for s in self.sites)

    # -- edits (each returns a new Plan) ---------------------------------------------------------
    def _replace_site(self, site: SitePlan) -> "Plan":
        sites = tuple(site if s.name == site.name else s for s in self.sites)
        if site.name not in self.names:
            sites = tuple(sorted(sites + (site,), key=self._position))
        return replace(self, sites=tuple(s for s in sites if s.offsets or s.noncentred))

    def _position(self, s: SitePlan) -> int:
        return self.order.index(s.name) if s.name in self.order else len(self.order)

    def without_site(self, name: str) -> "Plan":
        """Leave ``name`` as it is in the model (no offsets, no non-centring)."""
        self[name]
        return replace(self, sites=tuple(s for s in self.sites if s.name != name))

    def without_parent(self, name: str, parent: str) -> "Plan":
        site = self[name]
        if parent not in site.parents:
            raise PlanError(f"site '{name}' has no offset parent '{parent}' (parents: "
                            f"{', '.join(site.parents) or 'none'})")
        return self._replace_site(replace(site, offsets=tuple(o for o in site.offsets if o.parent != parent)))

    def with_parent(self, name: str, parent: str) -> "Plan":
        """Add an offset from ``parent`` found by the analysis (see ``plan.candidates``)."""
        for child, off in self.candidates:
            if child == name and off.parent == parent:
                site = self._site_or_new(name)
                if parent in site.parents:
                    return self
                offsets = tuple(sorted(site.offsets + (off,), key=lambda o: self._order_of(o.parent)))
                return self._replace_site(replace(site, offsets=offsets))
        known = [f"{c} <- {o.parent}" for c, o in self.candidates]
        raise PlanError(f"no additive partner '{parent}' for site '{name}' in the analysis; "
                        f"available: {', '.join(known) or 'none'}")

    def _order_of(self, name: str) -> int:
        return self.order.index(name) if name in self.order else -1

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(n for n, _, _ in self.latent)

    def _site_or_new(self, name) -> SitePlan:
        if name in self.names:
            return self[name]
        for n, shape, batch_shape in self.latent:
            if n == name:
                return SitePlan(name, shape, batch_shape, sample_ndim=dict(self.sample_ndims).get(name, 0))
        raise PlanError(f"site '{name}' is not a latent site of {self.model} "
                        f"(latent sites: {', '.join(self.order) or 'none'})")

    def with_centredness(self, name: str, centredness: float | None, learn: bool = True,
                         cholesky: bool = False) -> "Plan":
        """Force a site centred (``centredness=1`` or None) or (partially) non-centred (0 <= c < 1).

        A site non-centred by its Cholesky factor (a MultivariateNormal) is all or nothing: centred, or
        fully non-centred (0, not learned). ``cholesky=True`` makes a site so (one the plan left centred:
        the plan does not know the family), without offsets."""
        if centredness is not None and (isinstance(centredness, (bool, np.bool_))
                                        or not isinstance(centredness, numbers.Real)):
            raise PlanError(f"centredness for site '{name}' must be a number in [0, 1] or None, got {centredness!r}")
        site = self._site_or_new(name)
        if centredness is None or centredness == 1:
            return self._replace_site(replace(site, centredness=None, learn_centredness=True, cholesky=False))
        if not 0 <= centredness <= 1:
            raise PlanError(f"centredness for site '{name}' must be in [0, 1], got {centredness}")
        if cholesky and not site.cholesky:
            if centredness != 0:
                raise PlanError(f"cholesky=True for site '{name}' needs centredness 0 (all or nothing), got "
                                f"{centredness}")
            n = int(np.prod(site.batch_shape, dtype=np.int64))
            return self._replace_site(replace(site, offsets=(), centredness=(0.0,) * n, learn_centredness=False,
                                              cholesky=True))
        if site.cholesky:
            if centredness != 0:
                raise PlanError(f"site '{name}' is non-centred by its Cholesky factor, all or nothing: centredness "
                                f"0 or 1 (None), got {centredness}")
            return self
        n = int(np.prod(site.batch_shape, dtype=np.int64))
        return self._replace_site(replace(site, centredness=(float(centredness),) * n, learn_centredness=learn))

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "model": self.model, "init": self.init,
                "anchors": {n: list(v) for n, v in self.anchors}, "xi_step": self.xi_step,
                "latent": [{"name": n, "shape": list(s), "batch_shape": list(b)} for n, s, b in self.latent],
                "sites": [s.to_json() for s in self.sites], "notes": [str(note) for note in self.notes],
                "candidates": [{"site": c, **o.to_json()} for c, o in self.candidates],
                **({"sample_ndims": dict(self.sample_ndims)} if self.sample_ndims else {})}

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        """The plan of ``to_json``; every field is checked (PlanError naming the site and field)."""
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not an autoreparam plan (expected a JSON object with \"format\": {PLAN_FORMAT})")
        where = "plan"
        sites, candidates = _get(d, "sites", where), _get(d, "candidates", where, [])
        # Plans saved before the names were settled have "centers".
        latent, anchors = _get(d, "latent", where, []), _get(d, "anchors", where, _get(d, "centers", where, {}))
        sample_ndims = _get(d, "sample_ndims", where, {})
        for field_name, value, kind in (("sites", sites, list), ("candidates", candidates, list),
                                        ("latent", latent, list), ("anchors", anchors, dict),
                                        ("sample_ndims", sample_ndims, dict)):
            if not isinstance(value, kind):
                _fail(where, f"'{field_name}' must be a {'list' if kind is list else 'JSON object'}, "
                             f"got {_kind(value)}")
        xi_step = _number(_get(d, "xi_step", where, 1.0), where, "xi_step")
        plan = cls(_text(_get(d, "model", where), where, "model"),
                   tuple(SitePlan.from_json(s, f"sites[{i}]") for i, s in enumerate(sites)),
                   tuple((_text(_get(c, "site", f"candidates[{i}]"), f"candidates[{i}]", "site"),
                          Offset.from_json(c, f"candidate for '{c['site']}', offset"))
                         for i, c in enumerate(candidates)),
                   tuple((_text(_get(x, "name", f"latent[{i}]"), f"latent[{i}]", "name"),
                          _ints(_get(x, "shape", f"latent[{i}]"), f"latent[{i}]", "shape"),
                          _ints(_get(x, "batch_shape", f"latent[{i}]"), f"latent[{i}]", "batch_shape"))
                         for i, x in enumerate(latent)),
                   _get(d, "init", where, "analytic"),
                   tuple((n, _numbers(v, f"anchors['{n}']", "values")) for n, v in anchors.items()),
                   float(xi_step),
                   _notes(_get(d, "notes", where, []), where),
                   tuple(sample_ndims.items()))
        plan.check()
        return plan

    def check(self) -> "Plan":
        """Raise PlanError naming the site and field unless every field is well-formed; returns self."""
        where = "plan"
        _text(self.model, where, "model")
        if self.init not in ("analytic", "zero"):
            _fail(where, f"'init' must be 'analytic' or 'zero', got {self.init!r}")
        xi_step = _number(self.xi_step, where, "xi_step")
        if xi_step <= 0:
            _fail(where, f"'xi_step' must be positive, got {xi_step}")
        if not isinstance(self.sites, tuple) or not all(isinstance(s, SitePlan) for s in self.sites):
            _fail(where, "'sites' must be a tuple of SitePlan")
        names = [s.name for s in self.sites]
        for s in self.sites:
            s.check()
            if names.count(s.name) > 1:
                _fail(f"site '{s.name}'", "appears twice in the plan")
        for i, entry in enumerate(self.latent):
            if not (isinstance(entry, tuple) and len(entry) == 3):
                _fail(f"latent[{i}]", "must be (name, shape, batch_shape)")
            _text(entry[0], f"latent[{i}]", "name")
            _ints(entry[1], f"latent site '{entry[0]}'", "shape")
            _ints(entry[2], f"latent site '{entry[0]}'", "batch_shape")
        if not isinstance(self.notes, tuple) or not all(isinstance(n, str) for n in self.notes):
            _fail(where, "'notes' must be a tuple of strings")
        for name, ndim in self.sample_ndims:
            _count(ndim, where, f"sample_ndims['{name}']")
        sizes = {n: _prod(shape) for n, shape, _ in self.latent}
        batches = {n: batch for n, _, batch in self.latent}
        for i, entry in enumerate(self.candidates):
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Offset)):
                _fail(f"candidates[{i}]", "must be (site name, Offset)")
            child, off = entry
            _text(child, f"candidates[{i}]", "site")
            if child in sizes:
                off.check(f"candidate for '{child}', offset", sizes[child], _prod(batches[child]), batches[child])
        seen = set()
        for i, entry in enumerate(self.anchors):
            if not (isinstance(entry, tuple) and len(entry) == 2):
                _fail(f"anchors[{i}]", "must be (site name, values)")
            name, values = entry
            _text(name, f"anchors[{i}]", "name")
            where_c = f"anchors['{name}']"
            if name in seen:
                _fail(where_c, "appears twice")
            seen.add(name)
            values = _numbers(values, where_c, "values")
            if name in sizes and len(values) != sizes[name]:
                _fail(where_c, f"has {_values(len(values))}, expected {sizes[name]} (the size of site '{name}')")
        return self

    def save(self, path) -> None:
        """Write the plan as JSON (atomically: a failed write leaves no half-written file)."""
        try:
            write_atomic(path, json.dumps(self.to_json()))
        except OSError as exc:
            raise PlanError(f"{path}: cannot write the plan ({exc.strerror or exc})") from None

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"{path}: no such plan file") from None
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except UnicodeDecodeError:
            raise PlanError(f"{path}: not a text file (expected a JSON plan written by plan.save)") from None
        except OSError as exc:
            raise PlanError(f"{path}: cannot read the plan ({exc.strerror or exc})") from None
        try:
            return cls.from_json(data)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None

    def __str__(self) -> str:
        with_offsets = [s for s in self.sites if s.offsets]
        nc = [s for s in self.sites if s.noncentred]
        lines = [f"plan for {self.model}: {len(with_offsets)} site{'s' if len(with_offsets) != 1 else ''} "
                 f"with offsets, {len(nc)} non-centred (xi init: {self.init})"]
        if not self.sites:
            lines.append("  (empty: the model is left as it is)")
        width = max((len(s.name) for s in self.sites), default=0)
        for s in self.sites:
            parts = [f"{o.parent} ({o.described_structure()}, xi {_summary(o.init)})" for o in s.offsets]
            line = f"  {s.name:<{width}}"
            if parts:
                line += " <- " + ", ".join(parts)
            if s.cholesky:
                line += "  non-centred by its Cholesky factor"
            elif s.noncentred:
                line += f"  non-centred (centredness {_summary(s.centredness)}{', learned' if s.learn_centredness else ''})"
            lines.append(line)
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _summary(values) -> str:
    v = np.asarray(values, dtype=float)
    if v.size == 1 or f"{v.min():.2f}" == f"{v.max():.2f}":
        return f"{v.flat[0]:.2f}"
    return f"{v.min():.2f}..{v.max():.2f}"


def validate_plan(plan: Plan, sites: dict[str, TracedSite]) -> None:
    """Raise PlanError naming the site when a plan does not fit a traced model."""
    plan.check()
    latent = [n for n, s in sites.items() if s.kind == "latent"]
    for s in plan.sites:
        site = sites.get(s.name)
        if site is None or site.kind != "latent":
            raise PlanError(f"plan site '{s.name}' is not a latent sample site of the model "
                            f"(latent sites: {', '.join(latent) or 'none'})")
        if tuple(site.shape) != tuple(s.shape):
            raise PlanError(f"plan site '{s.name}' has shape {tuple(s.shape)} but the model samples "
                            f"shape {tuple(site.shape)}")
        batch = site.batch_shape
        if batch[len(batch) - len(s.batch_shape):] != tuple(s.batch_shape):
            raise PlanError(f"plan site '{s.name}' has batch shape {tuple(s.batch_shape)} but the model "
                            f"samples batch shape {batch}")
        if not site.real or site.discrete:
            raise PlanError(f"plan site '{s.name}' has no real support ({site.family}); offsets and "
                            "non-centring need real support")
        if s.cholesky and site.family not in MVN_FAMILIES:
            raise PlanError(f"plan site '{s.name}' is {site.family}: 'cholesky' non-centring is for "
                            f"{' and '.join(MVN_FAMILIES)} sites only")
        if s.noncentred and not s.cholesky and site.family in MVN_FAMILIES:
            raise PlanError(f"plan site '{s.name}' is a {site.family}: it is non-centred only by its "
                            "Cholesky factor ('cholesky': true, centredness 0; "
                            f"plan.with_centredness({s.name!r}, 0.0, cholesky=True))")
        if s.noncentred and not s.cholesky and site.family not in {f.__name__ for f in LOC_SCALE_FAMILIES}:
            raise PlanError(f"plan site '{s.name}' is {site.family}, not one of the loc-scale families "
                            f"({', '.join(f.__name__ for f in LOC_SCALE_FAMILIES)}); it cannot be non-centred")
        for off in s.offsets:
            parent = sites.get(off.parent)
            if parent is None or parent.kind not in ("latent", "deterministic"):
                raise PlanError(f"plan site '{s.name}' has offset parent '{off.parent}', which is not a "
                                "site of the model")
            if parent.order >= site.order:
                raise PlanError(f"plan site '{s.name}' has offset parent '{off.parent}', which is sampled "
                                f"after '{s.name}'; a parent must come first in program order")
            if off.M.shape[1] != parent.size or off.E.shape[0] != site.size:
                raise PlanError(f"plan site '{s.name}': the offset from '{off.parent}' maps "
                                f"{off.M.shape[1]} values to {off.E.shape[0]}, but the model has "
                                f"{parent.size} and {site.size}")
            center = plan.anchor_of(off.parent)
            if center is not None and len(center) != parent.size:
                raise PlanError(f"plan anchors['{off.parent}'] has {len(center)} values, but site "
                                f"'{off.parent}' has {parent.size}")
