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

from .block import block_for_report
from .errors import ModelError
from .linear_maps import DenseMap, GatherMap, shared_subspace, within_site_directions
from .notes import Note, NoteKind
from .report import Existing, Funnel, Invariance, Report, Term, WithinSite
from .trace import (
    _TRACER_ERRORS,
    ModelTrace,
    _SiteRecorder,
    data_evaluated_eagerly,
    data_staged,
    staged_if_possible,
    describe_exception,
    isolated_from_handlers,
    jit_quick,
    replayed,
    site_dependencies,
    trace_model,
    untraceable_error,
    unwrap_distribution,
)

__all__ = ["analyze_model"]

DENSE_MAX_SIZE = 64  # latent sites up to this size get a dense map when they are not a gather
DENSE_MAX_ENTRIES = 20_000_000  # or when N * size stays under this many entries
LOCAL_MAX_SIZE = 256  # pairs checked for local trade-offs: both sites this small
ADDITIVE_RTOL = 1e-4
LOC_SCALE_SUPPORTS = ("real", "real_vector")
# The parameters of a (low-rank) multivariate normal that carry its Cholesky factor.
MVN_FACTOR_PARAMS = {"MultivariateNormal": ("scale_tril", "covariance_matrix", "precision_matrix"),
                     "LowRankMultivariateNormal": ("cov_factor", "cov_diag")}


def analyze_model(model: Callable, args: tuple = (), kwargs: dict | None = None) -> tuple[Report, ModelTrace]:
    """Trace ``model(*args, **kwargs)`` and find its likelihood-invariant directions.

    Returns the report (plain data) and the model trace it was measured on: the plan's curvature
    runs the model again through it. ``autoreparam.analyze`` is the public form.

    >>> def model(y):
    ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
    ...     a = numpyro.sample("a", dist.Normal(0, 1))
    ...     numpyro.sample("y", dist.Normal(mu + a, 1), obs=y)
    >>> report, model_trace = analyze_model(model, (jnp.zeros(3),))
    >>> report.pairs(), model_trace.latent_names
    ({('y', 'mu', 'a'): 1}, ['mu', 'a'])
    """
    # data_evaluated_eagerly: a first call of a reparameterized model may come from inside a
    # transformation (Predictive's lax.map); the analysis itself runs on concrete values.
    with isolated_from_handlers(), data_evaluated_eagerly():
        return _analyze(model, tuple(args), dict(kwargs or {}))


def _analyze(model, args, kwargs) -> tuple[Report, ModelTrace]:
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
                rows = {p: (sl.start, sl.stop) for p, sl in probe.layout[y][0].items() if p in params}
                terms[y].append(Term(y, a, params, structure, lmap, rows))
                if lmap is None:
                    notes.append(Note(
                        f"site '{a}' enters '{y}' additively but neither as a gather nor as a small "
                        f"dense block ({mt.sites[a].size} values); its invariances were not analysed",
                        NoteKind.UNSTRUCTURED_TERM, site=a))
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
    within = [w for y in mt.observed_names for w in probe.within(y, terms[y], nonadditive[y])]
    invariances.sort(key=lambda inv: (mt.sites[inv.observed].order, mt.sites[inv.sites[0]].order,
                                      mt.sites[inv.sites[1]].order))

    funnels = probe.funnels()
    parents = site_dependencies(mt, {**probe.theta1, **probe.fixed})
    if parents is None:
        parents = probe.jvp_dependencies()
    block, block_note = block_for_report(mt)
    if block_note:
        notes.append(Note(block_note, NoteKind.NO_GAUSSIAN_BLOCK))
    return Report(_model_name(model), mt.sites, parents, terms, invariances, funnels, notes,
                  hyperparameters=probe.hyperparameters(), block=block,
                  existing=_existing_in_trace(mt, probe, invariances, terms), within=within), mt



def _existing_in_trace(mt: ModelTrace, probe: "_Probe", invariances: list[Invariance],
                       terms: dict[str, list[Term]]) -> list[Existing]:
    """Sites the model already non-centres: ``x_decentered`` latents, and ``a_raw`` in ``mu + tau * a_raw``.

    By hand: a latent Normal with no latent parent that has a local trade-off in a
    likelihood with a latent of positive support (its scale); its loc partners are the additive
    terms it also trades off against there.
    """
    sites = mt.sites
    out = []
    decentered = set()
    for name, site in sites.items():
        base = name[:-len("_decentered")] if name.endswith("_decentered") else None
        if site.type != "latent" or not base or sites.get(base) is None or sites[base].type != "deterministic":
            continue
        decentered.add(name)
        learned = f"{base}_centered" in sites and sites[f"{base}_centered"].type == "param"
        out.append(Existing(base, "decentered",
                            f"{base} = loc + scale * {name}: non-centred already"
                            + (f" (centredness learned in param '{base}_centered')" if learned else
                               " (LocScaleReparam or code emitted by autoreparam)")))
    local = [i for i in invariances if i.kind != "additive"]
    for name in probe.names:
        site = sites[name]
        if name in decentered or site.distribution != "Normal" or site.is_discrete:
            continue
        if any(a != name and probe.depends(a, name) for a in probe.names):
            continue  # its prior reads another latent: not a fixed standard variable
        for y in mt.observed_names:
            partners = [i.sites[0] if i.sites[1] == name else i.sites[1]
                        for i in local if i.observed == y and name in i.sites]
            scales = [p for p in partners if sites[p].support == "positive"]
            if not scales:
                continue
            additive = {t.site for t in terms[y]}
            locs = [p for p in partners if p in additive]
            loc = " + ".join(locs) + " + " if locs else ""
            out.append(Existing(name, "by hand",
                                f"{name} enters {y} as {loc}{' * '.join(scales)} * {name}, with a fixed Normal prior: "
                                "non-centred by hand"))
            break
    return out


def _model_name(model) -> str:
    return getattr(model, "__qualname__", None) or getattr(model, "__name__", None) or type(model).__name__


PROBE_BATCH_ENTRIES = 1 << 22  # at most this many output values per point in one batched JVP call


def _probe_batch(n_out: int) -> int:
    """Tangents per batched JVP call: a power of two up to 64, fewer when the outputs are large."""
    batch = 64
    while batch > 1 and batch * max(n_out, 1) > PROBE_BATCH_ENTRIES:
        batch //= 2
    return batch


def _abstractly(fn, *args):
    """``jax.eval_shape(fn, *args)``, with the data evaluated eagerly only if the model needs it."""
    return jax.eval_shape(staged_if_possible(fn), *args)


def _linked(value, constraint):
    """The parameter on the unconstrained scale of its constraint (the link), or None."""
    if constraint.is_discrete or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
        return None
    try:
        return biject_to(constraint).inv(value)
    except Exception:  # noqa: BLE001 - a constraint without a bijection: use the raw parameter
        return value


class _Probe:
    """The model linearised at two random points, with JVP probes per latent site.

    Every probe goes through one compiled function: a batch of tangents (a power of two in
    size, padded with zeros) pushed forward at both points, so that the whole analysis
    compiles the model once however many sites and pairs it probes.
    """

    def __init__(self, mt: ModelTrace):
        self.mt = mt
        self.names = mt.latent_names
        p1, p2 = mt.point(1), mt.point(2)
        self.fixed = {n: v for n, v in p1.items() if n not in self.names}
        self.theta1 = {n: jnp.asarray(p1[n]) for n in self.names}
        self.theta2 = {n: jnp.asarray(p2[n]) for n in self.names}
        self.transforms = self._support_transforms()
        # Shapes and dtypes of the unconstrained values (the values themselves are computed inside
        # the compiled pushforward).
        self.u1 = jax.eval_shape(lambda theta: self._unconstrained(theta, 0), self.theta1)
        self.rng = np.random.default_rng(0)
        self._check_traceable()
        self.layout = self._layout()
        self._offsets = {}
        start = 0
        for name, (_, n) in self.layout.items():
            self._offsets[name] = start
            start += n
        self._n_out = start
        self.batch = _probe_batch(self._n_out)
        self._pushforward = self._compile_pushforward()
        self._dense_cache: dict[str, dict[str, np.ndarray]] = {}
        self._probes: dict[str, dict] = {}

    # -- unconstrained coordinates ---------------------------------------------------------
    def _support_transforms(self) -> dict[str, tuple[Any, Any]]:
        """``biject_to(support)`` at both points for every latent site whose support is not real.

        Tangents are taken in the unconstrained space: a direction that a constrained site cannot
        move along (off the simplex, off the unit-diagonal Cholesky factors of LKJ) is no direction.
        """
        constrained = [n for n in self.names if self.mt.sites[n].support not in LOC_SCALE_SUPPORTS]
        if not constrained:
            return {}
        first = self.mt.supports_at(constrained, {**self.theta1, **self.fixed})
        # A support with array bounds may move with the point (Uniform(0, upper) with a latent upper).
        moves = any(n not in self.mt.supports for n in constrained)
        second = self.mt.supports_at(constrained, {**self.theta2, **self.fixed}) if moves else first
        return {n: (biject_to(first[n]), biject_to(second[n])) for n in constrained}

    def _unconstrained(self, theta: dict, which: int) -> dict:
        return {n: (self.transforms[n][which].inv(v) if n in self.transforms else v) for n, v in theta.items()}

    def size_of(self, name: str) -> int:
        """Degrees of freedom of a latent site: the size of its unconstrained value."""
        return int(np.prod(self.u1[name].shape, dtype=np.int64))

    def is_constrained(self, name: str) -> bool:
        return name in self.transforms

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
        stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2,) + jnp.shape(x), jnp.result_type(x)), self.theta1)
        recorder = _SiteRecorder()
        try:
            with recorder:
                _abstractly(jax.vmap(self._outputs), stacked)
        except _TRACER_ERRORS as exc:
            raise untraceable_error(exc, recorder) from exc
        except Exception:  # noqa: BLE001 - vmap is only a probe for control flow; the JVPs report the rest
            pass

    def _compile_pushforward(self):
        """jit(tangents [B, D] -> JVPs at both points [2, B, n_out]) for flat latent tangents."""
        self._dtype = np.dtype(jnp.result_type(*self.theta1.values())) if self.names else np.dtype(np.float32)
        self._starts = {}
        start = 0
        for n in self.names:
            self._starts[n] = start
            start += self.size_of(n)
        self._size = start
        transforms = self.transforms

        def unravel(t):
            return {n: jnp.reshape(t[self._starts[n]:self._starts[n] + self.size_of(n)], v.shape).astype(v.dtype)
                    for n, v in self.u1.items()}

        def constrained_tangent(u, tangent, which):
            # d theta = (d biject_to(support) / du) du: a tangent of the site's support
            return {n: (jax.jvp(transforms[n][which], (u[n],), (t,))[1] if n in transforms else t)
                    for n, t in tangent.items()}
        order = [(s, p) for s, (slices, _) in self.layout.items() for p in slices]

        @replayed  # the model traced once, not once under each point's JVP
        @staged_if_possible
        def flat_outputs(theta):
            out = self._outputs(theta)
            parts = [jnp.ravel(out[s][p]) for s, p in order]
            return jnp.concatenate(parts) if parts else jnp.zeros(0)

        def both(theta1, theta2, t):
            tangent = unravel(t)
            if not transforms:
                return (jax.jvp(flat_outputs, (theta1,), (tangent,))[1],
                        jax.jvp(flat_outputs, (theta2,), (tangent,))[1])
            with data_staged():  # the transforms' constants staged, not each compiled on its own
                u1, u2 = self._unconstrained(theta1, 0), self._unconstrained(theta2, 1)
                t1, t2 = constrained_tangent(u1, tangent, 0), constrained_tangent(u2, tangent, 1)
            return (jax.jvp(flat_outputs, (theta1,), (t1,))[1], jax.jvp(flat_outputs, (theta2,), (t2,))[1])

        return jit_quick(jax.vmap(both, in_axes=(None, None, 0)), self.batch * (self._n_out + self._size))

    def _push(self, tangents: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """JVPs of the flat outputs along each tangent ({site: values}) at points 1 and 2."""
        rows = np.zeros((len(tangents), self._size), dtype=self._dtype)
        for i, updates in enumerate(tangents):
            for n, v in updates.items():
                values = np.asarray(v).astype(self.u1[n].dtype)
                rows[i, self._starts[n]:self._starts[n] + values.size] = values.ravel()
        out1, out2 = [], []
        for s in range(0, len(tangents), self.batch):
            chunk = rows[s:s + self.batch]
            padded = np.zeros((self.batch, self._size), dtype=self._dtype)
            padded[:len(chunk)] = chunk
            try:
                a, b = self._pushforward(self.theta1, self.theta2, padded)
            except _TRACER_ERRORS as exc:
                raise untraceable_error(exc) from exc
            except ModelError:
                raise
            except Exception as exc:
                raise ModelError(f"the model raised {describe_exception(exc)} when differentiated "
                                 "with respect to its latent sites") from exc
            out1.append(np.asarray(a)[:len(chunk)])
            out2.append(np.asarray(b)[:len(chunk)])
        return np.concatenate(out1), np.concatenate(out2)

    def _layout(self):
        """Per sample site: the parameter names and their slices in the flattened output."""
        shapes = jax.tree.map(jnp.shape, _abstractly(self._outputs, self.theta1))
        layout = {}
        for name, params in shapes.items():
            start, slices = 0, {}
            for p, s in params.items():
                n = int(np.prod(s, dtype=np.int64))
                slices[p] = slice(start, start + n)
                start += n
            layout[name] = (slices, start)
        return layout

    def _flat(self, out, site) -> np.ndarray:
        start = self._offsets[site]
        return np.asarray(out[start:start + self.layout[site][1]], dtype=np.float64)

    # -- terms ------------------------------------------------------------------------------
    def _site_probes(self, a: str) -> dict:
        if not self._probes:
            # Every site's probes at once (drawn in program order, as one site at a time would).
            draws = {}
            for n in self.names:
                size = self.size_of(n)
                draws[n] = (self.rng.standard_normal(size), self.rng.standard_normal(size))
            at1, at2 = self._push([{n: draws[n][0]} for n in self.names])
            for i, n in enumerate(self.names):
                self._probes[n] = {"r": draws[n][0], "r2": draws[n][1], "at1": at1[i], "at2": at2[i]}
        return self._probes[a]

    def depends(self, a: str, site: str, param: str | None = None) -> bool:
        pr = self._site_probes(a)
        slices, n = self.layout[site]
        if param is not None and param not in slices:
            return False
        part = slice(0, n) if param is None else slices[param]
        start = self._offsets[site]
        return any(np.any(out[start:start + n][part] != 0) for out in (pr["at1"], pr["at2"]))

    def classify(self, a: str) -> dict[str, tuple[str, Any, tuple[str, ...]]]:
        """For each observed site that reads ``a``: additive or not, its linear map, the params."""
        pr = self._site_probes(a)
        size = self.size_of(a)
        found = {}
        gather_probe = None
        for y in self.mt.observed_names:
            v1, v2 = self._flat(pr["at1"], y), self._flat(pr["at2"], y)
            if not (v1.any() or v2.any()):
                continue
            slices, _ = self.layout[y]
            params = tuple(p for p, sl in slices.items() if v1[sl].any() or v2[sl].any())
            tol = ADDITIVE_RTOL * (np.abs(v1) + np.abs(v2)) + 1e-6 * max(np.abs(v1).max(), 1e-30)
            # A site of constrained support is never an additive term: the plan offsets values, and
            # a straight line in its values leaves the support (or is curved in unconstrained space).
            if self.is_constrained(a) or not np.all(np.abs(v1 - v2) <= tol):
                found[y] = ("local", None, params)
                continue
            if gather_probe is None:
                gather_probe = tuple(self._push([{a: np.ones(size)}, {a: np.arange(size, dtype=float)},
                                                 {a: pr["r2"]}])[0])
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
        """d y's parameters / d a as an N_y x size matrix at point 1 (only for small sites)."""
        return self.dense_jacobians(a, y)[0]

    def dense_jacobians(self, a: str, y: str) -> tuple[np.ndarray, np.ndarray]:
        """d y's parameters / d a at points 1 and 2 (only for small sites)."""
        key = (a, y)
        if key not in self._dense_cache:
            size = self.size_of(a)
            eye = np.eye(size, dtype=np.float32)
            start = self._offsets[y]
            blocks = []
            for columns in self._push([{a: eye[i]} for i in range(size)]):
                block = columns[:, start:start + self.layout[y][1]] if size else np.zeros((0, self.layout[y][1]))
                blocks.append(block.T.astype(np.float64))
            self._dense_cache[key] = tuple(blocks)
        return self._dense_cache[key]

    def within(self, y: str, terms: list[Term], nonadditive: list[str]) -> list[WithinSite]:
        """Directions inside one site that y sees at neither point: ``null([J_1; J_2])`` on the values read.

        A gather term has none (one value per row); a small dense term or a small non-additive site is
        checked with its dense Jacobians. Coordinates are the site's unconstrained values.
        """
        maps = {t.site: t.linear_map for t in terms if isinstance(t.linear_map, DenseMap)}
        rows = self.layout[y][1]
        for a in nonadditive:
            if self.size_of(a) <= LOCAL_MAX_SIZE and rows * self.size_of(a) <= DENSE_MAX_ENTRIES:
                maps[a] = DenseMap(np.vstack(self.dense_jacobians(a, y)))
        out = []
        for a in sorted(maps, key=lambda n: self.mt.sites[n].order):
            basis = within_site_directions(maps[a])
            if basis.shape[1]:
                n_read = int(np.count_nonzero(np.linalg.norm(maps[a].matrix, axis=0) > 0))
                out.append(WithinSite(y, a, tuple(self.u1[a].shape), basis.shape[1], n_read,
                                      self.within_residual(y, a, basis), basis, self.is_constrained(a)))
        return out

    # -- pairs ------------------------------------------------------------------------------
    def residual(self, y: str, a: str, b: str, sub, rows=None) -> float:
        """Relative change of y's parameters along a random direction (U r, -E r)."""
        r = self.rng.standard_normal(sub.dim)
        da, db = sub.U @ r, -(sub.E @ r)
        both, _ = self._push([{a: da, b: db}, {a: da}])
        moved, alone = self._flat(both[0], y), self._flat(both[1], y)
        if rows is not None:
            moved, alone = moved[rows], alone[rows]
        return float(np.linalg.norm(moved) / max(np.linalg.norm(alone), 1e-30))

    def within_residual(self, y: str, a: str, basis: np.ndarray) -> float:
        """Relative change of y's parameters along a random direction of ``basis`` (against a random move)."""
        along = basis @ self.rng.standard_normal(basis.shape[1])
        anywhere = self.rng.standard_normal(basis.shape[0]) * np.linalg.norm(along) / np.sqrt(basis.shape[0])
        out, _ = self._push([{a: along}, {a: anywhere}])
        moved, alone = self._flat(out[0], y), self._flat(out[1], y)
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
        small = [n for n in candidates if self.size_of(n) <= LOCAL_MAX_SIZE]
        for i, a in enumerate(small):
            for b in small[i + 1:]:
                if a not in nonadditive and b not in nonadditive:
                    continue
                common = set(params_of[(y, a)]) & set(params_of[(y, b)])
                if not common:
                    continue
                rows = np.concatenate([np.arange(n_rows)[slices[p]] for p in slices if p in common])
                if rows.size * (self.size_of(a) + self.size_of(b)) > DENSE_MAX_ENTRIES:
                    continue
                ja = DenseMap(self.dense_jacobian(a, y)[rows])
                jb = DenseMap(self.dense_jacobian(b, y)[rows])
                sub = shared_subspace(ja, jb)
                if sub.dim:
                    out.append(Invariance(y, (a, b), "local", sub.dim,
                                          self.residual(y, a, b, sub, rows), "local"))
        return out

    # -- funnels and dependencies -----------------------------------------------------------
    def funnels(self) -> list[Funnel]:
        out = []
        for theta in self.names:
            site = self.mt.sites[theta]
            if site.support not in LOC_SCALE_SUPPORTS:
                continue
            if site.distribution in MVN_FACTOR_PARAMS:
                # Its Cholesky factor (however given: scale_tril, covariance, precision or low rank) is its scale.
                scale_params = MVN_FACTOR_PARAMS[site.distribution]
            elif {"loc", "scale"} <= set(site.params):
                scale_params = ("scale",)
            else:
                continue
            scale_parents = tuple(a for a in self.names if a != theta
                                  and any(self.depends(a, theta, p) for p in scale_params))
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
