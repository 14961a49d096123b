"""Additive terms, likelihood-invariant pairs and funnels of a NumPyro model.

Everything is measured, nothing assumed: the model is linearised (``jax.linearize``) at two
random points, each latent site is probed with a handful of JVPs, and a site is an additive
term of an observed site when its JVP is the same at both points. The link is read off each
distribution parameter's constraint (``log`` for a positive rate, ``logit`` for probabilities),
so ``Poisson(exp(eta))`` and ``Bernoulli(logits=eta)`` expose ``eta`` itself. The probes
recover the structure of each term (a gather with coefficients, or a small dense block) in
O(N) memory; pairs are then intersected with ``linear_maps.shared_subspace`` and every
reported direction is checked with one more JVP.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import biject_to

from .block import no_block_note, search_block
from .errors import ModelError
from .graph import build_graph
from .linear_maps import DenseMap, GatherMap, shared_subspace
from .report import Funnel, Invariance, Report, Term
from .trace import (
    _TRACER_ERRORS,
    ModelTrace,
    _SiteRecorder,
    data_evaluated_eagerly,
    describe_exception,
    isolated_from_handlers,
    site_dependencies,
    trace_model,
    untraceable_error,
    unwrap_distribution,
)

__all__ = ["analyze"]

DENSE_MAX_SIZE = 64  # latent sites up to this size get a dense map when they are not a gather
DENSE_MAX_ENTRIES = 20_000_000  # or when N * size stays under this many entries
LOCAL_MAX_SIZE = 256  # pairs checked for local (multiplicative) trade-offs: both sites this small
ADDITIVE_RTOL = 1e-4
LOC_SCALE_SUPPORTS = ("real", "real_vector")


def analyze(model: Callable, *args, **kwargs) -> Report:
    """Trace ``model(*args, **kwargs)`` and find its likelihood-invariant directions.

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
    """
    # data_evaluated_eagerly: a first call of a reparameterized model may come from inside a
    # transformation (Predictive's lax.map); the analysis itself runs on concrete values.
    with isolated_from_handlers(), data_evaluated_eagerly():
        return _analyze(model, args, kwargs)


def _analyze(model, args, kwargs) -> Report:
    mt = trace_model(model, args, kwargs)
    probe = _Probe(mt)
    notes = list(mt.notes)

    terms: dict[str, list[Term]] = {y: [] for y in mt.observed_names}
    nonadditive: dict[str, list[str]] = {y: [] for y in mt.observed_names}
    params_of: dict[tuple[str, str], tuple[str, ...]] = {}
    for a in probe.names:
        found = probe.classify(a)
        for y, (kind, lmap, params) in found.items():
            params_of[(y, a)] = params
            if kind == "additive":
                structure = ("gather" if isinstance(lmap, GatherMap) else
                             "dense" if isinstance(lmap, DenseMap) else "unstructured")
                terms[y].append(Term(y, a, params, structure, lmap))
                if lmap is None:
                    notes.append(
                        f"site '{a}' enters '{y}' additively but neither as a gather nor as a small "
                        f"dense block ({mt.sites[a].size} values); its invariances were not analysed"
                    )
            else:
                nonadditive[y].append(a)

    invariances: list[Invariance] = []
    for y in mt.observed_names:
        structured = [t for t in terms[y] if t.linear_map is not None]
        for i, ta in enumerate(structured):
            for tb in structured[i + 1:]:
                sub = shared_subspace(ta.linear_map, tb.linear_map)
                if sub.dim:
                    residual = probe.residual(y, ta.site, tb.site, sub)
                    invariances.append(Invariance(y, (ta.site, tb.site), "additive", sub.dim,
                                                  residual, sub.structure, sub))
        invariances += probe.local_tradeoffs(y, [t.site for t in terms[y]], nonadditive[y], params_of)
    invariances.sort(key=lambda inv: (mt.sites[inv.observed].order, mt.sites[inv.sites[0]].order,
                                      mt.sites[inv.sites[1]].order))

    funnels = probe.funnels()
    parents = site_dependencies(mt, {**probe.theta1, **probe.fixed})
    if parents is None:
        parents = probe.jvp_dependencies()
    graph = build_graph(mt.sites, parents, invariances)
    block, left_out = search_block(mt)
    if block is None:
        notes.append(no_block_note(left_out))
    return Report(_model_name(model), mt.sites, graph, terms, invariances, funnels, notes, mt,
                  probe.hyperparameters(), block)


def _model_name(model) -> str:
    return getattr(model, "__qualname__", None) or getattr(model, "__name__", None) or type(model).__name__


def _linked(value, constraint):
    """The parameter on the unconstrained scale of its constraint (the link), or None."""
    if constraint.is_discrete or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
        return None
    try:
        return biject_to(constraint).inv(value)
    except Exception:  # noqa: BLE001 - a constraint without a bijection: use the raw parameter
        return value


class _Probe:
    """The model linearised at two random points, with JVP probes per latent site."""

    def __init__(self, mt: ModelTrace):
        self.mt = mt
        self.names = mt.latent_names
        p1, p2 = mt.point(1), mt.point(2)
        self.fixed = {n: v for n, v in p1.items() if n not in self.names}
        self.theta1 = {n: jnp.asarray(p1[n]) for n in self.names}
        self.theta2 = {n: jnp.asarray(p2[n]) for n in self.names}
        self.rng = np.random.default_rng(0)
        self._check_traceable()
        self.lin1 = self._linearize(self.theta1)
        self.lin2 = self._linearize(self.theta2)
        self.layout = self._layout()
        self._dense_cache: dict[str, dict[str, np.ndarray]] = {}
        self._probes: dict[str, dict] = {}

    # -- the linearised model -------------------------------------------------------------
    def _outputs(self, values):
        tr = self.mt.run({**values, **self.fixed})
        out = {}
        for name, site in tr.items():
            if site["type"] != "sample":
                continue
            base = unwrap_distribution(site["fn"])
            params = {}
            for p, c in base.arg_constraints.items():
                if not hasattr(base, p):
                    continue
                v = _linked(jnp.asarray(getattr(base, p)), c)
                if v is not None:
                    params[p] = v
            out[name] = params
        return out

    def _check_traceable(self):
        """Python control flow on latent values breaks jit/NUTS: find it with a batch of two points."""
        stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), self.theta1, self.theta2)
        recorder = _SiteRecorder()
        try:
            with recorder:
                jax.vmap(self._outputs)(stacked)
        except _TRACER_ERRORS as exc:
            raise untraceable_error(exc, recorder) from exc
        except Exception:  # noqa: BLE001 - vmap is only a probe for control flow; linearize reports the rest
            pass

    def _linearize(self, theta):
        try:
            _, f = jax.linearize(self._outputs, theta)
        except _TRACER_ERRORS as exc:
            raise untraceable_error(exc) from exc
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"the model raised {describe_exception(exc)} when differentiated "
                             "with respect to its latent sites") from exc
        return jax.jit(f)

    def _layout(self):
        """Per sample site: the parameter names and their slices in the flattened output."""
        shapes = jax.tree.map(jnp.shape, self._outputs(self.theta1))
        layout = {}
        for name, params in shapes.items():
            start, slices = 0, {}
            for p, s in params.items():
                n = int(np.prod(s, dtype=np.int64))
                slices[p] = slice(start, start + n)
                start += n
            layout[name] = (slices, start)
        return layout

    def _tangent(self, updates: dict[str, np.ndarray]):
        return {
            n: (jnp.asarray(updates[n], dtype=self.theta1[n].dtype).reshape(self.theta1[n].shape)
                if n in updates else jnp.zeros_like(self.theta1[n]))
            for n in self.names
        }

    def _flat(self, out, site) -> np.ndarray:
        slices, _ = self.layout[site]
        parts = [np.ravel(np.asarray(out[site][p], dtype=np.float64)) for p in slices]
        return np.concatenate(parts) if parts else np.zeros(0)

    def jvp(self, updates, which: int = 1):
        return (self.lin1 if which == 1 else self.lin2)(self._tangent(updates))

    # -- terms ------------------------------------------------------------------------------
    def _site_probes(self, a: str) -> dict:
        if a not in self._probes:
            size = self.mt.sites[a].size
            r = self.rng.standard_normal(size)
            r2 = self.rng.standard_normal(size)
            self._probes[a] = {
                "r": r, "r2": r2,
                "at1": self.jvp({a: r}, 1), "at2": self.jvp({a: r}, 2),
            }
        return self._probes[a]

    def depends(self, a: str, site: str, param: str | None = None) -> bool:
        pr = self._site_probes(a)
        for out in (pr["at1"], pr["at2"]):
            values = out[site].values() if param is None else [out[site][param]] if param in out[site] else []
            if any(np.any(np.asarray(v) != 0) for v in values):
                return True
        return False

    def classify(self, a: str) -> dict[str, tuple[str, Any, tuple[str, ...]]]:
        """For each observed site that reads ``a``: additive or not, its linear map, the params."""
        pr = self._site_probes(a)
        size = self.mt.sites[a].size
        found = {}
        gather_probe = None
        for y in self.mt.observed_names:
            v1, v2 = self._flat(pr["at1"], y), self._flat(pr["at2"], y)
            if not (v1.any() or v2.any()):
                continue
            slices, _ = self.layout[y]
            params = tuple(p for p, sl in slices.items() if v1[sl].any() or v2[sl].any())
            tol = ADDITIVE_RTOL * (np.abs(v1) + np.abs(v2)) + 1e-6 * max(np.abs(v1).max(), 1e-30)
            if not np.all(np.abs(v1 - v2) <= tol):
                found[y] = ("local", None, params)
                continue
            if gather_probe is None:
                gather_probe = (self.jvp({a: np.ones(size)}), self.jvp({a: np.arange(size, dtype=float)}),
                                self.jvp({a: pr["r2"]}))
            lmap = self._gather(y, size, gather_probe, pr["r2"])
            if lmap is None and (size <= DENSE_MAX_SIZE or size * v1.size <= DENSE_MAX_ENTRIES):
                lmap = DenseMap(self.dense_jacobian(a, y))
            found[y] = ("additive", lmap, params)
        return found

    def _gather(self, y, size, probe, r2) -> GatherMap | None:
        c = self._flat(probe[0], y)
        s = self._flat(probe[1], y)
        actual = self._flat(probe[2], y)
        on = c != 0
        index = np.zeros(c.size, dtype=np.int64)
        index[on] = np.clip(np.rint(s[on] / c[on]), 0, size - 1).astype(np.int64)
        predicted = np.where(on, c * r2[index], 0.0)
        scale = max(np.abs(actual).max(), 1e-30)
        if not np.all(np.abs(actual - predicted) <= ADDITIVE_RTOL * np.abs(actual) + 1e-6 * scale):
            return None
        return GatherMap(index, np.where(on, c, 0.0), size)

    def dense_jacobian(self, a: str, y: str) -> np.ndarray:
        """d y's parameters / d a as an N_y x size matrix (only for small sites)."""
        key = (a, y)
        if key not in self._dense_cache:
            size = self.mt.sites[a].size
            slices, _ = self.layout[y]

            def column(t):
                out = self.lin1(self._tangent({a: t}))[y]
                return jnp.concatenate([jnp.ravel(out[p]) for p in slices]) if slices else jnp.zeros(0)

            basis_fn = jax.jit(jax.vmap(column))
            blocks = [np.asarray(basis_fn(jnp.asarray(np.eye(size, dtype=np.float32)[s:s + 64])))
                      for s in range(0, size, 64)]
            self._dense_cache[key] = np.concatenate(blocks, axis=0).T.astype(np.float64)
        return self._dense_cache[key]

    # -- pairs ------------------------------------------------------------------------------
    def residual(self, y: str, a: str, b: str, sub, rows=None) -> float:
        """Relative change of y's parameters along a random direction (U r, -E r)."""
        r = self.rng.standard_normal(sub.dim)
        da, db = sub.U @ r, -(sub.E @ r)
        moved = self._flat(self.jvp({a: da, b: db}), y)
        alone = self._flat(self.jvp({a: da}), y)
        if rows is not None:
            moved, alone = moved[rows], alone[rows]
        return float(np.linalg.norm(moved) / max(np.linalg.norm(alone), 1e-30))

    def local_tradeoffs(self, y: str, additive: list[str], nonadditive: list[str],
                        params_of: dict) -> list[Invariance]:
        """Directions that leave y unchanged only at a point (products of latent sites).

        Checked with dense Jacobians, so only for small sites, and only for pairs that enter
        a common distribution parameter (elsewhere their effects cannot cancel).
        """
        out = []
        order = self.mt.sites
        slices, n_rows = self.layout[y]
        candidates = sorted(set(additive) | set(nonadditive), key=lambda n: order[n].order)
        small = [n for n in candidates if order[n].size <= LOCAL_MAX_SIZE]
        for i, a in enumerate(small):
            for b in small[i + 1:]:
                if a not in nonadditive and b not in nonadditive:
                    continue
                common = set(params_of[(y, a)]) & set(params_of[(y, b)])
                if not common:
                    continue
                rows = np.concatenate([np.arange(n_rows)[slices[p]] for p in slices if p in common])
                if rows.size * (order[a].size + order[b].size) > DENSE_MAX_ENTRIES:
                    continue
                ja = DenseMap(self.dense_jacobian(a, y)[rows])
                jb = DenseMap(self.dense_jacobian(b, y)[rows])
                sub = shared_subspace(ja, jb)
                if sub.dim:
                    out.append(Invariance(y, (a, b), "multiplicative", sub.dim,
                                          self.residual(y, a, b, sub, rows), "local"))
        return out

    # -- funnels and dependencies -----------------------------------------------------------
    def funnels(self) -> list[Funnel]:
        out = []
        for theta in self.names:
            site = self.mt.sites[theta]
            if site.support not in LOC_SCALE_SUPPORTS or not {"loc", "scale"} <= set(site.params):
                continue
            scale_parents = tuple(a for a in self.names if a != theta and self.depends(a, theta, "scale"))
            if scale_parents:
                loc_parents = tuple(a for a in self.names if a != theta and self.depends(a, theta, "loc"))
                out.append(Funnel(theta, site.distribution, scale_parents, loc_parents))
        return out

    def hyperparameters(self) -> tuple[str, ...]:
        """Latent sites read by another latent site's prior through a parameter other than ``loc``."""
        return tuple(
            h for h in self.names
            if any(self.depends(h, s, p) for s in self.names if s != h for p in self.layout[s][0] if p != "loc")
        )

    def jvp_dependencies(self) -> dict[str, set[str]]:
        deps: dict[str, set[str]] = {}
        for site in self.layout:
            deps[site] = {a for a in self.names if a != site and self.depends(a, site)}
        return deps
