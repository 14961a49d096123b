"""An independent dense-Jacobian oracle for likelihood-invariant pairs (small models only).

It shares nothing with ``autoreparam`` but the definitions:

* the latent sites are the continuous, unobserved sample sites of the model; their values are
  drawn with ``init_to_uniform`` at two seeds of our own (not the package's);
* each observed site is represented by its distribution's parameters (those listed in
  ``arg_constraints``), each taken through ``biject_to(constraint).inv`` (the link: ``log`` for
  a positive rate, ``logit`` for probabilities), flattened and concatenated;
* ``J_A`` is the dense Jacobian (``jax.jacfwd``) of those parameters with respect to the
  flattened UNCONSTRAINED value of site ``A`` (``biject_to(support).inv``; the identity for real
  sites), taken at both points, and all linear algebra is float64 numpy SVDs. Directions and dims
  are thus those of the sites' degrees of freedom (one for a 2 x 2 ``LKJCholesky``).

For an observed site and a pair {A, B} that it depends on:

* local dim  = rank(J_A) + rank(J_B) - rank([J_A, J_B])             at point 1
* global dim = nullity([[J_A1, J_B1], [J_A2, J_B2]])                 directions invariant at both
               - nullity([J_A1; J_A2]) - nullity([J_B1; J_B2])       minus the trivial ones

A pair is "additive" when its global dim is positive and "local" (only at a point) when the
global dim is 0 but the local dim is positive. Inside one site A, the directions that the observed
site sees at neither point number nullity([J_A1; J_A2]), counted on the values of A it reads. One direction of every additive pair is
verified by a finite step: the observed site's ``log_prob`` at the data does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.infer.initialization import init_to_uniform

__all__ = ["OracleResult", "oracle", "rank", "null_space", "orth"]

ORACLE_SEEDS = (101, 202)
RANK_RTOL = 1e-5  # relative to the largest singular value; float32 Jacobians, O(1) structure


def _column_scale(m: np.ndarray) -> np.ndarray:
    """1 / column norms (1 for zero columns): ranks and nullities do not depend on units."""
    norms = np.linalg.norm(m, axis=0)
    return 1.0 / np.where(norms > 0, norms, 1.0)


def rank(m: np.ndarray) -> int:
    """Numerical rank, after scaling every column to unit norm."""
    if m.size == 0:
        return 0
    s = np.linalg.svd(m * _column_scale(m), compute_uv=False)
    if s[0] == 0:
        return 0
    return int(np.count_nonzero(s > RANK_RTOL * s[0]))


def null_space(m: np.ndarray) -> np.ndarray:
    """Orthonormal basis (columns) of the null space of ``m`` (rank decided as in ``rank``)."""
    n = m.shape[1]
    if m.shape[0] == 0 or n == 0:
        return np.eye(n)
    d = _column_scale(m)
    _, s, vt = np.linalg.svd(m * d, full_matrices=True)
    if s[0] == 0:
        return np.eye(n)
    r = int(np.count_nonzero(s > RANK_RTOL * s[0]))
    basis = d[:, None] * vt[r:].T  # m @ (d * x) = 0 for x in null(m * d)
    return np.linalg.qr(basis)[0] if basis.shape[1] else basis


def orth(m: np.ndarray) -> np.ndarray:
    """Orthonormal basis (columns) of the range of ``m`` (columns scaled to unit norm first)."""
    if m.size == 0:
        return np.zeros((m.shape[0], 0))
    u, s, _ = np.linalg.svd(m * _column_scale(m), full_matrices=False)
    if s[0] == 0:
        return np.zeros((m.shape[0], 0))
    return u[:, s > RANK_RTOL * s[0]]


def _unwrap(fn):
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _linked_params(fn) -> jnp.ndarray:
    base = _unwrap(fn)
    parts = []
    for name, constraint in base.arg_constraints.items():
        if not hasattr(base, name) or constraint.is_discrete:
            continue
        value = jnp.asarray(getattr(base, name))
        if not jnp.issubdtype(value.dtype, jnp.floating):
            continue
        try:
            value = biject_to(constraint).inv(value)
        except NotImplementedError:
            pass
        parts.append(jnp.ravel(value))
    return jnp.concatenate(parts) if parts else jnp.zeros(0)


@dataclass
class OracleResult:
    latent: list[str]  # continuous latent sites, program order
    observed: list[str]
    sizes: dict[str, int]
    # jac[which][obs][site]: (n_params_of_obs, size_of_site) float64, which in (0, 1)
    jac: tuple[dict, dict]
    additive: dict[tuple[str, str, str], int] = field(default_factory=dict)
    local_only: set[tuple[str, str, str]] = field(default_factory=set)
    local_dims: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # directions inside one site: {(observed, site): nullity of [J_1; J_2] on the values it reads}
    within: dict[tuple[str, str], int] = field(default_factory=dict)
    depends: dict[str, list[str]] = field(default_factory=dict)
    # one verified invariant direction per additive pair: (da, db) flat
    directions: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    step_checks: dict[tuple[str, str, str], tuple[float, float]] = field(default_factory=dict)
    points: tuple[dict, dict] | None = None  # latent values at the two points
    params_at: object = None  # values -> {observed: flat linked params}

    def point(self, which: int = 0) -> dict:
        return dict(self.points[which])

    def J(self, obs: str, site: str, which: int = 0) -> np.ndarray:
        return self.jac[which][obs][site]

    def shared_basis(self, obs: str, a: str, b: str) -> np.ndarray:
        """Orthonormal basis of S = range(J_A) & range(J_B) (at point 1), in parameter space."""
        qa, qb = orth(self.J(obs, a)), orth(self.J(obs, b))
        if qa.shape[1] == 0 or qb.shape[1] == 0:
            return np.zeros((qa.shape[0], 0))
        u, cos, _ = np.linalg.svd(qa.T @ qb, full_matrices=False)
        return qa @ u[:, cos > 1.0 - 1e-6]

    def shared_projector(self, obs: str, a: str, b: str) -> np.ndarray:
        """Orthogonal projector onto S = range(J_A) & range(J_B) (at point 1)."""
        q = self.shared_basis(obs, a, b)
        return q @ q.T

    def shared_part_of_a(self, obs: str, a: str, b: str) -> np.ndarray:
        """Columns v (one per dim of S) with J_A v spanning S."""
        ja = self.J(obs, a)
        q = self.shared_basis(obs, a, b)
        d = _column_scale(ja)
        v = d[:, None] * np.linalg.lstsq(ja * d, q, rcond=None)[0]
        return np.linalg.qr(v)[0] if v.shape[1] else v


class _Model:
    def __init__(self, model, args, kwargs):
        self.model, self.args, self.kwargs = model, args, kwargs

    def trace(self, values=None, seed=0, substitute_fn=None):
        m = handlers.seed(self.model, seed)
        if values is not None:
            m = handlers.substitute(m, data=values)
        elif substitute_fn is not None:
            m = handlers.substitute(m, substitute_fn=substitute_fn)
        return handlers.trace(m).get_trace(*self.args, **self.kwargs)


def oracle(model, *args, check_steps: bool = True, **kwargs) -> OracleResult:
    m = _Model(model, args, kwargs)
    points = [m.trace(seed=s, substitute_fn=init_to_uniform(radius=2)) for s in ORACLE_SEEDS]
    tr0 = points[0]
    latent = [n for n, s in tr0.items()
              if s["type"] == "sample" and not s["is_observed"] and not s["fn"].support.is_discrete]
    observed = [n for n, s in tr0.items() if s["type"] == "sample" and s["is_observed"]]
    fixed = {n: s["value"] for n, s in tr0.items()
             if s["type"] == "sample" and not s["is_observed"] and n not in latent}
    transforms = [{n: biject_to(p[n]["fn"].support) for n in latent} for p in points]
    unconstrained = [{n: t[n].inv(jnp.asarray(p[n]["value"])) for n in latent} for t, p in zip(transforms, points)]
    sizes = {n: int(np.size(unconstrained[0][n])) for n in latent}

    def params(values):
        tr = m.trace({**values, **fixed})
        return {o: _linked_params(tr[o]["fn"]) for o in observed}

    jac_fn = jax.jit(jax.jacfwd(params))
    jacs = []
    for which, p in enumerate(points):
        theta = {n: jnp.asarray(p[n]["value"]) for n in latent}
        raw = jac_fn(theta)
        # chain rule: d params / d u = d params / d theta @ d theta / d u (the support's bijection)
        dtheta_du = {n: np.asarray(jax.jacfwd(transforms[which][n])(unconstrained[which][n]),
                                   dtype=np.float64).reshape(np.size(theta[n]), sizes[n]) for n in latent}
        jacs.append({o: {n: np.asarray(raw[o][n], dtype=np.float64).reshape(-1, np.size(theta[n])) @ dtheta_du[n]
                         for n in latent} for o in observed})
    res = OracleResult(latent, observed, sizes, (jacs[0], jacs[1]))
    res.points = tuple({n: jnp.asarray(p[n]["value"]) for n in latent} for p in points)
    res.params_at = lambda values: {o: np.asarray(v, dtype=np.float64) for o, v in params(values).items()}

    for o in observed:
        deps = [n for n in latent if np.any(jacs[0][o][n] != 0) or np.any(jacs[1][o][n] != 0)]
        res.depends[o] = deps
        for n in deps:
            stacked = np.vstack([jacs[0][o][n], jacs[1][o][n]])
            read = stacked[:, np.linalg.norm(stacked, axis=0) > 0]
            if read.shape[1] - rank(read) > 0:
                res.within[(o, n)] = read.shape[1] - rank(read)
        for i, a in enumerate(deps):
            for b in deps[i + 1:]:
                ja1, jb1 = jacs[0][o][a], jacs[0][o][b]
                ja2, jb2 = jacs[1][o][a], jacs[1][o][b]
                local = rank(ja1) + rank(jb1) - rank(np.hstack([ja1, jb1]))
                both = np.block([[ja1, jb1], [ja2, jb2]])
                n_both = both.shape[1] - rank(both)
                n_a = ja1.shape[1] - rank(np.vstack([ja1, ja2]))
                n_b = jb1.shape[1] - rank(np.vstack([jb1, jb2]))
                glob = n_both - n_a - n_b
                key = (o, a, b)
                res.local_dims[key] = local
                if glob > 0:
                    res.additive[key] = glob
                    d = _nontrivial_direction(both, ja1.shape[1], np.vstack([ja1, ja2]),
                                              np.vstack([jb1, jb2]))
                    res.directions[key] = d
                elif local > 0:
                    res.local_only.add(key)
    if check_steps:
        for key, (da, db) in res.directions.items():
            res.step_checks[key] = _step_check(m, points, latent, fixed, transforms, key, da, db)
    return res


def _nontrivial_direction(both, n_a, ja_stack, jb_stack):
    """A unit vector of null(both) orthogonal to null(J_A) x 0 and 0 x null(J_B)."""
    nb = null_space(both)
    na, nbb = null_space(ja_stack), null_space(jb_stack)
    trivial = np.zeros((both.shape[1], na.shape[1] + nbb.shape[1]))
    trivial[:n_a, : na.shape[1]] = na
    trivial[n_a:, na.shape[1]:] = nbb
    if trivial.shape[1]:
        nb = nb - trivial @ (trivial.T @ nb)
    u, s, _ = np.linalg.svd(nb, full_matrices=False)
    v = u[:, 0]
    return v[:n_a], v[n_a:]


def _step_check(m, points, latent, fixed, transforms, key, da, db) -> tuple[float, float]:
    """Step along (da, db) at both points; the observed site's log_prob must not change.

    Returns (worst relative change along the invariant direction, smallest relative change
    along a random direction of the same length); relative to 1 + sum |log_prob elements|.
    """
    o, a, b = key
    rng = np.random.default_rng(0)
    worst_inv, least_rnd = 0.0, np.inf
    size = 0.5 / max(np.abs(da).max(initial=0), np.abs(db).max(initial=0))
    for p, transform in zip(points, transforms):
        base = {n: jnp.asarray(p[n]["value"]) for n in latent}
        u = {n: transform[n].inv(base[n]) for n in latent}

        def lp(values):
            s = m.trace({**values, **fixed})[o]
            return np.asarray(s["fn"].log_prob(s["value"]), dtype=np.float64)

        def moved(ua, ub):
            v = dict(base)
            v[a] = transform[a](u[a] + jnp.asarray(ua, dtype=u[a].dtype).reshape(jnp.shape(u[a])))
            v[b] = transform[b](u[b] + jnp.asarray(ub, dtype=u[b].dtype).reshape(jnp.shape(u[b])))
            return v

        lp0 = lp(base)
        denom = 1.0 + np.abs(lp0).sum()
        inv = abs(lp(moved(size * da, size * db)).sum() - lp0.sum()) / denom
        ra = rng.standard_normal(da.shape)
        rb = rng.standard_normal(db.shape)
        scale = size * np.sqrt(np.sum(da**2) + np.sum(db**2)) / np.sqrt(np.sum(ra**2) + np.sum(rb**2))
        rnd = abs(lp(moved(scale * ra, scale * rb)).sum() - lp0.sum()) / denom
        worst_inv, least_rnd = max(worst_inv, inv), min(least_rnd, rnd)
    return worst_inv, least_rnd
