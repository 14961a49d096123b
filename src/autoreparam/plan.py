"""Plans: which latent sites get conditional offsets (and from which parents) or non-centring.

A ``Plan`` is plain, frozen data derived from a ``Report``; it can be edited, saved and
loaded as JSON, and turned into a NumPyro reparam config with ``plan.to_config()``.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .errors import InputError
from .trace import LOC_SCALE_FAMILIES

__all__ = ["Plan", "SitePlan", "Offset", "SparseMap", "PlanError"]

PLAN_FORMAT = 1
# Measured on the tensor model (benchmarks/): learning xi at Adam's full rate from the analytic
# start loses ELBO to gradient noise; a step of 0.02 keeps the start and still refines it.
ANALYTIC_XI_STEP = 0.02
# A funnel site whose every element has an analytic centredness above this is left centred; one
# element below it (a county with one house among counties with a hundred) non-centres the site,
# each element at its own centredness, so the well-informed elements stay (nearly) centred.
CENTRED_ENOUGH = 0.9


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


def _numbers(x, where: str, field_name: str) -> tuple[float, ...]:
    """A tuple of finite floats."""
    if not isinstance(x, (list, tuple)):
        _fail(where, f"'{field_name}' must be a list of numbers, got {_kind(x)}")
    for v in x:
        if not (_is_int(v) or isinstance(v, (float, np.floating))):
            _fail(where, f"'{field_name}' must be a list of numbers, got {_kind(v) if not isinstance(v, str) else repr(v)}")
        if not np.isfinite(v):
            _fail(where, f"'{field_name}' must be finite, got {float(v)}")
    return tuple(float(v) for v in x)


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
        flat = jnp.reshape(parent_value, (-1,))
        kind, data = self._kernel
        dtype = jnp.result_type(flat)
        if kind == "scaled":  # one parent element per child element: a gather with coefficients
            index, coef = data
            out = jnp.asarray(coef, dtype=dtype) * flat[index]
        elif kind == "dense":
            out = jnp.asarray(data, dtype=dtype) @ flat
        else:
            out = self.E.apply(self.M.apply(flat))
        return jnp.reshape(out, site_shape)

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


@dataclass(frozen=True)
class SitePlan:
    """What happens to one latent site: its offsets, and its centredness if non-centred.

    ``centered`` is None (left centred, no decentring), a tuple of per-element values in
    [0, 1] over the batch shape (0 = fully non-centred), used as the initial value when
    ``learn_centered`` is True.
    """

    name: str
    shape: tuple[int, ...]
    batch_shape: tuple[int, ...]
    offsets: tuple[Offset, ...] = ()
    centered: tuple[float, ...] | None = None
    learn_centered: bool = True

    @property
    def parents(self) -> tuple[str, ...]:
        return tuple(o.parent for o in self.offsets)

    @property
    def noncentred(self) -> bool:
        return self.centered is not None

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "batch_shape": list(self.batch_shape),
                "offsets": [o.to_json() for o in self.offsets],
                "centered": None if self.centered is None else list(self.centered),
                "learn_centered": self.learn_centered}

    @classmethod
    def from_json(cls, d: dict, where: str = "site") -> "SitePlan":
        name = _text(_get(d, "name", where), where, "name")
        where = f"site '{name}'"
        offsets = _get(d, "offsets", where)
        if not isinstance(offsets, list):
            _fail(where, f"'offsets' must be a list, got {_kind(offsets)}")
        centered = _get(d, "centered", where, None)
        return cls(name, _ints(_get(d, "shape", where), where, "shape"),
                   _ints(_get(d, "batch_shape", where), where, "batch_shape"),
                   tuple(Offset.from_json(o, f"{where}, offset") for o in offsets),
                   None if centered is None else _numbers(centered, where, "centered"),
                   _get(d, "learn_centered", where, True))

    def check(self) -> None:
        """Raise PlanError naming the site and field unless every field is well-formed."""
        where = f"site '{_text(self.name, 'site', 'name')}'"
        shape = _ints(self.shape, where, "shape")
        batch_shape = _ints(self.batch_shape, where, "batch_shape")
        if not any(shape[i:i + len(batch_shape)] == batch_shape for i in range(len(shape) - len(batch_shape) + 1)):
            _fail(where, f"'batch_shape' {batch_shape} is not part of 'shape' {shape}")
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
        if self.centered is not None:
            centered = _numbers(self.centered, where, "centered")
            if len(centered) != n_batch:
                _fail(where, f"'centered' has {_values(len(centered))}, expected {n_batch} (one per element "
                             f"of the batch shape {batch_shape})")
            outside = [c for c in centered if not 0.0 <= c <= 1.0]
            if outside:
                _fail(where, f"'centered' must be in [0, 1], got {outside[0]}")
        if not isinstance(self.learn_centered, bool):
            _fail(where, f"'learn_centered' must be true or false, got {self.learn_centered!r}")


@dataclass(frozen=True)
class Plan:
    """The reparameterization of a model, as plain data.

    >>> plan = autoreparam.analyze(model, group, y=y).plan        # doctest: +SKIP
    >>> print(plan)                                               # doctest: +SKIP
    plan for model: 1 site with offsets, 0 non-centred
      a  <- mu (broadcast)   xi init mean -0.97
    >>> plan.without_parent("a", "mu").save("plan.json")          # doctest: +SKIP
    >>> Plan.load("plan.json").to_config()                        # doctest: +SKIP
    {'a': ConditionalOffsetReparam(site='a', parents=('mu',), ...)}
    """

    model: str
    sites: tuple[SitePlan, ...]
    candidates: tuple[tuple[str, Offset], ...] = field(default=(), compare=False)
    latent: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()  # (name, shape, batch shape)
    init: str = "analytic"
    # Offset parents enter as ``G(P - center)``: centring at the point where xi was measured
    # keeps a change of xi from moving the site's mean (and keeps xi's SVI gradient quiet).
    centers: tuple[tuple[str, tuple[float, ...]], ...] = ()
    # Learned xi = init + xi_step * param; see ConditionalOffsetReparam.
    xi_step: float = 1.0
    # What the planning left out and why (e.g. an item that made the geometry worse).
    notes: tuple[str, ...] = field(default=(), compare=False)

    def center_of(self, name: str):
        for n, values in self.centers:
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
                return SitePlan(name, shape, batch_shape)
        raise PlanError(f"site '{name}' is not a latent site of {self.model} "
                        f"(latent sites: {', '.join(self.order) or 'none'})")

    def with_centering(self, name: str, centered: float | None, learn: bool = True) -> "Plan":
        """Force a site centred (``centered=1`` or None) or (partially) non-centred (0 <= c < 1)."""
        site = self._site_or_new(name)
        if centered is None or centered == 1:
            return self._replace_site(replace(site, centered=None, learn_centered=True))
        if not 0 <= centered <= 1:
            raise PlanError(f"centered for site '{name}' must be in [0, 1], got {centered}")
        n = int(np.prod(site.batch_shape, dtype=np.int64))
        return self._replace_site(replace(site, centered=(float(centered),) * n, learn_centered=learn))

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "model": self.model, "init": self.init,
                "centers": {n: list(v) for n, v in self.centers}, "xi_step": self.xi_step,
                "latent": [{"name": n, "shape": list(s), "batch_shape": list(b)} for n, s, b in self.latent],
                "sites": [s.to_json() for s in self.sites], "notes": list(self.notes),
                "candidates": [{"site": c, **o.to_json()} for c, o in self.candidates]}

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        """The plan of ``to_json``; every field is checked (PlanError naming the site and field)."""
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not an autoreparam plan (expected a JSON object with \"format\": {PLAN_FORMAT})")
        where = "plan"
        sites, candidates = _get(d, "sites", where), _get(d, "candidates", where, [])
        latent, centers = _get(d, "latent", where, []), _get(d, "centers", where, {})
        for field_name, value, kind in (("sites", sites, list), ("candidates", candidates, list),
                                        ("latent", latent, list), ("centers", centers, dict)):
            if not isinstance(value, kind):
                _fail(where, f"'{field_name}' must be a {'list' if kind is list else 'JSON object'}, "
                             f"got {_kind(value)}")
        xi_step = _numbers([_get(d, "xi_step", where, 1.0)], where, "xi_step")[0]
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
                   tuple((n, _numbers(v, f"centers['{n}']", "values")) for n, v in centers.items()),
                   float(xi_step),
                   _notes(_get(d, "notes", where, []), where))
        plan.check()
        return plan

    def check(self) -> "Plan":
        """Raise PlanError naming the site and field unless every field is well-formed; returns self."""
        where = "plan"
        _text(self.model, where, "model")
        if self.init not in ("analytic", "zero"):
            _fail(where, f"'init' must be 'analytic' or 'zero', got {self.init!r}")
        xi_step = _numbers([self.xi_step], where, "xi_step")[0]
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
        for i, entry in enumerate(self.centers):
            if not (isinstance(entry, tuple) and len(entry) == 2):
                _fail(f"centers[{i}]", "must be (site name, values)")
            name, values = entry
            _text(name, f"centers[{i}]", "name")
            where_c = f"centers['{name}']"
            if name in seen:
                _fail(where_c, "appears twice")
            seen.add(name)
            values = _numbers(values, where_c, "values")
            if name in sizes and len(values) != sizes[name]:
                _fail(where_c, f"has {_values(len(values))}, expected {sizes[name]} (the size of site '{name}')")
        return self

    def save(self, path) -> None:
        """Write the plan as JSON (atomically: a failed write leaves no half-written file)."""
        from .files import write_atomic

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

    def to_config(self, learn: bool = True):
        """A NumPyro reparam config; apply it with ``handlers.reparam(config.record(model), config=config)``."""
        from .reparam import build_config

        return build_config(self, learn=learn)

    def __str__(self) -> str:
        with_offsets = [s for s in self.sites if s.offsets]
        nc = [s for s in self.sites if s.noncentred]
        lines = [f"plan for {self.model}: {len(with_offsets)} site{'s' if len(with_offsets) != 1 else ''} "
                 f"with offsets, {len(nc)} non-centred (xi init: {self.init})"]
        if not self.sites:
            lines.append("  (empty: the model is left as it is)")
        width = max((len(s.name) for s in self.sites), default=0)
        for s in self.sites:
            parts = [f"{o.parent} ({o.structure}, xi {_summary(o.init)})" for o in s.offsets]
            line = f"  {s.name:<{width}}"
            if parts:
                line += " <- " + ", ".join(parts)
            if s.noncentred:
                line += f"  non-centred (centered {_summary(s.centered)}{', learned' if s.learn_centered else ''})"
            lines.append(line)
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _summary(values) -> str:
    v = np.asarray(values, dtype=float)
    if v.size == 1 or f"{v.min():.2f}" == f"{v.max():.2f}":
        return f"{v.flat[0]:.2f}"
    return f"{v.min():.2f}..{v.max():.2f}"


# -- building a plan from a report ----------------------------------------------------------------
def build_plan(report, init: str = "analytic", noncentre: Any = "auto", at: dict | None = None,
               guard: bool = True) -> Plan:
    """Derive a plan from a report: offsets along every additive pair, non-centring of funnels.

    With ``guard`` (the default) and the analytic init, an offset or non-centring that makes the
    log joint worse conditioned at the curvature point is dropped, with a note in ``plan.notes``.
    """
    if init not in ("analytic", "zero"):
        raise InputError(f"init must be 'analytic' or 'zero', got {init!r}")
    if noncentre not in ("auto", True, False, None):
        raise InputError(f"noncentre must be 'auto', True or False, got {noncentre!r}")
    from .trace import data_evaluated_eagerly, isolated_from_handlers

    with isolated_from_handlers(), data_evaluated_eagerly():
        return _build_plan(report, init, noncentre, at, guard)


def _build_plan(report, init, noncentre, at, guard=True) -> Plan:
    sites = report.sites
    mt = report.model_trace
    latent = [n for n, s in sites.items() if s.type == "latent"]
    eligible = {n for n in latent if sites[n].support in ("real", "real_vector") and not sites[n].is_discrete}

    pairs: dict[tuple[str, str], Any] = {}
    for inv in report.additive():
        a, b = inv.sites
        if b in eligible and (b, a) not in pairs:
            pairs[(b, a)] = inv
    for name in latent:
        if name not in eligible and any(b == name for b, _ in pairs):
            report.notes.append(f"site '{name}' has support {sites[name].support}; it gets no offsets")

    xi: dict[tuple[str, str], np.ndarray] = {}
    centered: dict[str, np.ndarray] = {}
    centers: dict[str, tuple[float, ...]] = {}
    curv = None
    funnel_sites = [f.site for f in report.funnels if f.site in eligible] if noncentre else []
    families = {f.__name__ for f in LOC_SCALE_FAMILIES}
    for name in [n for n in funnel_sites if sites[n].distribution not in families]:
        funnel_sites.remove(name)
        report.notes.append(f"site '{name}' is {sites[name].distribution}, which autoreparam cannot non-centre "
                            f"(it can: {', '.join(sorted(families))}); it is left centred")
    if init == "analytic" and (pairs or funnel_sites):
        curv = _Curvature(mt, at, report.hyperparameters)
        for (b, a), inv in pairs.items():
            xi[(b, a)] = curv.response(b, a, inv, pairs)
        for name in funnel_sites:
            centered[name] = curv.centeredness(name)
        for _, a in pairs:
            centers[a] = tuple(float(v) for v in np.ravel(np.asarray(curv.point[a])))
    candidates = []
    for (b, a), inv in pairs.items():
        site = sites[b]
        n_batch = int(np.prod(site.batch_shape, dtype=np.int64))
        init_xi = xi.get((b, a), np.zeros(n_batch))
        candidates.append((b, Offset(a, SparseMap.from_scipy(inv.absorption.E), SparseMap.from_scipy(inv.absorption.M),
                                     tuple(float(v) for v in np.ravel(init_xi)), inv.structure)))
    order = tuple(latent)
    candidates.sort(key=lambda co: (order.index(co[0]), order.index(co[1].parent)))

    plan_sites = []
    for name in latent:
        offs = tuple(o for c, o in candidates if c == name)
        site = sites[name]
        n_batch = int(np.prod(site.batch_shape, dtype=np.int64))
        cen = None
        if name in funnel_sites:
            # Analytic centredness near 1 means the data dominate: the centred form is right.
            c = np.ravel(centered.get(name, np.full(n_batch, 0.5)))
            if c.min() < CENTRED_ENOUGH:
                cen = tuple(float(v) for v in c)
        if offs or cen is not None:
            plan_sites.append(SitePlan(name, tuple(site.shape), tuple(site.batch_shape), offs, cen))
    notes: list[str] = []
    if curv is not None and plan_sites and guard:
        # Never make the geometry worse: drop what worsens the conditioning at the curvature point.
        from .conditioning import check_plan_sites

        try:
            plan_sites, notes, _ = check_plan_sites(curv, plan_sites, centers, report.hyperparameters,
                                                         report.funnels)
        except Exception as exc:  # the check is a safety net: an unchecked plan beats no plan
            notes = [f"the conditioning check could not run ({type(exc).__name__}); the plan is unchecked"]
        report.notes.extend(notes)
    shapes = tuple((n, tuple(sites[n].shape), tuple(sites[n].batch_shape)) for n in latent)
    return Plan(report.model_name, tuple(plan_sites), tuple(candidates), shapes, init,
                tuple(sorted(centers.items(), key=lambda kv: order.index(kv[0]))),
                ANALYTIC_XI_STEP if init == "analytic" else 1.0, notes=tuple(notes))


class _Curvature:
    """Hessian-vector products of the negative log joint at one point (jit once, reuse).

    The point is ``at`` if given (a dict of latent values, or ``"median"`` for the prior
    median). By default (``at=None`` or ``"map"``) it starts at the prior median and
    maximises the log joint over every latent site except the hyperparameters (sites that
    scale other sites' priors, which a MAP would collapse), so that the observation noise
    and the effects sit where the data put them.
    """

    def __init__(self, mt, at, hyperparameters=()):
        from numpyro import handlers
        from numpyro.infer.initialization import init_to_feasible, init_to_median
        from numpyro.infer.util import log_density

        from .trace import staged_if_possible, untraceable_as_model_error

        self.mt = mt

        # The starting points run eagerly: compiled as one program, a Cauchy prior's median
        # came out a few ulps apart on eight schools, and the plan's centredness with them.
        model = handlers.substitute(handlers.seed(mt.model, 0), substitute_fn=init_to_median(num_samples=101))
        tr = handlers.trace(model).get_trace(*mt.args, **mt.kwargs)
        values = {n: s["value"] for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
        if at in (None, "map"):
            # Start the non-hyperparameters at the centre of their unconstrained space: a prior
            # median drawn from samples of a wide prior (Normal(0, 100)) lands far from the data.
            model = handlers.substitute(handlers.seed(mt.model, 0), substitute_fn=init_to_feasible)
            tr0 = handlers.trace(model).get_trace(*mt.args, **mt.kwargs)
            values.update({n: tr0[n]["value"] for n in mt.latent_names if n not in hyperparameters})
        self.names = mt.latent_names
        fixed = {n: v for n, v in values.items() if n not in self.names}
        seeded = handlers.seed(mt.model, 0)

        @staged_if_possible
        def neg_log_joint(theta):
            # The model's inputs are closed over: staged with the latent values, or evaluated
            # eagerly when the model computes sizes or numpy indices from its data.
            return -log_density(seeded, mt.args, mt.kwargs, {**theta, **fixed})[0]

        if isinstance(at, dict):
            unknown = set(at) - set(values)
            if unknown:
                raise InputError(f"at: no latent site named {', '.join(sorted(unknown))}")
            values.update({k: jnp.asarray(v) for k, v in at.items()})
        elif at in (None, "map"):
            free = [n for n in self.names if n not in hyperparameters]
            supports = {n: tr[n]["fn"].support for n in free}
            with untraceable_as_model_error():
                values.update(_map_point(neg_log_joint, {n: jnp.asarray(values[n]) for n in self.names},
                                         supports))
        elif at != "median":
            raise InputError(f"at must be None, 'map', 'median' or a dict of latent values, got {at!r}")
        self.point = {n: jnp.asarray(values[n]) for n in self.names}
        self.values = values
        self.at_map = at in (None, "map")
        # site -> (prior variance factor k^2, the site's values under that prior), set by centeredness
        self.rescaled: dict[str, tuple[float, np.ndarray]] = {}
        grad = jax.grad(neg_log_joint)
        # XLA's default options, with the point a constant of the program (XLA folds what depends
        # on it alone): xi solves a thin ridge, and other roundings move it (by 0.016 on the tensor).
        self._hvp = jax.jit(lambda t: jax.jvp(grad, (self.point,), (t,))[1])

    @functools.cached_property
    def _trace_at_point(self):
        """The model traced at the curvature point (once, for every funnel's loc and scale)."""
        from numpyro import handlers

        model = handlers.substitute(handlers.seed(self.mt.model, 0), data=self.values)
        return handlers.trace(model).get_trace(*self.mt.args, **self.mt.kwargs)

    def hvp(self, tangent: dict[str, Any]) -> dict[str, np.ndarray]:
        full = {n: jnp.asarray(tangent[n], dtype=self.point[n].dtype).reshape(self.point[n].shape)
                if n in tangent else jnp.zeros_like(self.point[n]) for n in self.names}
        from .trace import untraceable_as_model_error

        with untraceable_as_model_error():
            out = self._hvp(full)
        return {n: np.asarray(v, dtype=np.float64) for n, v in out.items()}

    def _batch_reduce(self, name, v):
        """Sum a site-shaped array over its event dims -> batch shape (flattened)."""
        site = self.mt.sites[name]
        n_batch = int(np.prod(site.batch_shape, dtype=np.int64))
        return np.asarray(v).reshape(n_batch, -1).sum(axis=1)

    def _expand(self, name, s, g):
        site = self.mt.sites[name]
        n_batch = int(np.prod(site.batch_shape, dtype=np.int64))
        return (np.asarray(s).reshape(n_batch, 1) * np.asarray(g).reshape(n_batch, -1)).reshape(site.shape)

    def response(self, b: str, a: str, inv, pairs) -> np.ndarray:
        """xi_{b|a}: B's per-element response to a shift of A along their shared direction."""
        order = self.mt.sites
        sub = inv.absorption
        u = np.asarray(sub.U @ np.ones(sub.dim)).reshape(order[a].shape)
        # Sites from b onwards that share a direction with a respond; earlier sites stay fixed.
        free = {c: p.absorption for (c, p_a), p in pairs.items()
                if p_a == a and order[c].order >= order[b].order}
        g = {c: np.asarray(m.absorb(u.ravel())).reshape(order[c].shape) for c, m in free.items()}
        names = sorted(g, key=lambda c: order[c].order)

        def op(s):
            h = self.hvp({c: self._expand(c, s[c], g[c]) for c in names})
            return {c: self._batch_reduce(c, h[c] * g[c]) for c in names}

        h_u = self.hvp({a: u})
        rhs = {c: -self._batch_reduce(c, h_u[c] * g[c]) for c in names}
        diag = {}
        for c in names:
            ones = {k: (np.ones_like(rhs[k]) if k == c else np.zeros_like(rhs[k])) for k in names}
            d = np.abs(op(ones)[c])
            diag[c] = np.where(d > 0, d, 1.0)
        s = _pcg(op, rhs, diag)
        active = self._batch_reduce(b, np.abs(g[b])) > 0
        return np.where(active, s[b], 0.0)

    def centeredness(self, name: str) -> np.ndarray:
        """Per-element centredness: the share of a site's curvature that does not come from its prior.

        At a MAP point the hyperparameters sit at their prior median, which for a vague prior
        (``Uniform(0, 100)`` on a scale) is far too wide and would call every element data-dominated.
        There the prior scale is first rescaled by the method-of-moments estimate
        ``k^2 = mean_j max(e_j^2 - 1 / d_j, 0) / scale_j^2`` over the elements with data curvature
        ``d_j > 0``, where ``e_j`` is ``a_j - loc_j`` less its mean over those elements (the deviations of
        nearly unpooled estimates include their sampling variance ``1/d_j``). Taking each element's
        positive part errs towards a wider scale, i.e. towards leaving elements centred.
        """
        site = self.mt.sites[name]
        n_batch = int(np.prod(site.batch_shape, dtype=np.int64))
        ones = np.ones(site.shape)
        total = self._batch_reduce(name, self.hvp({name: ones})[name])
        from .trace import unwrap_distribution

        fn = unwrap_distribution(self._trace_at_point[name]["fn"])
        scale = np.broadcast_to(np.asarray(fn.scale, dtype=np.float64), site.shape)
        prior = self._batch_reduce(name, 1.0 / scale**2)
        if self.at_map:
            data = total - prior
            event = int(np.prod(site.shape, dtype=np.int64)) // max(n_batch, 1)
            # Relative: an element without data gets float32 rounding (~1e-8) here, not zero.
            informed = data > 1e-4 * np.where(total > 0, total, 0.0)
            # Deviations from their mean over the informed elements, per event coordinate: the MAP
            # leaves a loc that the vague scale barely informs (a grand mean near its own prior)
            # off by a common shift, and elements without data sit at their loc.
            dev = (np.asarray(self.point[name], np.float64)
                   - np.broadcast_to(np.asarray(fn.loc, np.float64), site.shape)).reshape(n_batch, event)
            # Undo the MAP's shrinkage towards loc (by data / (data + prior)): the moments below are
            # those of unpooled estimates, and a prior scale held too small would otherwise shrink
            # the deviations that are to measure it and call every element prior-dominated.
            dev = dev * np.where(informed, total / np.where(informed, data, 1.0), 1.0)[:, None]
            unpooled = dev
            if informed.sum() > 1:
                dev = dev - dev[informed].mean(axis=0)
            dev2 = (dev**2).sum(axis=1)
            s2 = self._batch_reduce(name, scale**2) / event
            if informed.any():
                r = (dev2[informed] / event - event / data[informed]) / s2[informed]
                k2 = float(np.clip(np.mean(np.maximum(r, 0.0)), 1e-4, 1e4))
                prior = prior / k2
                total = data + prior
                # The site where the rescaled prior would put it (for the conditioning guard).
                shrink = np.where(informed, data / np.where(total > 0, total, 1.0), 0.0)[:, None]
                loc = np.broadcast_to(np.asarray(fn.loc, np.float64), site.shape)
                self.rescaled[name] = (k2, loc + (unpooled * shrink).reshape(site.shape))
        c = 1.0 - prior / np.where(total > 0, total, np.inf)
        return np.clip(np.where(total > 0, c, 0.0), 0.0, 1.0).reshape(n_batch)


def _map_point(neg_log_joint, theta: dict, supports: dict) -> dict:
    """Newton steps on the unconstrained values of the sites in ``supports`` (see ``newton_refine``)."""
    from numpyro.distributions import biject_to

    from .conditioning import newton_refine

    transforms = {n: biject_to(c) for n, c in supports.items()}
    fixed = {n: v for n, v in theta.items() if n not in transforms}
    u0 = {n: t.inv(theta[n]) for n, t in transforms.items()}

    def loss(u):
        return neg_log_joint({**fixed, **{n: t(u[n]) for n, t in transforms.items()}})

    u = newton_refine(loss, u0)
    out = {n: t(u[n]) for n, t in transforms.items()}
    if not all(bool(jnp.all(jnp.isfinite(v))) for v in out.values()):
        return {}  # keep the prior median rather than a diverged point
    return out


def _pcg(op, rhs: dict, diag: dict, maxiter: int = 200, rtol: float = 1e-6) -> dict:
    """Jacobi-preconditioned conjugate gradients on dicts of flat arrays."""
    dot = lambda x, y: sum(float(np.dot(x[k], y[k])) for k in x)  # noqa: E731
    x = {k: np.zeros_like(v) for k, v in rhs.items()}
    r = {k: v.copy() for k, v in rhs.items()}
    z = {k: r[k] / diag[k] for k in r}
    p = {k: v.copy() for k, v in z.items()}
    rz = dot(r, z)
    norm0 = np.sqrt(dot(rhs, rhs))
    if norm0 == 0:
        return x
    for _ in range(maxiter):
        ap = op(p)
        denom = dot(p, ap)
        if denom <= 0:
            break
        alpha = rz / denom
        for k in x:
            x[k] += alpha * p[k]
            r[k] -= alpha * ap[k]
        if np.sqrt(dot(r, r)) <= rtol * norm0:
            break
        z = {k: r[k] / diag[k] for k in r}
        rz_new = dot(r, z)
        p = {k: z[k] + (rz_new / rz) * p[k] for k in p}
        rz = rz_new
    return x
