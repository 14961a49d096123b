"""The curvature of a model's log joint at one point: the point, Hessian-vector products, responses.

``Curvature`` finds the point (a MAP over every latent site except the hyperparameters, by
truncated Newton steps: ``newton_refine``) and answers the two questions the planning asks of
the log joint's local quadratic there: ``response`` (the analytic ``xi`` of an offset, by
preconditioned conjugate gradients on Hessian-vector products) and ``centredness`` (the share of
a site's curvature that comes from its data).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from numpyro.distributions import biject_to
from numpyro.distributions.transforms import IdentityTransform, IndependentTransform
from numpyro.infer.initialization import init_to_median
from numpyro.infer.util import helpful_support_errors

from .errors import InputError
from .trace import ModelTrace, jit_quick, log_joint, replayed, staged, untraceable_as_model_error

__all__ = ["Curvature", "newton_refine"]


# -- the curvature point ---------------------------------------------------------------------------
NEWTON_RUNS = 100  # evaluations of a Newton solve (line searches and CG steps): 20-600 on the examples


def newton_refine(loss: Callable, u0: dict, max_iter: int = 30, cg_iter: int = 50) -> tuple[dict, Callable | None]:
    """Truncated Newton (CG on Hessian-vector products, Armijo backtracking) from ``u0``.

    First-order steps of a fixed length cannot reach the mode of a site whose posterior sits
    thousands of prior units from the start (an intercept near 2,700 with a Normal(0, 500)
    prior: 500 Adam steps of 0.05 stop near 3). Newton steps are invariant to the scale of the
    coordinates; on the near-quadratic log joint of a conditionally Gaussian model they
    converge in a few iterations. One compiled function gives the loss, its gradient and a
    Hessian-vector product (XLA compiles loops of HVPs slowly; the loops here are Python's).

    Returns (the point, the loss's Hessian-vector product there as a function of a dict shaped
    like ``u0``), or (``u0``, None) if the loss is not finite there.
    """
    flat0, unravel, split = _flattening(u0)
    if flat0.size == 0:
        return u0, None
    value_and_grad = jax.value_and_grad(replayed(lambda x: loss(unravel(x))))
    # The quick options (a third of the compile time of XLA's defaults on radon): they sum the log
    # joint in another order, which moves the MAP point along a thin ridge by float32 rounding
    # (4e-4 on the tensor example's offsets' centres).
    evaluate = jit_quick(staged(lambda x, v: jax.jvp(value_and_grad, (x,), (v,))), runs=NEWTON_RUNS)
    dtype = flat0.dtype
    zeros = np.zeros_like(flat0)

    def value_grad(x):
        (fx, g), _ = evaluate(x.astype(dtype), zeros)
        return float(fx), np.asarray(g, dtype=np.float64)

    x = np.asarray(flat0, dtype=np.float64)
    fx, g = value_grad(x)
    if not np.isfinite(fx) or not np.all(np.isfinite(g)):
        return u0, None
    hvp = lambda v: np.asarray(evaluate(x.astype(dtype), v.astype(dtype))[1][1], np.float64)  # noqa: E731
    for _ in range(max_iter):
        p = _cg_direction(hvp, g, cg_iter)
        slope = float(g @ p)
        if not slope < 0:
            p, slope = -g, -float(g @ g)
        step, accepted = 1.0, None
        for _ in range(30):
            x_new = x + step * p
            f_new, g_new = value_grad(x_new)
            if np.isfinite(f_new) and f_new <= fx + 1e-4 * step * slope and np.all(np.isfinite(g_new)):
                accepted = (x_new, f_new, g_new)
                break
            step *= 0.5
        if accepted is None:
            break
        small = fx - accepted[1] <= 1e-7 * max(1.0, abs(fx))
        x, fx, g = accepted
        if small:
            break

    def hvp_at_point(tangent: dict) -> dict:
        """The Hessian-vector product at the returned point; ``tangent`` has ``u0``'s keys and shapes."""
        leaves = jax.tree.leaves(jax.tree.map(lambda t, v: np.broadcast_to(t, np.shape(v)), tangent, u0))
        return split(hvp(np.concatenate([np.ravel(leaf) for leaf in leaves])))

    return split(x.astype(dtype)), hvp_at_point


def _flattening(tree: dict):
    """(the leaves of ``tree`` as one flat numpy vector, ``ravel_pytree``'s unravel for traced
    vectors, the same split into numpy arrays), without running JAX operations op by op."""
    box = {}

    def ravel(t):
        flat, box["unravel"] = ravel_pytree(t)
        return flat

    jax.eval_shape(ravel, tree)  # unravel only needs the shapes
    leaves, treedef = jax.tree.flatten(tree)
    dtype = jnp.result_type(*leaves) if leaves else np.float32
    flat = np.concatenate([np.ravel(np.asarray(v)).astype(dtype) for v in leaves]) if leaves else np.zeros(0, dtype)
    ends = np.cumsum([int(np.size(v)) for v in leaves])

    def split(x):
        parts = np.split(np.asarray(x), ends[:-1]) if leaves else []
        return jax.tree.unflatten(treedef, [part.reshape(np.shape(v)).astype(np.asarray(v).dtype)
                                            for part, v in zip(parts, leaves)])

    return flat, box["unravel"], split


def _cg_direction(hvp, g, maxiter):
    """Approximate Newton direction -H^{-1} g by CG; stops at negative curvature (Steihaug)."""
    x = np.zeros_like(g)
    r = -g
    p = r.copy()
    rr = float(r @ r)
    r0 = np.sqrt(rr)
    if r0 == 0:
        return x
    for _ in range(maxiter):
        hp = hvp(p)
        php = float(p @ hp)
        if not php > 0:
            break
        alpha = rr / php
        x = x + alpha * p
        r = r - alpha * hp
        rr_new = float(r @ r)
        if np.sqrt(rr_new) <= 1e-6 * r0:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x if float(x @ x) > 0 else -g


class Curvature:
    """Hessian-vector products of the negative log joint at one point (jit once, reuse).

    The point is ``at`` if given (a dict of latent values, or ``"median"`` for the prior
    median). By default (``at=None`` or ``"map"``) it starts at the prior median and
    maximises the log joint over every latent site except the hyperparameters (sites that
    scale other sites' priors, which a MAP would collapse), so that the observation noise
    and the effects sit where the data put them.

    ``parents`` (each site's direct parents, as in the report's graph) limits the prior medians
    drawn for a MAP to the sites whose values it keeps: the hyperparameters, the discrete sites
    and what their priors read.
    """

    def __init__(self, mt: ModelTrace, at, hyperparameters=(), parents: dict[str, set[str]] | None = None):
        self.mt = mt
        self.names = mt.latent_names
        at_map = not isinstance(at, dict) and at in (None, "map")
        if not (at_map or isinstance(at, dict) or at == "median"):
            raise InputError(f"at must be None, 'map', 'median' or a dict of latent values, got {at!r}")
        # The MAP starts the non-hyperparameters at the centre of their unconstrained space: a prior
        # median drawn from samples of a wide prior (Normal(0, 100)) lands far from the data.
        free = tuple(n for n in self.names if n not in hyperparameters) if at_map else ()
        medians, start = _prior_points(mt, free, _median_sites(mt, hyperparameters, parents) if free else None)
        values = dict(medians)
        fixed = {n: v for n, v in values.items() if n not in self.names}

        def neg_log_joint(theta):
            # Only the latent values are traced (the inputs are evaluated eagerly, see log_joint).
            return -log_joint(mt, {**theta, **fixed})

        self._map_hvp, self._map_sites, self._free = None, frozenset(), free
        if isinstance(at, dict):
            unknown = set(at) - set(values)
            if unknown:
                raise InputError(f"at: no latent site named {', '.join(sorted(unknown))}")
            values.update({k: jnp.asarray(v) for k, v in at.items()})
        elif at_map:
            supports = mt.supports_at(free, medians)  # the supports where the prior medians put them
            theta = {**{n: jnp.asarray(values[n]) for n in self.names}, **start["values"]}
            with untraceable_as_model_error():
                values.update(theta)
                point, self._map_hvp = _map_point(neg_log_joint, theta, supports, u0=start["unconstrained"])
                values.update(point)
            # Where the transform is the identity, the MAP's Hessian-vector product in its unconstrained
            # values is the log joint's in the sites' own: hvp reuses that compiled program there.
            self._map_sites = frozenset(n for n in free if mt.sites[n].support in ("real", "real_vector"))
        self.point = {n: jnp.asarray(values[n]) for n in self.names}
        self.values = values
        self.at_map = at_map
        # site -> (prior variance factor k^2, the site's values under that prior), set by centredness
        self.rescaled: dict[str, tuple[float, np.ndarray]] = {}
        grad = jax.grad(neg_log_joint)
        # With the point a constant of the program (XLA folds what depends on it alone); compiled
        # only for an HVP that the MAP's program cannot give.
        self._hvp = jit_quick(staged(lambda t: jax.jvp(grad, (self.point,), (t,))[1]))
        # The loc-scale sites whose parameters centredness and the guard's points read.
        self.loc_scale_sites = tuple(n for n in self.names if {"loc", "scale"} <= set(mt.sites[n].params))

    def site_parameters(self, values: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
        """The loc-scale sites' distribution parameters at ``values`` (the curvature point by default)."""
        return self.mt.distribution_parameters(self.values if values is None else values, self.loc_scale_sites)

    @functools.cached_property
    def _parameters_at_point(self):
        return self.site_parameters()

    def hvp(self, tangent: dict[str, Any], read: Any = None) -> dict[str, np.ndarray]:
        """The Hessian-vector product of the negative log joint at the point along ``tangent`` (a
        dict of site values, zero elsewhere), at least at the sites ``read`` (default: every site)."""
        read = self.names if read is None else read
        if self._map_hvp is not None and self._map_sites.issuperset(tangent) and self._map_sites.issuperset(read):
            out = self._map_hvp({n: tangent.get(n, 0.0) for n in self._free})
            return {n: np.asarray(v, dtype=np.float64) for n, v in out.items()}
        # Built in numpy: as JAX operations, each new shape would compile on its own.
        full = {n: np.asarray(tangent[n]).astype(self.point[n].dtype).reshape(self.point[n].shape)
                if n in tangent else np.zeros(self.point[n].shape, self.point[n].dtype) for n in self.names}
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
            h = self.hvp({c: self._expand(c, s[c], g[c]) for c in names}, read=names)
            return {c: self._batch_reduce(c, h[c] * g[c]) for c in names}

        h_u = self.hvp({a: u}, read=names)
        rhs = {c: -self._batch_reduce(c, h_u[c] * g[c]) for c in names}
        diag = {}
        for c in names:
            ones = {k: (np.ones_like(rhs[k]) if k == c else np.zeros_like(rhs[k])) for k in names}
            d = np.abs(op(ones)[c])
            diag[c] = np.where(d > 0, d, 1.0)
        s = _pcg(op, rhs, diag)
        active = self._batch_reduce(b, np.abs(g[b])) > 0
        return np.where(active, s[b], 0.0)

    def centredness(self, name: str) -> np.ndarray:
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
        if site.distribution in ("MultivariateNormal", "LowRankMultivariateNormal"):
            # A (low-rank) multivariate normal, coordinate by coordinate: the curvature along one
            # coordinate of every element, whose prior part is that coordinate's conditional
            # precision (the diagonal of the precision matrix).
            fn = self.mt.distribution_parameters(self.values, (name,))[name]
            factor = np.asarray(fn["cov_factor"] if "cov_factor" in fn else fn["scale_tril"], np.float64)
            covariance = factor @ np.swapaxes(factor, -1, -2)
            if "cov_diag" in fn:
                covariance = covariance + np.asarray(fn["cov_diag"], np.float64)[..., None] * np.eye(site.shape[-1])
            precision = np.diagonal(np.linalg.inv(covariance), axis1=-2, axis2=-1)
            scale = np.broadcast_to(1.0 / np.sqrt(precision), site.shape)
            total = np.zeros(n_batch)
            for k in range(site.shape[-1]):
                unit = np.zeros(site.shape)
                unit[..., k] = 1.0
                total += self._batch_reduce(name, self.hvp({name: unit}, read=(name,))[name] * unit)
        else:
            total = self._batch_reduce(name, self.hvp({name: np.ones(site.shape)}, read=(name,))[name])
            fn = self._parameters_at_point[name]
            scale = np.broadcast_to(np.asarray(fn["scale"], dtype=np.float64), site.shape)
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
                   - np.broadcast_to(np.asarray(fn["loc"], np.float64), site.shape)).reshape(n_batch, event)
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
                loc = np.broadcast_to(np.asarray(fn["loc"], np.float64), site.shape)
                self.rescaled[name] = (k2, loc + (unpooled * shrink).reshape(site.shape))
        c = 1.0 - prior / np.where(total > 0, total, np.inf)
        return np.clip(np.where(total > 0, c, 0.0), 0.0, 1.0).reshape(n_batch)


def _median_sites(mt: ModelTrace, hyperparameters, parents: dict[str, set[str]] | None) -> frozenset:
    """The sample sites whose prior median a MAP point keeps, with every site their priors read."""
    if parents is None:
        return frozenset(n for n, s in mt.sites.items() if s.type == "latent")
    todo = list(hyperparameters) + [n for n, s in mt.sites.items() if s.type == "latent" and s.is_discrete]
    needed: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(parents.get(name, ()))
    return frozenset(needed)


def _init_to_feasible(site=None):
    """NumPyro's ``init_to_feasible`` (the image of 0 under the support's bijection), without the
    uniform draw on (-0, 0) that it makes and that costs a PRNG hash per site in a compiled program."""
    if site is None:
        return _init_to_feasible
    if site["type"] == "sample" and not site["is_observed"] and not site["fn"].support.is_discrete:
        if site["value"] is not None:
            return site["value"]
        with helpful_support_errors(site):
            transform = biject_to(site["fn"].support)
        shape = tuple(site["kwargs"].get("sample_shape", ())) + tuple(transform.inverse_shape(site["fn"].shape()))
        return transform(jnp.zeros(shape))
    return None


def _prior_points(mt: ModelTrace, free: tuple[str, ...], median_sites: frozenset | None) -> tuple[dict, dict]:
    """(every latent site's prior median, or for a MAP those of ``median_sites`` and the feasible
    point elsewhere; and the ``free`` sites' feasible start: their values ``"values"`` and their
    unconstrained form ``"unconstrained"``), drawn by one compiled program instead of op by op."""
    median = init_to_median(num_samples=101)
    latent = lambda tr: {n: s["value"] for n, s in tr.items()  # noqa: E731
                         if s["type"] == "sample" and not s["is_observed"]}
    if not free:
        return mt.run_with_init("prior_median", (median,), lambda traces: latent(traces[0])), \
            {"values": {}, "unconstrained": {}}

    def median_or_feasible(site=None):
        if site is None:
            return median_or_feasible
        return median(site) if site["name"] in median_sites else _init_to_feasible(site)

    # The free sites take their feasible value in the medians' run too, unless a prior median reads
    # them or their support can move with the values before them: then a run of its own gives it.
    separate = any(n in median_sites or n not in mt.supports for n in free)

    def read(traces):
        medians, feasible = traces[0], traces[-1]
        start = {n: feasible[n]["value"] for n in free}
        return latent(medians), {"values": start, "unconstrained": {
            n: biject_to(medians[n]["fn"].support).inv(v) for n, v in start.items()}}

    strategies = (median_or_feasible, _init_to_feasible) if separate else (median_or_feasible,)
    return mt.run_with_init(("prior_points", free, median_sites), strategies, read)


def _map_point(neg_log_joint, theta: dict, supports: dict, u0: dict | None = None) -> tuple[dict, Callable | None]:
    """Newton steps on the unconstrained values of the sites in ``supports`` (see ``newton_refine``),
    from ``u0`` (by default those of ``theta``): (the point, the Hessian-vector product there in
    those unconstrained values, or ({}, None) if the steps diverged)."""
    transforms = {n: biject_to(c) for n, c in supports.items()}
    # The sites on the real line need no program to map them (a program costs 10-20 ms to trace and
    # compile, a third of what eight schools' MAP costs).
    mapped = {n: t for n, t in transforms.items() if not _is_identity(t)}
    # numpy: NumPyro's argument validation (on by default) then checks them in numpy rather than by
    # compiled JAX operations of their own.
    fixed = {n: np.asarray(v) for n, v in theta.items() if n not in transforms}
    if u0 is None:
        u0 = {n: theta[n] for n in transforms}
        if mapped:
            u0.update(jit_quick(lambda th: {n: t.inv(th[n]) for n, t in mapped.items()})(theta))

    def constrained(u):
        return {n: mapped[n](v) if n in mapped else v for n, v in u.items()}

    def loss(u):
        return neg_log_joint({**fixed, **constrained(u)})

    u, hvp = newton_refine(loss, u0)
    # device_put, not jnp.asarray: that compiles a program per shape (JAX 0.10)
    out = jit_quick(constrained)(u) if mapped else {n: jax.device_put(v) for n, v in u.items()}
    if not all(np.all(np.isfinite(np.asarray(v))) for v in out.values()):
        return {}, None  # keep the prior median rather than a diverged point
    return out, hvp


def _is_identity(transform) -> bool:
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, IdentityTransform)


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
