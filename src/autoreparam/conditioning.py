"""Geometry checks for a plan: a Newton refinement of the curvature point, and a conditioning guard.

The guard compares the log joint of the original model with the log joint of the model that a
plan's offsets and non-centring produce, both in the unconstrained coordinates NUTS samples, at
the plan's curvature point. The change of variables is written here directly from the plan's
data (without the reparam handlers), with every item switchable by a number: an offset with
``xi = 0`` and a non-centring with centredness 1 are the identity, so one compiled
Hessian-vector product serves every subset of the plan's items.

The measure is the condition number of the Jacobi-preconditioned Hessian (the diagonal stands
in for the diagonal mass matrix NUTS adapts): dense below ``DENSE_LIMIT`` unconstrained values,
otherwise the extreme eigenvalues from Lanczos on Hessian-vector products. It is taken over three
points with one preconditioner (the centre's): the centre, and the hyperparameters scaled a factor
e down and up, so that a funnel's changing curvature counts. The centre is the curvature point,
with a funnel's scale hyperparameter moved to the scale its centredness was estimated for.

On much data (``STRUCTURED_MIN_WORK``: observed values x latent values), when every observed site
reads the latent sites only through one parameter that the analysis found to be a constant linear
map of them (``linear_predictors``: ``logits = mu + a[row] + b[col]``), the dense Hessian is
assembled instead of pushing every direction through every observation: the prior and the change
of variables by a program on the sites alone, plus ``J^T L^T W L J`` with ``W`` the likelihood's
curvature per observation (on its link's scale) and ``L`` the maps, summed in float64, and the
likelihood's gradient times the change of variables' second derivatives. The likelihood's gradient
from the model itself, and its Hessian along a random direction, are compared with the maps' (and
with zero in every other site) at every point first; where they differ anywhere (a latent site read
another way, a map that does not hold there), the guard takes the model's own Hessian everywhere.

With ``OFFSETS_CHECK`` (off by default: it changes the tensor example's plan, unmeasured), offsets
are also judged on their own (``guard_offsets``): an offset is a shear of its child and
parents given everything else, so the whole log joint's condition number can be set by other
directions (an LKJ/scale block) that it does not touch. The Hessian restricted to the child and
its parents is compared with and without the offsets at the curvature point and at an
empirical-Bayes point for the hyperparameters (``offset_points``): the offsets' ``xi`` are
fitted at the hyperparameters' prior median, which for a vague scale prior can be far from
where the data put them.

Why plans lost (issue 10, the tutorial shape): 500 Adam steps of 0.05 left intercepts near 2,700
at about 3, so the method-of-moments centredness saw no spread and non-centred them fully; and
the moments were taken from shrunk estimates. Both are fixed (``newton_refine``, de-shrinking in
``Curvature.centredness``); the guard catches what one point's estimate still gets wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro.distributions import biject_to
from numpyro.distributions.transforms import IdentityTransform
from numpyro.primitives import Messenger

from .linear_maps import GatherMap, LinearMap
from .trace import jit_quick, log_joint, replayed, staged, staged_if_possible, unwrap_distribution

__all__ = ["ReparamGeometry", "LinearPredictor", "condition_number", "guard_items", "guard_offsets",
           "check_plan_sites", "linear_predictors"]

# Below this many unconstrained values the Hessian is formed densely (one vmapped HVP call).
DENSE_LIMIT = 600
LANCZOS_STEPS = 40
# How many dense Hessians the guard expects to form with one compiled program (the model as written,
# the plan and the plan less one item, each at the plan's point and a funnel point): the ``runs``
# that decides whether the program is worth LLVM's -O1 (trace.RUNTIME_BOUND_WORK).
GUARD_RUNS = 6
# A plan item is dropped when it makes the preconditioned condition number worse by more than
# this factor. The figure comes from three points near where the posterior should be, not from
# the posterior itself; a factor 3 (under 1.8 in sqrt(kappa), the leapfrog steps per independent
# draw) is within what it cannot resolve. The harmful plans of issue 10 were 10-20 times worse.
WORSE_FACTOR = 3.0


# -- the reparameterized log joint -----------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One switchable part of a plan: the offset of ``site`` from ``parent``, or its non-centring."""

    site: str
    parent: str | None  # None: the non-centring

    def describe(self) -> str:
        return f"offset {self.site} <- {self.parent}" if self.parent else f"non-centring of {self.site}"


class _ChangeOfVariables(Messenger):
    """Set each latent site from its unconstrained new coordinate (or the reverse), as a plan would.

    ``forward``: ``u`` (new coordinates) -> site values, accumulating the log-Jacobian.
    ``inverse``: ``theta`` (site values) -> ``u``, recorded in ``self.u``.
    """

    def __init__(self, fn, names, specs, coords, knobs, inverse, observed=True):
        super().__init__(fn)
        self.names, self.specs, self.coords, self.knobs, self.inverse = names, specs, coords, knobs, inverse
        self.observed = observed  # False: the observed sites' log densities left out (the prior alone)
        self.values: dict[str, Any] = {}
        self.u: dict[str, Any] = {}
        self.log_jacobian = 0.0

    def __enter__(self):
        # The state of one run of the model: a staged run that failed (Python code on the data's
        # values, int(jnp.max(g))) is run again eagerly with this handler, and must not add to what
        # it left.
        self.values, self.u, self.log_jacobian = {}, {}, 0.0
        return super().__enter__()

    def process_message(self, msg):
        name = msg.get("name")  # a numpyro.prng_key() message has none
        if msg["type"] == "sample" and msg.get("is_observed") and not self.observed:
            msg["fn"] = msg["fn"].mask(False)
        if msg["type"] != "sample" or msg.get("is_observed") or name not in self.names:
            return
        fn = msg["fn"]
        shape = tuple(msg["kwargs"].get("sample_shape", ())) + tuple(fn.shape())  # sample_shape= sites
        spec = self.specs.get(name)
        given = self.coords[name]  # unconstrained shapes can differ (LKJCholesky)
        if spec is None:
            transform = biject_to(fn.support)
            if self.inverse:
                theta, u = given, transform.inv(given)
            else:
                u, theta = given, transform(given)
            self.log_jacobian = self.log_jacobian + jnp.sum(transform.log_abs_det_jacobian(u, theta))
        else:
            theta, u, logdet = self._planned(name, fn, shape, spec, jnp.reshape(given, shape))
            self.log_jacobian = self.log_jacobian + logdet
        self.values[name] = theta
        self.u[name] = u
        msg["value"] = theta

    def _planned(self, name, fn, shape, spec, given):
        batch_shape, offsets, noncentred = spec
        # Unit event dims only: a sample_shape's dims come before the batch's, and broadcast.
        expand = lambda x: jnp.reshape(x, tuple(batch_shape) + (1,) * len(fn.event_shape))  # noqa: E731
        offset = jnp.zeros(shape)
        for parent, absorb, center in offsets:
            xi = self.knobs["xi"][(name, parent)]
            parent_value = self.values[parent] - jnp.reshape(center, jnp.shape(self.values[parent]))
            offset = offset + expand(xi) * absorb(parent_value, shape)
        if not noncentred:
            if self.inverse:
                return given, given - offset, 0.0
            return given + offset, given, 0.0
        base = unwrap_distribution(fn)
        loc = jnp.broadcast_to(base.loc, shape) - offset
        scale = jnp.broadcast_to(base.scale, shape)
        c = expand(self.knobs["centredness"][name])
        factor = scale ** (1.0 - c)
        logdet = jnp.sum((1.0 - c) * jnp.log(scale))
        if self.inverse:
            theta = given
            return theta, c * loc + (theta - offset - loc) / factor, logdet
        u = given
        return loc + factor * (u - c * loc) + offset, u, logdet


# -- the likelihood through its linear predictor -----------------------------------------------------
# From this many observed values times unconstrained latent values, the dense Hessian takes the
# likelihood's curvature from its linear predictors (``LinearPredictor``) when every observed site has
# one: pushing every latent direction through every observation (the crossed logistic example: 403
# x 15,000, six times) cost more than the rest of its analysis and plan together.
STRUCTURED_MIN_WORK = 1_000_000


@dataclass(frozen=True)
class LinearPredictor:
    """Observed site ``observed`` reads the latent sites only through its real parameter ``param``,
    a constant linear map of ``terms`` (``(site, map)``: the analysis's ``Term.linear_map`` onto the
    rows of ``param``) plus data."""

    observed: str
    param: str
    terms: tuple[tuple[str, LinearMap], ...]


def linear_predictors(terms: dict, parents: dict, latent: set[str]) -> tuple[LinearPredictor, ...] | None:
    """One ``LinearPredictor`` per observed site in ``terms`` (the report's ``{observed: [Term]}``),
    or None unless each reads its latent parents only as additive terms of one real parameter."""
    out = []
    for observed, site_terms in terms.items():
        read = _latent_reads(observed, parents, latent)
        if not site_terms and not read:
            continue  # data alone: no curvature in the latent values
        if not site_terms or {t.site for t in site_terms} != read:
            return None
        params = {t.params for t in site_terms}
        if len(params) != 1 or len(next(iter(params))) != 1:
            return None
        param = next(iter(params))[0]
        if any(t.linear_map is None or param not in t.rows for t in site_terms):
            return None
        out.append(LinearPredictor(observed, param, tuple((t.site, t.linear_map.rows(slice(*t.rows[param])))
                                                          for t in site_terms)))
    return tuple(out)


def _latent_reads(site: str, parents: dict, latent: set[str]) -> set[str]:
    """The latent sites ``site`` reads, also through deterministic sites (``s = exp(b)``: ``b``)."""
    found, seen, stack = set(), set(), list(parents.get(site, ()))
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in latent:
            found.add(name)
        elif name in parents:
            stack.extend(parents[name])
    return found


class _LikelihoodOnly(Messenger):
    """The observed sites' log densities alone, with ``shifts[y]`` added to observed site ``y``'s
    predictor parameter (``params[y]``): their derivatives are the likelihood's per observation."""

    def __init__(self, fn, shifts, params):
        super().__init__(fn)
        self.shifts, self.params = shifts, params

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        if not msg.get("is_observed"):
            msg["fn"] = msg["fn"].mask(False)
        elif msg["name"] in self.shifts:
            msg["fn"] = _shifted(msg["fn"], self.params[msg["name"]], self.shifts[msg["name"]])


class Unstructured(Exception):
    """The likelihood is not what its linear predictors say: the guard uses the model's own Hessian."""


def _shifted(fn, param, shift):
    """``fn`` with ``shift`` added to its innermost distribution's ``param`` (a pytree leaf) on the
    scale of its link, where the analysis found it linear (``log rate`` for a Poisson ``rate``)."""
    base = unwrap_distribution(fn)
    target = base.__dict__.get(param)
    leaves, tree = jax.tree.flatten(fn)
    found = [i for i, leaf in enumerate(leaves) if leaf is target]
    if base.event_shape or target is None or len(found) != 1 or jnp.shape(target) != jnp.shape(shift):
        raise Unstructured(f"{type(base).__name__}.{param}")
    try:
        link = biject_to(base.arg_constraints[param])
    except Exception:  # noqa: BLE001 - no bijection: the analysis took the raw parameter too
        link = None
    if link is None or isinstance(link, IdentityTransform):
        leaves[found[0]] = target + shift
    elif link.domain.event_dim == 0 and link.codomain.event_dim == 0:
        leaves[found[0]] = link(link.inv(target) + shift)
    else:
        raise Unstructured(f"{type(base).__name__}.{param}")
    return jax.tree.unflatten(tree, leaves)


def _weighted_gram(a: LinearMap, b: LinearMap, w: np.ndarray) -> np.ndarray:
    """``a^T diag(w) b`` (float64), never an observations x inputs matrix for a gather map."""
    if isinstance(b, GatherMap) and not isinstance(a, GatherMap):
        return _weighted_gram(b, a, w).T
    if isinstance(a, GatherMap) and isinstance(b, GatherMap):
        flat = a.index.astype(np.int64) * b.n_in + b.index
        return np.bincount(flat, weights=a.coef * w * b.coef, minlength=a.n_in * b.n_in).reshape(a.n_in, b.n_in)
    if isinstance(a, GatherMap):
        return a.rmatvec(w[:, None] * b.matrix)
    return (a.matrix * w[:, None]).T @ b.matrix


class ReparamGeometry:
    """The negative log joint of a model after a plan's items, in NUTS's unconstrained coordinates.

    ``operator(theta, knobs)`` returns ``(hvp, dense or None, n)`` at the model point ``theta``
    (constrained site values) for the items set by ``knobs`` (``{"xi": {(site, parent): array},
    "centredness": {site: array}}``): ``hvp`` maps a flat vector to a flat vector. Everything is
    compiled once per model and reused for every knob setting.
    """

    def __init__(self, mt, names, specs, fixed, likelihood: tuple[LinearPredictor, ...] | None = None):
        self.mt, self.names, self.specs, self.fixed = mt, list(names), specs, fixed
        # With ``likelihood``, the dense Hessian is the prior's and the change of variables' (a
        # program on the sites alone) plus the likelihood's J^T L^T W L J, with W its curvature per
        # observation and L the linear predictors, summed in float64 (``_structured``). Summing the
        # likelihood's curvature in float32 first and then applying J^T .. J is not exact: where an
        # offset shears away a large data curvature, it cancels (a 1e4-fold error seen before).
        self.likelihood = likelihood or None
        self._terms = sorted({site for lp in likelihood or () for site, _ in lp.terms})
        self._at_points: list = []  # [(theta, (M, g_z))]: the likelihood's parts at each point

        def run(coords, knobs, inverse):
            cov = _ChangeOfVariables(None, set(self.names), specs, coords, knobs, inverse)
            return log_joint(mt, {}, handler=cov, fixed=fixed), cov

        def to_unconstrained(theta, knobs):
            _, cov = run(theta, knobs, True)
            return {n: cov.u[n] for n in self.names}

        def neg_log_joint(u, knobs):
            logp, cov = run(u, knobs, False)
            return -(logp + cov.log_jacobian)

        size = sum(s.size for s in mt.sites.values())
        self._to_u = jit_quick(to_unconstrained, size)
        self._value = jit_quick(neg_log_joint, size)
        grad = jax.grad(replayed(neg_log_joint))
        hvp = staged(lambda u, knobs, t: jax.jvp(lambda x: grad(x, knobs), (u,), (t,))[1])
        # XLA's defaults for the single HVP: the Lanczos iterations call it hundreds of times. The
        # dense Hessian (one call per point and plan subset) compiles with the quick options: 1.0 s
        # against 4.4 s on the tensor example (220 values), for 15 ms a call against 6 ms.
        self._grad = jit_quick(staged(grad), size, options=None)
        self._hvp = jit_quick(hvp, size, options=None)

        def dense(theta, knobs, rows):
            # The whole Hessian from the point's site values, by one program: a second one mapping
            # them to unconstrained values costs more to compile (10-20 ms) than eight schools'
            # Hessian. The identity comes in as an argument: built inside, XLA folds it into a
            # larger program.
            u = to_unconstrained(theta, knobs)
            unravel = ravel_pytree(u)[1]
            return jax.vmap(lambda t: ravel_pytree(hvp(u, knobs, unravel(t)))[0])(rows)

        self._dense = jit_quick(staged(dense), size, runs=GUARD_RUNS)
        self._shapes = mt.unconstrained_shapes(self.names)
        self._to_unconstrained = to_unconstrained
        self._sites_dense = self._lik = None

    # -- the structured Hessian: prior and change of variables, plus the linear predictors' curvature
    def _build_structured(self, theta):
        mt, fixed, specs, names = self.mt, self.fixed, self.specs, set(self.names)
        params = {lp.observed: lp.param for lp in self.likelihood}
        if not set(self._terms) <= names:
            raise Unstructured("a term outside the latent sites")

        def shifted_parameters(theta):
            tr = mt.run({**theta, **fixed})
            return {y: getattr(unwrap_distribution(tr[y]["fn"]), param) for y, param in params.items()}

        self._shifts = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                    jax.eval_shape(staged_if_possible(shifted_parameters), theta))

        def likelihood_parts(theta, shifts, probe):
            # Gradients in the site values and the shifts, the shifts' (diagonal) second derivatives,
            # and one Hessian-vector product in the site values along ``probe``, for the check.
            def lik(th, sh):
                return log_joint(mt, th, handler=_LikelihoodOnly(None, sh, params), fixed=fixed)

            grad = jax.grad(replayed(lik), argnums=(0, 1))
            zeros = jax.tree.map(jnp.zeros_like, (theta, shifts))
            along = (jax.tree.map(lambda z, t: jnp.stack([z, t]), zeros[0], probe),
                     jax.tree.map(lambda z: jnp.stack([jnp.ones_like(z), z]), zeros[1]))
            (g_theta, g_shift), (h_theta, h_shift) = jax.vmap(
                lambda t: jax.jvp(grad, (theta, shifts), t), out_axes=(None, 0))(along)
            return g_theta, g_shift, jax.tree.map(lambda h: h[0], h_shift), jax.tree.map(lambda h: h[1], h_theta)

        terms = self._terms

        def sites_dense(theta, knobs, g_z, tangents):
            u = self._to_unconstrained(theta, knobs)
            unravel = ravel_pytree(u)[1]

            def phi(u):
                cov = _ChangeOfVariables(None, names, specs, u, knobs, False, observed=False)
                logp = log_joint(mt, {}, handler=cov, fixed=fixed)
                z = {n: cov.values[n] for n in terms}
                linear = sum(jnp.vdot(g_z[n], z[n]) for n in terms)
                return -(logp + cov.log_jacobian + linear), ravel_pytree(z)[0]

            grad = jax.grad(replayed(phi), has_aux=True)

            def column(t):
                h, dz = jax.jvp(grad, (u,), (unravel(t),))[1]
                return ravel_pytree(h)[0], dz

            return jax.vmap(column)(tangents)

        size = sum(s.size for s in mt.sites.values())
        self._lik = jit_quick(staged(likelihood_parts), size)
        # On the sites alone: small arrays, which XLA's quick options run in milliseconds.
        self._sites_dense = jit_quick(staged(sites_dense), size)

    def _likelihood_at(self, theta):
        """(M = sum L^T W L over the predictors, float64; g_z = the likelihood's gradient in the
        terms' values) at the point ``theta``, checked against the model's own gradient and Hessian."""
        for point, parts in self._at_points:
            if point is theta:
                return parts
        if self._lik is None:
            self._build_structured(theta)
        rng = np.random.default_rng(0)
        probe = {n: rng.standard_normal(np.shape(v)).astype(np.asarray(v).dtype) for n, v in theta.items()}
        g_theta, g_shift, h_shift, h_probe = self._lik(theta, self._shifts, probe)
        sizes = {n: int(np.size(theta[n])) for n in self._terms}
        starts = dict(zip(self._terms, np.cumsum([0, *sizes.values()])[:-1].tolist()))
        total = sum(sizes.values())
        m, m_abs = np.zeros((total, total)), np.zeros((total, total))
        g_z, bound = np.zeros(total), np.zeros(total)
        for lp in self.likelihood:
            d = np.asarray(g_shift[lp.observed], np.float64).ravel()
            w = -np.asarray(h_shift[lp.observed], np.float64).ravel()
            for site, lmap in lp.terms:
                if lmap.n_in != sizes[site] or lmap.n_out != d.size:
                    raise Unstructured(f"the map of {site} into {lp.observed}")
            for a, ma in lp.terms:
                sa = slice(starts[a], starts[a] + sizes[a])
                g_z[sa] += ma.rmatvec(d)
                bound[sa] += ma.absolute().rmatvec(np.abs(d))
                for b, mb in lp.terms:
                    sb = slice(starts[b], starts[b] + sizes[b])
                    m[sa, sb] += _weighted_gram(ma, mb, w)
                    m_abs[sa, sb] += _weighted_gram(ma.absolute(), mb.absolute(), np.abs(w))
        # The model's own gradient of its likelihood, and its Hessian along a random direction, must
        # be the predictors' (and zero in every other site): a latent site read another way (a scale
        # handler's factor, a truncation bound: no parameter of the site), or a map that does not
        # hold at this point, falls back. The Hessian sees what a zero gradient hides (b**2 at 0).
        r = np.concatenate([np.asarray(probe[n], np.float64).ravel() for n in self._terms])
        expected, bound_h = -(m @ r), m_abs @ np.abs(r)  # m is minus the likelihood's Hessian
        # A site the likelihood does not read has exactly zero derivatives (no rounding to allow for).
        for g, want, tol in ((g_theta, g_z, bound), (h_probe, expected, bound_h)):
            for name in self.names:
                actual = np.asarray(g[name], np.float64).ravel()
                if name in starts:
                    sl = slice(starts[name], starts[name] + sizes[name])
                    if not np.all(np.abs(actual - want[sl]) <= 1e-4 * tol[sl] + 1e-6 * tol[sl].max(initial=0.0)):
                        raise Unstructured(f"the likelihood's derivatives in {name}")
                elif np.any(actual != 0):
                    raise Unstructured(f"the likelihood reads {name}")
        dtype = jnp.result_type(*jax.tree.leaves(theta))
        parts = (0.5 * (m + m.T), {n: np.reshape(g_z[starts[n]:starts[n] + sizes[n]], np.shape(theta[n])).astype(dtype)
                                   for n in self._terms})
        # The guard's points (three) are visited again for each plan subset; a search over many
        # points (``offset_points``) keeps only the latest four.
        self._at_points = [*self._at_points[-3:], (theta, parts)]
        return parts

    def use_structured_at(self, points: list[dict]) -> bool:
        """Check the linear predictors at every point first, so that one comparison never mixes the
        structured Hessian at some points with the model's own at others; False: the model's own."""
        if self.likelihood:
            try:
                for point in points:
                    self._likelihood_at(point)
            except Exception:  # noqa: BLE001 - not what the predictors say (or could not run): the model's own
                self.likelihood = None
        return bool(self.likelihood)

    def _structured(self, theta, knobs, n):
        m, g_z = self._likelihood_at(theta)
        h, dz = self._sites_dense(theta, knobs, g_z, np.eye(n, dtype=jnp.result_type(*jax.tree.leaves(theta))))
        j = np.asarray(dz, np.float64)  # n x Z: row i is d z / d u_i
        return np.asarray(h, np.float64) + j @ m @ j.T

    def operator(self, theta: dict, knobs: dict, sites=None):
        """(hvp on flat vectors, dense matrix or None, size) at ``theta`` for ``knobs``.

        With ``sites``, the Hessian restricted to those sites' coordinates (the curvature of
        their conditional given every other site).
        """
        u = None
        shapes = self._shapes
        if shapes is None:  # a support moves with the values: the shapes from the values themselves
            u = self._to_u(theta, knobs)
            shapes = {name: np.shape(v) for name, v in u.items()}
        # Flat vectors in ravel_pytree's order (sorted names), assembled in numpy rather than op by op.
        names = sorted(shapes)
        sizes = {name: int(np.prod(shapes[name], dtype=np.int64)) for name in names}
        starts = dict(zip(names, np.cumsum([0, *sizes.values()])[:-1].tolist()))
        n = sum(sizes.values())
        keep = None
        if sites is not None:
            keep = np.concatenate([np.arange(starts[s], starts[s] + sizes[s]) for s in sorted(sites)])
        if n <= DENSE_LIMIT:
            h = None
            if self.likelihood:
                try:
                    h = self._structured(theta, knobs, n)
                except Exception:  # noqa: BLE001 - not what the predictors say: the model's own Hessian
                    self.likelihood = None
            if h is None:
                # Every column, also for a restriction: one compiled program for all of them.
                h = np.asarray(self._dense(theta, knobs, np.eye(n, dtype=jnp.result_type(*jax.tree.leaves(theta)))),
                               np.float64)
            h = h if keep is None else h[np.ix_(keep, keep)]
            h = 0.5 * (h + h.T)
            return (lambda v: h @ v), h, h.shape[0]
        if u is None:
            u = self._to_u(theta, knobs)
        dtype = np.dtype(jnp.result_type(*u.values()))

        def unravel(flat):  # a flat vector -> {name: values}
            return {name: flat[starts[name]:starts[name] + sizes[name]].reshape(shapes[name])
                    .astype(np.asarray(u[name]).dtype) for name in names}

        def ravel(values):
            return np.concatenate([np.asarray(values[name], np.float64).reshape(sizes[name]) for name in names])

        def hvp(v):
            if keep is not None:
                v = _embed(v, keep, n)
            out = ravel(self._hvp(u, knobs, unravel(np.asarray(v).astype(dtype))))
            return out if keep is None else out[keep]

        return hvp, None, n if keep is None else int(keep.size)


def _embed(v, index, n):
    full = np.zeros(n)
    full[index] = v
    return full


def condition_number(hvp: Callable, n: int, dense: np.ndarray | None = None, seed: int = 0,
                     steps: int = LANCZOS_STEPS, others: tuple = ()) -> float:
    """Condition number of the Jacobi-preconditioned Hessian ``D^-1/2 H D^-1/2``.

    Eigenvalues are taken in absolute value (away from a mode, e.g. at hyperparameters held at
    their prior median, the Hessian can be indefinite; a negative direction is as hard for a
    leapfrog step as a positive one of the same size). Dense below ``DENSE_LIMIT``, otherwise
    the diagonal by Rademacher probing and the extreme eigenvalues by Lanczos.

    ``others`` are further ``(hvp, dense)`` Hessians at other points (the hyperparameters moved
    along the funnel), preconditioned with the same ``D`` as the first, as NUTS's one adapted
    mass matrix must serve everywhere: the result is the largest absolute eigenvalue over all
    points over the smallest. Returns inf for a singular or non-finite Hessian.
    """
    if dense is not None:
        d = np.abs(np.diag(dense))
        d = np.where(d > 0, d, 1.0)
    else:
        d = _diagonal_estimate(hvp, n, seed)
    s = 1.0 / np.sqrt(d)
    lo, hi = float("inf"), 0.0
    for op, mat in ((hvp, dense), *others):
        if mat is not None:
            m = mat * s[:, None] * s[None, :]
            if not np.all(np.isfinite(m)):
                return float("inf")
            ev = np.abs(np.linalg.eigvalsh(m))
        else:
            ev = np.abs(lanczos_eigenvalues(lambda v: s * op(s * v), n, steps, seed))
        if ev.size == 0 or not np.all(np.isfinite(ev)):
            return float("inf")
        lo, hi = min(lo, float(ev.min())), max(hi, float(ev.max()))
    return float("inf") if lo <= hi * 1e-12 else hi / lo


def _diagonal_estimate(hvp, n, seed, probes: int = 16):
    rng = np.random.default_rng(seed)
    acc = np.zeros(n)
    for _ in range(probes):
        v = rng.choice([-1.0, 1.0], size=n)
        acc += v * hvp(v)
    d = np.abs(acc / probes)
    floor = max(float(np.median(d)) * 1e-8, 1e-300)
    return np.maximum(d, floor)


def lanczos_eigenvalues(matvec: Callable, n: int, steps: int, seed: int = 0) -> np.ndarray:
    """Ritz values of a symmetric operator after ``steps`` Lanczos steps (full reorthogonalisation)."""
    rng = np.random.default_rng(seed)
    k = min(steps, n)
    q = rng.standard_normal(n)
    q /= np.linalg.norm(q)
    basis = [q]
    alphas, betas = [], []
    for j in range(k):
        w = matvec(basis[-1])
        a = float(basis[-1] @ w)
        alphas.append(a)
        w = w - a * basis[-1] - (betas[-1] * basis[-2] if betas else 0.0)
        for b in basis:  # full reorthogonalisation: k is small
            w = w - (b @ w) * b
        beta = float(np.linalg.norm(w))
        if j == k - 1 or beta <= 1e-10 * max(abs(a), 1e-300):
            break
        betas.append(beta)
        basis.append(w / beta)
    t = np.diag(alphas) + np.diag(betas[:len(alphas) - 1], 1) + np.diag(betas[:len(alphas) - 1], -1)
    return np.linalg.eigvalsh(t)


# -- the guard ---------------------------------------------------------------------------------------
def guard_items(geometry: ReparamGeometry, theta, knobs: dict, items: list[Item],
                off_value: Callable) -> tuple[list[Item], dict]:
    """Drop items (greedily, the most harmful first) until the reparameterized log joint is no
    worse conditioned than the original; returns (dropped items, condition numbers).

    ``theta`` is the point (a dict of site values) or a list of points, the first the centre
    (see ``condition_number``'s ``others``).

    ``off_value(item)`` gives the knob values that switch an item off (xi 0, centredness 1).
    """
    points = [theta] if isinstance(theta, dict) else list(theta)

    def kappa(active):
        k = _with(knobs, [i for i in items if i not in active], off_value)
        hvp, dense, n = geometry.operator(points[0], k)
        others = tuple(geometry.operator(p, k)[:2] for p in points[1:])
        return condition_number(hvp, n, dense, others=others)

    original = kappa(set())
    active = set(items)
    current = kappa(active)
    figures = {"original": original, "plan": current}
    dropped: list[Item] = []
    if not current <= WORSE_FACTOR * original:
        # Leave-one-out once (the cost stays linear in the number of items), then drop the most
        # harmful items first until the plan is no worse than the model as written.
        ordered = sorted(items, key=lambda i: (i.site, i.parent or ""))
        trials = {i: kappa(active - {i}) for i in ordered} if len(items) > 1 else {items[0]: original}
        for item in sorted(ordered, key=lambda i: trials[i]):
            active.discard(item)
            dropped.append(item)
            current = trials[item] if len(dropped) == 1 else kappa(active)
            if current <= WORSE_FACTOR * original:
                break
    figures["kept"] = current
    return dropped, figures


def guard_offsets(geometry: ReparamGeometry, points: list[dict], knobs: dict, items: list[Item],
                  off_value: Callable) -> tuple[list[Item], dict]:
    """Drop offsets that make the conditional geometry of the sites they couple worse at any point.

    An offset ``b <- a`` shears the joint of ``b`` and its parents given everything else; its
    ``xi`` fits the hyperparameters of the curvature point, and where they move (a scale that the
    data barely determine) the right coupling moves too, so a fixed ``xi`` can be wrong over much
    of the posterior. ``guard_items`` cannot see this when stiffer directions elsewhere (an
    LKJ/scale block) set the condition number of the whole log joint. So per child site, and at
    every point (the centre and the hyperparameters moved along their funnels), compare the
    Jacobi-preconditioned condition number of the Hessian restricted to the child and its
    parents, with the child's offsets and without; the offsets are dropped (leave-one-out, the
    most harmful first) while that ratio exceeds ``WORSE_FACTOR`` at some point. Each point is
    preconditioned by its own diagonal: the comparison is of the conditional's shape, the
    scale changes between points are what ``guard_items`` judges.

    Returns (dropped items, {site: (worst ratio with all its offsets, worst ratio kept)}).
    """
    by_site: dict[str, list[Item]] = {}
    for item in items:
        if item.parent is not None:
            by_site.setdefault(item.site, []).append(item)
    dropped: list[Item] = []
    figures: dict[str, tuple[float, float]] = {}
    for site, offsets in by_site.items():
        touched = {site, *(i.parent for i in offsets)}
        without = _with(knobs, offsets, off_value)
        base = [condition_number(*_reorder(geometry.operator(p, without, touched))) for p in points]

        def worst(active):
            k = _with(knobs, [i for i in offsets if i not in active], off_value)
            ratios = [condition_number(*_reorder(geometry.operator(p, k, touched))) / b
                      for p, b in zip(points, base)]
            return max(ratios)

        active = list(offsets)
        first = current = worst(active)
        while active and not current <= WORSE_FACTOR:
            trials = {i: worst([j for j in active if j != i]) for i in active}
            item = min(active, key=lambda i: (trials[i], i.parent))
            active.remove(item)
            dropped.append(item)
            current = trials[item] if active else 1.0
        figures[site] = (first, current)
    return dropped, figures


def _reorder(operator):
    hvp, dense, n = operator
    return hvp, n, dense


def _with(knobs, off_items, off_value):
    xi = dict(knobs["xi"])
    centredness = dict(knobs["centredness"])
    for item in off_items:
        if item.parent is None:
            centredness[item.site] = off_value(item)
        else:
            xi[(item.site, item.parent)] = off_value(item)
    return {"xi": xi, "centredness": centredness}


# The hyperparameters are moved this far (in their unconstrained space, so a scale by a factor e)
# either side of the curvature point: the width of a funnel's neck that NUTS must traverse.
FUNNEL_SHIFT = 1.0


def funnel_points(curv, hyperparameters, funnels=()) -> list[dict]:
    """The guard's points: a centre, and the centre with every hyperparameter scaled down and up by
    FUNNEL_SHIFT.

    The centre is the curvature point, except where the centredness estimate rescaled a funnel's
    prior (the MAP holds a scale hyperparameter at its prior median, which can be ten times too
    small or too large): a funnel whose scale is proportional to one hyperparameter gets that
    hyperparameter scaled by the estimate's factor, and its elements the values the rescaled prior
    gives them, so that the guard judges the centredness at the scale it was estimated for.
    """
    theta = {n: jnp.asarray(curv.values[n]) for n in curv.names}
    hyper = [h for h in hyperparameters if h in theta]
    if not hyper:
        return [theta]
    centre = dict(theta)
    factors: dict[str, list[float]] = {}
    for f in funnels:
        if (f.site not in curv.rescaled or f.site not in curv.loc_scale_sites or len(f.scale_parents) != 1
                or f.scale_parents[0] not in hyper):
            continue  # (a MultivariateNormal funnel has a Cholesky factor, not a scale)
        h = f.scale_parents[0]
        doubled = {**curv.values, h: 2.0 * np.asarray(curv.values[h])}
        scale, scale2 = (np.asarray(params[f.site]["scale"], np.float64)
                         for params in (curv.site_parameters(), curv.site_parameters(doubled)))
        if not np.allclose(scale2, 2.0 * scale, rtol=1e-4):
            continue  # the scale is not proportional to the hyperparameter
        k2, values = curv.rescaled[f.site]
        factors.setdefault(h, []).append(np.sqrt(k2))
        centre[f.site] = jax.device_put(np.asarray(values, dtype=theta[f.site].dtype))
    for h, ks in factors.items():
        # float32 times float32, rounded as XLA rounds it
        centre[h] = jax.device_put(np.asarray(theta[h]) * np.asarray(float(np.exp(np.mean(np.log(ks)))),
                                                                     dtype=theta[h].dtype))
    transforms = {h: biject_to(c) for h, c in curv.mt.supports_at(hyper, curv.values).items()}
    moved = jit_quick(lambda c, shift: {h: t(t.inv(c[h]) + shift) for h, t in transforms.items()})
    points = [centre]
    for shift in (-FUNNEL_SHIFT, FUNNEL_SHIFT):
        points.append({**centre, **moved({h: centre[h] for h in hyper}, np.float32(shift))})
    return points


def offset_points(geometry: ReparamGeometry, curv, hyperparameters, original_knobs: dict) -> list[dict]:
    """The curvature point, and a point with the hyperparameters where the data put them.

    The curvature point holds the hyperparameters at their prior median (a MAP over them would
    collapse the funnels), and the offsets' ``xi`` are fitted there: with a vague ``HalfNormal(10)``
    scale (median 6.7) where the effects' spread says 0.25, an offset couples its child to its
    parent as if the data dominated each effect. The second point is an empirical-Bayes estimate:
    the hyperparameters (their unconstrained values shifted together along a grid) minimising the
    Laplace approximation of the negative log marginal, ``f(u*) + log det H(u*) / 2`` with the
    other sites ``u*`` at their conditional mode (a few dense Newton steps). Only below
    ``DENSE_LIMIT`` unconstrained values; otherwise the curvature point alone.
    """
    theta = {n: jnp.asarray(curv.values[n]) for n in curv.names}
    hyper = [h for h in hyperparameters if h in theta]
    if not hyper:
        return [theta]
    u0 = geometry._to_u(theta, original_knobs)
    rest = [n for n in sorted(u0) if n not in hyper]
    if not rest or sum(int(np.size(u0[n])) for n in u0) > DENSE_LIMIT:
        return [theta]
    trace = curv.mt.run(curv.values)
    transforms = {n: biject_to(trace[n]["fn"].support) for n in curv.names}
    flat_rest, unravel_rest = ravel_pytree({n: u0[n] for n in rest})
    dtype = flat_rest.dtype

    def to_theta(u):
        return {n: transforms[n](u[n]) for n in curv.names}

    def laplace(shift, start):
        uh = {h: u0[h] + shift for h in hyper}
        x = np.asarray(start, np.float64)
        for _ in range(NEWTON_STEPS):
            u = {**uh, **unravel_rest(jnp.asarray(x, dtype))}
            grad = geometry._grad(u, original_knobs)
            g = np.asarray(ravel_pytree({n: grad[n] for n in rest})[0], np.float64)
            h = geometry.operator(to_theta(u), original_knobs, rest)[1]
            try:
                step = np.linalg.solve(h, g)
            except np.linalg.LinAlgError:
                return float("inf"), x, u
            if not np.all(np.isfinite(step)):
                return float("inf"), x, u
            x = x - step
        u = {**uh, **unravel_rest(jnp.asarray(x, dtype))}
        h = geometry.operator(to_theta(u), original_knobs, rest)[1]
        sign, logdet = np.linalg.slogdet(h)
        value = float(geometry._value(u, original_knobs))
        return (value + 0.5 * logdet if sign > 0 and np.isfinite(value) else float("inf")), x, u

    start = np.asarray(flat_rest, np.float64)
    values = [laplace(shift, start) for shift in HYPERPARAMETER_GRID]
    k = int(np.argmin([v[0] for v in values]))
    if not np.isfinite(values[k][0]):
        return [theta]
    best = (values[k][0], values[k][2])
    if 0 < k < len(values) - 1 and np.isfinite(values[k - 1][0]) and np.isfinite(values[k + 1][0]):
        # The vertex of the parabola through the best grid value and its neighbours.
        (f0, f1, f2), step = (values[k - 1][0], values[k][0], values[k + 1][0]), HYPERPARAMETER_GRID[1] - HYPERPARAMETER_GRID[0]
        curvature = f0 - 2.0 * f1 + f2
        if curvature > 0:
            vertex = HYPERPARAMETER_GRID[k] + 0.5 * step * (f0 - f2) / curvature
            value, _, u = laplace(vertex, values[k][1])
            if value < best[0]:
                best = (value, u)
    moved = to_theta(best[1])
    if not all(bool(jnp.all(jnp.isfinite(v))) for v in moved.values()):
        return [theta]
    return [theta, {n: jnp.asarray(v, dtype=theta[n].dtype) for n, v in moved.items()}]


# The empirical-Bayes search: shifts of the hyperparameters' unconstrained values (log scales: a
# factor e per unit) from the curvature point, and Newton steps for the other sites at each.
OFFSETS_CHECK = False
HYPERPARAMETER_GRID = tuple(np.arange(-4.0, 2.01, 0.5))
NEWTON_STEPS = 4


def _summary(value) -> str:
    v = np.ravel(np.asarray(value, np.float64))
    return f"{v[0]:.2g}" if v.size == 1 else f"{v.min():.2g}..{v.max():.2g}"


def check_plan_sites(curv, plan_sites: list, anchors: dict, hyperparameters=(), funnels=(),
                     likelihood: tuple[LinearPredictor, ...] | None = None) -> tuple[list, list[str], dict]:
    """The plan's sites without the items that make the log joint worse conditioned than the model's.

    ``curv`` is the plan's curvature object (its point, names and model trace); ``plan_sites``
    the ``SitePlan``s about to go into the plan; ``likelihood`` the observed sites' linear predictors
    (``linear_predictors``), used from ``STRUCTURED_MIN_WORK``. Returns (kept sites, one note per dropped item,
    condition numbers {"original", "plan", "kept"}).
    """
    mt = curv.mt
    if any(s.type == "latent" and s.is_discrete for s in mt.sites.values()):
        return plan_sites, [], {}
    specs, xi, centredness, items = {}, {}, {}, []
    for s in plan_sites:
        offsets = []
        for off in s.offsets:
            # Converted in numpy and put on the device: as JAX operations (jnp.asarray's conversion or
            # lax.stage), each would compile on its own.
            center = jax.device_put(np.asarray(anchors.get(off.parent, 0.0), dtype=jnp.result_type(float)))
            offsets.append((off.parent, off.absorb, center))
            xi[(s.name, off.parent)] = jax.device_put(np.reshape(off.init, s.batch_shape).astype(jnp.result_type(float)))
            items.append(Item(s.name, off.parent))
        if s.noncentred:
            centredness[s.name] = jax.device_put(np.reshape(s.centredness, s.batch_shape).astype(jnp.result_type(float)))
            items.append(Item(s.name, None))
        specs[s.name] = (tuple(s.batch_shape), tuple(offsets), s.noncentred)
    if not items:
        return plan_sites, [], {}
    theta = funnel_points(curv, hyperparameters, funnels)
    fixed = {n: v for n, v in curv.values.items() if n not in curv.names}
    observed = sum(s.size for s in mt.sites.values() if s.type == "observed")
    latent = sum(mt.sites[n].size for n in curv.names)
    geometry = ReparamGeometry(mt, curv.names, specs, fixed,
                               likelihood if observed * latent >= STRUCTURED_MIN_WORK else None)
    by_site = {s.name: s for s in plan_sites}

    def off_value(item):
        shape = by_site[item.site].batch_shape
        dtype = jnp.result_type(float)
        return np.ones(shape, dtype) if item.parent is None else np.zeros(shape, dtype)

    knobs = {"xi": xi, "centredness": centredness}
    geometry.use_structured_at(theta)
    dropped, figures = guard_items(geometry, theta, knobs, items, off_value)
    remaining = [i for i in items if i not in dropped]
    local, points = [], []
    # Off: on the tensor emit case this check drops offsets that the golden files keep, and whether
    # that drop helps is not yet measured (branch fix-geometry-offsets-check has it switched on).
    if OFFSETS_CHECK and any(i.parent is not None for i in remaining):
        points = offset_points(geometry, curv, hyperparameters, _with(knobs, items, off_value))
        local, figures["offsets"] = guard_offsets(geometry, points, _with(knobs, dropped, off_value), remaining,
                                                  off_value)
    notes = []
    kept = []
    for s in plan_sites:
        gone = [i for i in dropped + local if i.site == s.name]
        if gone:
            parents = {i.parent for i in gone if i.parent}
            s = replace(s, offsets=tuple(o for o in s.offsets if o.parent not in parents))
            if any(i.parent is None for i in gone):
                s = replace(s, centredness=None, learn_centredness=True)
        if s.offsets or s.noncentred:
            kept.append(s)
    for item in dropped:
        notes.append(f"dropped the {item.describe()}: it made the log joint worse conditioned at the "
                     f"curvature point and along its funnels (preconditioned condition number {figures['plan']:.3g} with the full "
                     f"plan, {figures['original']:.3g} for the model as written, {figures['kept']:.3g} kept)")
    for item in local:
        first, last = figures["offsets"][item.site]
        touched = ", ".join(sorted({item.site, *(o.parent for o in by_site[item.site].offsets)}))
        moved = ", ".join(f"{h} {_summary(points[1][h])}" for h in hyperparameters if h in curv.names)
        notes.append(f"dropped the {item.describe()}: its xi fits the hyperparameters of the curvature point, not where "
                     f"the data put them ({moved}); there it made the conditional geometry of {touched} worse "
                     f"(preconditioned condition number restricted to them {first:.3g} times that without the "
                     f"offsets; {last:.3g} kept)")
    return kept, notes, figures
