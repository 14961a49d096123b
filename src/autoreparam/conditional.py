"""The conditional p(z | theta, y) of a conditionally Gaussian block, matrix-free.

Given the hyperparameters theta, the log joint in the flattened block z is

    log p(y, z, theta) = -1/2 z^T H z + b^T z + c          (Normal likelihoods: exact)

and for Bernoulli/Binomial logits or a Poisson log rate it is concave in z and is replaced
by its Laplace approximation at the conditional mode (Newton-CG). ``H v`` is minus a
Hessian-vector product of the model's log joint (``jax.linearize`` of ``jax.grad``), so H is
never formed above ``dense_below``; neither is any matrix of the size of the data.

- **Mean / mode.** Jacobi-preconditioned conjugate gradients (relative residual ``tol``) on
  ``H m = b``; Laplace blocks take damped Newton steps, each solved by the same CG. The
  preconditioner is the exact diagonal of H, read off a few HVPs with probe vectors: the
  elements of each site are split into classes ``d mod k`` whose within-class Hessian is
  diagonal (``k`` found numerically at construction; e.g. 1 for ``a[i]``, 2 for a random walk).
- **Draws by perturbation-optimisation.** ``z = m + H^-1 eps`` with ``eps ~ N(0, H)``: ``eps``
  is the gradient of the latent log densities at an ancestral prior draw (covariance: the prior
  precision) plus the gradient of the likelihoods at ``m`` with the observations redrawn from
  the likelihood at ``m`` (covariance J^T W J, the Laplace curvature for canonical links).
  A term under ``handlers.scale(s)`` enters the noise with ``sqrt(s)``, so its covariance is
  ``s`` times its curvature, as in H; masked terms contribute nothing to either.
- **Dense path** (block size ``<= dense_below``): H from HVPs against the identity, Cholesky,
  exact mean, draws (the same ``eps``) and ``log det H``.
- **Sparse assembly** (exact blocks, :mod:`autoreparam.precision`): when the
  residual Jacobians of the Normal terms do not depend on theta, H is assembled from them and the
  sites' own precisions, with no HVPs, and ``log_marginal`` eliminates small groups of elements on
  which H is block diagonal before a dense Cholesky of the rest, with a hand-written gradient (on the dense
  path for float64 callers, as ``CollapsedPosterior``, whose draws use the same elimination; on the CG
  path for every caller, as below). Otherwise (checked numerically
  at construction; ``precision_note`` says why), and for ``mean`` and ``sample``, the HVP path
  above is used. On the CG path the sparse precision is built only on request
  (``prepare_exact_marginal``): it then gives ``log_marginal`` exactly, for importance-resampling
  theta, while the mean and the draws stay matrix-free.

Everything runs in float64 inside a local ``jax.enable_x64`` context, whatever the caller uses:
theta is upcast on entry and results are returned in the caller's default float dtype
(float32 when x64 is off, which rounds the float64 result once at the end).
"""

from __future__ import annotations

import copy
import functools
import math
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers

from .block import LIKELIHOOD_LINKS, GaussianBlock
from .errors import InputError, ModelError
from .precision import SparsePrecision, Unsupported
from .trace import trace_model, unwrap_distribution

__all__ = ["BlockConditional", "DENSE_BELOW", "DENSE_LIMIT"]

#: Block size up to which ``method="auto"`` takes the dense Cholesky path. Measured by
#: ``benchmarks/bench_conditional.py`` (CPU time of a mean plus one draw, OPENBLAS_NUM_THREADS=1):
#: CG overtakes Cholesky between D = 115 and 179 on the tensor model and between D = 100 and
#: 196 on a crossed design (benchmarks/README.md); 150 lies in both intervals.
DENSE_BELOW = 150
#: Largest block the dense path accepts at all (a D x D float64 matrix of ~290 MB).
DENSE_LIMIT = 6000
# The CG path's precision_note until prepare_exact_marginal builds the sparse precision.
_PRECISION_NOT_BUILT = "not built: CG path (see prepare_exact_marginal)"

_PROBE_PERIODS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64)
#: Loosest CG relative residual of an inner Newton direction (Laplace blocks, CG path).
_NEWTON_FORCING = 1e-2
_MAP_BATCH = 64
_PROBE_BATCH = 8


def _caller_float():
    """The float dtype results are returned in: the caller's default (float32 when x64 is off)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def float64_with_gradient(fun):
    """``fun(*arrays)`` computed in float64, its backward pass too, for a caller in either precision.

    Outputs are returned in the caller's float dtype. Without this, a float32 caller's
    ``jax.grad`` would transpose the float64 computation outside the float64 context.
    Every argument is a pytree of float arrays (cotangents are returned for all of them).
    """
    def markers(tree):  # zero-size arrays that carry each leaf's dtype through the residuals
        return jax.tree.map(lambda v: jnp.zeros((0,), jnp.asarray(v).dtype), tree)

    def cast_like(tree, like):
        return jax.tree.map(lambda v, m: jnp.asarray(v).astype(m.dtype), tree, like)

    @jax.custom_vjp
    def wrapped(*args):
        caller = _caller_float()
        with jax.enable_x64(True):
            return jax.tree.map(lambda v: v.astype(caller), fun(*args))

    def forward(*args):
        caller = _caller_float()
        with jax.enable_x64(True):
            out, pullback = jax.vjp(fun, *args)
            return jax.tree.map(lambda v: v.astype(caller), out), (pullback, markers(args), markers(out))

    def backward(residuals, cotangent):
        pullback, arg_markers, out_markers = residuals
        with jax.enable_x64(True):
            return cast_like(pullback(cast_like(cotangent, out_markers)), arg_markers)

    wrapped.defvjp(forward, backward)
    return wrapped


def _compiled(*static_argnames):
    """The method runs under ``jax.jit``, compiled once per instance (and per static arguments).

    An eager caller (``svi.init``, ``Predictive``, ``sample_posterior``) would otherwise run the
    model's HVPs and the CG loop op by op: on the 213-value tensor block, 70 s for one
    ``svi.init`` against 10 s for one compile. Inside an outer ``jit`` the call is inlined.
    """
    def decorate(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            fn = self._compiled_methods.get(method.__name__)
            if fn is None:
                fn = jax.jit(functools.partial(method, self), static_argnames=static_argnames)
                self._compiled_methods[method.__name__] = fn
            return fn(*args, **kwargs)
        return run
    return decorate


def _copy_numpy(tree, canonical: bool = False):
    """Fresh copies of the numpy arrays in ``tree``; ``canonical``: in the dtypes JAX would give them now."""
    def copy(v):
        if not isinstance(v, np.ndarray):
            return v
        return np.array(v, dtype=jax.dtypes.canonicalize_dtype(v.dtype) if canonical else v.dtype)
    return jax.tree.map(copy, tree)


def _sample_shape(site) -> tuple:
    """The ``sample_shape=`` a site was drawn with (NumPyro keeps it in the message's kwargs)."""
    return tuple((site.get("kwargs") or {}).get("sample_shape", ()))


def _site_key(key, name):
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _pcg(matvec, rhs, inv_diag, tol, maxiter):
    """Jacobi-preconditioned CG from 0; stops at ||r|| <= tol ||rhs||. Returns (x, iterations)."""
    rhs_norm = jnp.linalg.norm(rhs)

    def cond(state):
        _, r, _, _, _, it = state
        return (jnp.linalg.norm(r) > tol * rhs_norm) & (it < maxiter)

    def body(state):
        x, r, p, zr, rz, it = state
        hp = matvec(p)
        alpha = rz / jnp.vdot(p, hp)
        x = x + alpha * p
        r = r - alpha * hp
        zr = inv_diag * r
        rz_new = jnp.vdot(r, zr)
        p = zr + (rz_new / rz) * p
        return x, r, p, zr, rz_new, it + 1

    zr = inv_diag * rhs
    state = (jnp.zeros_like(rhs), rhs, zr, zr, jnp.vdot(rhs, zr), jnp.asarray(0))
    x, *_, it = jax.lax.while_loop(cond, body, state)
    return x, it


def _without_validation(fn):
    """A shallow copy of ``fn`` (and of the laws it wraps) whose ``log_prob`` does not check its value's support."""
    fn = copy.copy(fn)
    fn._validate_args = False
    if hasattr(fn, "base_dist"):
        fn.base_dist = _without_validation(fn.base_dist)
    return fn


class BlockConditional:
    """The conditional of ``block`` given theta in ``model(*args, **kwargs)``: mean, draws, marginal.

    ``theta`` is always a dict of CONSTRAINED values of the sites in ``block.theta``; every
    method is a pure function of its arguments (jit/vmap safe). ``method``: ``"cg"``
    (matrix-free), ``"dense"`` (Cholesky; block size at most ``DENSE_LIMIT``) or ``"auto"``
    (dense up to ``dense_below``). ``tol``: CG relative residual; ``maxiter``: CG iterations
    (default ``10 * size``); Newton stops when the Newton decrement is below ``newton_tol``.

    >>> import numpyro, numpyro.distributions as dist
    >>> from autoreparam.block import BlockSite, BlockLikelihood, GaussianBlock
    >>> def model(y):
    ...     s = numpyro.sample("s", dist.HalfNormal(1.0))
    ...     a = numpyro.sample("a", dist.Normal(0.0, s).expand([2]).to_event(1))
    ...     numpyro.sample("y", dist.Normal(a, 1.0).to_event(1), obs=y)
    >>> block = GaussianBlock((BlockSite("a", (2,), "Normal"),),
    ...                       (BlockLikelihood("y", "Normal", "identity"),), ("s",))
    >>> cond = BlockConditional(model, block, (np.array([2.0, -4.0]),))
    >>> np.asarray(cond.mean({"s": 1.0})["a"]).round(6)     # prior precision 1 + data precision 1
    array([ 1., -2.], dtype=float32)
    >>> round(float(cond.log_marginal({"s": 1.0})), 4)   # log N(y; 0, 2 I) + log HalfNormal(1 | 1)
    -8.2568
    """

    def __init__(self, model: Callable, block: GaussianBlock, args: tuple = (), kwargs: dict | None = None,
                 *, method: str = "auto", tol: float = 1e-8, maxiter: int | None = None,
                 dense_below: int = DENSE_BELOW, newton_tol: float = 1e-12, newton_maxiter: int = 50,
                 seed: int = 0):
        if method not in ("auto", "cg", "dense"):
            raise InputError(f"BlockConditional: method must be 'auto', 'cg' or 'dense', got {method!r}")
        if not block.sites:
            raise InputError("BlockConditional: the block has no sites; expected at least one Gaussian latent site")
        for site in block.sites:
            if site.size == 0:
                raise InputError(f"BlockConditional: block site '{site.name}' has size 0 (shape {site.shape})")
        for lik in block.likelihoods:
            if lik.family not in LIKELIHOOD_LINKS:
                raise ModelError(
                    f"BlockConditional: likelihood site '{lik.name}' is {lik.family}; expected one of "
                    f"{', '.join(sorted(LIKELIHOOD_LINKS))}")
        if method == "dense" and block.size > DENSE_LIMIT:
            raise InputError(
                f"BlockConditional: block ({', '.join(block.names)}) has size {block.size}, above "
                f"DENSE_LIMIT={DENSE_LIMIT} for method='dense'; use method='cg'")
        self.model = model
        self.block = block
        self._compiled_methods = {}
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        # Separate copies of the numpy inputs for the float64 runs and for the runs in the
        # caller's precision, the latter in the dtypes of that precision. Observed with JAX 0.10: a
        # numpy int64 index array used under jit with float64 off fails to compile ("lax.add requires
        # arguments to have the same dtypes, int64, int32"); an int32 copy compiles.
        self._inputs64 = _copy_numpy((self.args, self.kwargs))
        self._inputs_by_precision = {}
        self.size = block.size
        self.exact = block.exact
        self.dense = method == "dense" or (method == "auto" and self.size <= dense_below)
        self.tol = float(tol)
        self.maxiter = int(maxiter) if maxiter is not None else 10 * self.size
        self.newton_tol = float(newton_tol)
        self.newton_maxiter = int(newton_maxiter)
        self._block_names = block.names
        self._lik_names = tuple(lik.name for lik in block.likelihoods)
        self._laplace_lik_names = tuple(lik.name for lik in block.likelihoods if lik.family != "Normal")
        self._seed = seed
        with jax.enable_x64(True):
            self._check_model(seed)
            self._probes = self._find_probes(seed)
            if self.dense:
                self.precision, self.precision_note = self._sparse_precision(seed)
            else:
                # Built on demand (``prepare_exact_marginal``): the CG path's mean and draws never need it.
                self.precision, self.precision_note = None, _PRECISION_NOT_BUILT

    # ----------------------------------------------------------------- model evaluation

    def _run(self, values: dict, substitute_fn=None, caller: bool = False):
        """The model's trace at ``values`` (float64 inputs, or the caller's precision)."""
        model = handlers.seed(self.model, 0)  # fixed: any other randomness is the same on every run
        if substitute_fn is None:
            model = handlers.substitute(model, data=values)
        else:
            model = handlers.substitute(model, substitute_fn=substitute_fn)
        args, kwargs = self._caller_inputs() if caller else self._inputs64
        return handlers.trace(model).get_trace(*args, **kwargs)

    def _caller_inputs(self):
        x64 = jax.dtypes.canonicalize_dtype(np.int64) == np.int64
        if x64 not in self._inputs_by_precision:
            self._inputs_by_precision[x64] = _copy_numpy((self.args, self.kwargs), canonical=True)
        return self._inputs_by_precision[x64]

    @staticmethod
    def _log_terms(trace, names, power=1.0, values=None):
        """Sum of scale**power * log_prob over ``names`` (observed values may be replaced)."""
        total = jnp.zeros((), jnp.float64)
        for name in names:
            site = trace[name]
            fn = site["fn"]
            if values is not None and name in values:
                # Pseudo-observations of a count likelihood are not counts: a distribution built with
                # validate_args=True would score them -inf (and give them no gradient).
                value, fn = values[name], _without_validation(fn)
            else:
                value = site["value"]
            log_prob = fn.log_prob(value)
            if site["scale"] is not None:
                log_prob = log_prob * jnp.asarray(site["scale"]) ** power
            total = total + jnp.sum(log_prob)
        return total

    def _unravel(self, flat):
        out, offset = {}, 0
        for site in self.block.sites:
            out[site.name] = flat[..., offset:offset + site.size].reshape(flat.shape[:-1] + site.shape)
            offset += site.size
        return out

    def _ravel(self, z: dict):
        return jnp.concatenate([jnp.ravel(jnp.asarray(z[s.name], jnp.float64)) for s in self.block.sites])

    def _sample_names(self, trace):
        return [n for n, s in trace.items() if s["type"] == "sample"]

    def _log_joint(self, theta, z):
        tr = self._run({**theta, **self._unravel(z)})
        return self._log_terms(tr, self._sample_names(tr))

    def _grad(self, theta, z):
        return jax.grad(lambda zz: self._log_joint(theta, zz))(z)

    def _hvp_at(self, theta, z):
        """(g, v -> H v) at z, with H minus the Hessian of the log joint in z."""
        g, lin = jax.linearize(lambda zz: self._grad(theta, zz), z)
        return g, lambda v: -lin(v)

    def _diag(self, matvec):
        probes = jnp.asarray(self._probes)
        return jnp.sum(probes * jax.lax.map(matvec, probes, batch_size=_MAP_BATCH), axis=0)

    def _dense_H(self, matvec):
        H = jax.lax.map(matvec, jnp.eye(self.size), batch_size=_MAP_BATCH)
        return 0.5 * (H + H.T)

    # ----------------------------------------------------------------- construction checks

    def _theta_point(self, seed):
        """theta drawn from its prior: a generic point for the structural checks."""
        def draw():
            args, kwargs = self._inputs64
            tr = handlers.trace(handlers.seed(self.model, seed)).get_trace(*args, **kwargs)
            return {n: tr[n]["value"] for n in self.block.theta if n in tr}

        try:
            theta = jax.jit(draw)()
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            theta = draw()  # the model's Python code needs concrete data values
        return {n: jnp.asarray(v, jnp.float64) for n, v in theta.items()}

    def _check_model(self, seed):
        mt = trace_model(self.model, *self._inputs64)
        for name in self._block_names + tuple(self.block.theta):
            if name not in mt.sites or mt.sites[name].type != "latent":
                raise ModelError(f"BlockConditional: site '{name}' of the block is not a latent site of the model")
        for name in self._lik_names:
            if name not in mt.sites or mt.sites[name].type != "observed":
                raise ModelError(f"BlockConditional: likelihood site '{name}' is not an observed site of the model")
        for name in self._block_names + self._lik_names:
            for plate in mt.sites[name].plates:
                if plate.subsample_size < plate.size:
                    raise ModelError(
                        f"BlockConditional: site '{name}' is in subsampled plate '{plate.name}' "
                        f"({plate.subsample_size} of {plate.size}); the exact conditional needs the full plate")
        theta = self._theta_point(seed)
        self._theta0 = theta
        z0 = jax.random.normal(jax.random.PRNGKey(seed + 1), (self.size,), jnp.float64)
        families, observed = {}, []

        def record():  # shapes only: the families and observed sites, without running the model eagerly
            tr = self._run({**theta, **self._unravel(z0)})
            families.update({n: type(unwrap_distribution(tr[n]["fn"])).__name__ for n in self._lik_names})
            observed.extend(n for n, s in tr.items() if s["type"] == "sample" and s["is_observed"])
            return 0

        jax.eval_shape(record)
        for lik in self.block.likelihoods:
            family = families[lik.name]
            if family not in LIKELIHOOD_LINKS:
                raise ModelError(
                    f"BlockConditional: likelihood site '{lik.name}' is {family} in the model; expected one of "
                    f"{', '.join(sorted(LIKELIHOOD_LINKS))}")
        others = [n for n in observed if n not in self._lik_names]
        for name in others:
            g = jax.jit(jax.grad(lambda zz, n=name: self._log_terms(self._run({**theta, **self._unravel(zz)}), [n])))(z0)
            if bool(jnp.any(g != 0)):
                raise ModelError(
                    f"BlockConditional: observed site '{name}' depends on the block but is not one of its "
                    f"likelihoods ({', '.join(self._lik_names) or 'none'})")

    def _find_probes(self, seed):
        """Probe vectors whose HVPs give diag(H) exactly: per site, classes ``d mod k``.

        A class C is valid when H restricted to C is diagonal, tested with random weights r:
        (H (r * 1_C)) / r equals H 1_C on C exactly when no two members of C interact.
        The smallest valid k in ``_PROBE_PERIODS`` is used, else one probe per element.
        """
        theta = self._theta0
        z0 = jax.random.normal(jax.random.PRNGKey(seed + 2), (self.size,), jnp.float64)
        batched = jax.jit(lambda rows: jax.vmap(self._hvp_at(theta, z0)[1])(rows))

        def hvps(rows):  # in padded batches of one shape (one compile), few lanes: each carries data-sized arrays
            pad = -len(rows) % _PROBE_BATCH
            padded = np.concatenate([rows, np.zeros((pad, self.size))])
            out = [np.asarray(batched(jnp.asarray(padded[i:i + _PROBE_BATCH])))
                   for i in range(0, len(padded), _PROBE_BATCH)]
            return np.concatenate(out)[:len(rows)]

        rng = np.random.default_rng(seed)
        probes, offset = [], 0
        for site in self.block.sites:
            n = site.size
            chosen = None
            weights = np.zeros(self.size)
            weights[offset:offset + n] = rng.uniform(1.0, 2.0, n) * rng.choice([-1.0, 1.0], n)
            for k in (k for k in _PROBE_PERIODS if k < n):
                classes = np.zeros((k, self.size))
                for c in range(k):
                    classes[c, offset + np.arange(c, n, k)] = 1.0
                out = hvps(np.concatenate([classes, classes * weights]))
                plain = out[:k] * classes
                weighted = out[k:] * classes / np.where(classes > 0, weights, 1.0)
                if np.allclose(plain, weighted, rtol=1e-7, atol=1e-9 * np.abs(plain).max()):
                    chosen = classes
                    break
            if chosen is None:  # one probe per element, built only when no period works (n x D floats)
                chosen = np.zeros((n, self.size))
                chosen[np.arange(n), offset + np.arange(n)] = 1.0
            probes.append(chosen)
            offset += n
        return np.concatenate(probes, axis=0)

    def _sparse_precision(self, seed):
        """H(theta) from fixed sparse residual Jacobians (exact blocks), or None and why not."""
        if not self.exact:
            return None, "only exact (Normal-likelihood) blocks"
        thetas = (self._theta0, self._theta_point(seed + 7), self._theta_point(seed + 11))

        def hvp(theta, v):
            return self._hvp_at(theta, jnp.zeros(self.size, jnp.float64))[1](v)

        try:
            precision = SparsePrecision(lambda theta, z: self._run({**theta, **self._unravel(z)}),
                                        self._block_names + self._lik_names, self.size, thetas,
                                        hvp, grad=lambda theta: self._grad(theta, jnp.zeros(self.size, jnp.float64)),
                                        seed=seed)
        except Unsupported as exc:
            return None, str(exc)
        return precision, (f"sparse: {precision.num_terms} pair products of {precision.num_groups} distinct precisions; "
                           f"{precision.eliminated} of {self.size} eliminated in {len(precision.groups)} groups of at most "
                           f"{max(map(len, precision.groups))} before a dense Cholesky of {len(precision.rest)}")

    def _exact_parts(self, theta, assemble=True):
        """(log p(y, z=0, theta), its gradient in z, H or the flat Q entries H is made of): one model run."""
        def at(z):
            tr = self._run({**theta, **self._unravel(z)})
            return self._log_terms(tr, self._sample_names(tr)), self.precision.site_precisions(tr)

        zero = jnp.zeros(self.size, jnp.float64)
        if self.precision.gradient_is_linear:
            log_joint0, q = at(zero)  # the gradient from the Q entries: no pass back through the model
            grad0 = self.precision.gradient_at_zero(q)
        else:
            (log_joint0, q), grad0 = jax.value_and_grad(at, has_aux=True)(zero)
        return log_joint0, grad0, self.precision.assemble(q) if assemble else q

    # ----------------------------------------------------------------- solves

    def _as_theta(self, theta: dict) -> dict:
        """theta in float64 (integer-valued sites are kept as they are)."""
        return {n: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v
                for n, v in self._caller_theta(theta).items()}

    def _solver(self, matvec):
        """A differentiable linear solve with H (CG or Cholesky), and its iteration count."""
        if self.dense:
            chol = jnp.linalg.cholesky(self._dense_H(matvec))
            return (lambda rhs: (jax.scipy.linalg.cho_solve((chol, True), rhs), jnp.asarray(0))), chol
        inv_diag = jax.lax.stop_gradient(1.0 / self._diag(matvec))

        def solve(rhs):
            def inner(mv, r):
                return _pcg(mv, r, inv_diag, self.tol, self.maxiter)
            return jax.lax.custom_linear_solve(matvec, rhs, inner, symmetric=True, has_aux=True)
        return solve, None

    def _mode(self, theta, init):
        """The conditional mean (exact) or mode (Laplace), with one differentiable final step."""
        # (The sparse H serves log_marginal and CollapsedPosterior's draws only: here, under a float32
        # caller's gradient (HybridELBO), JAX would linearise its float64 Cholesky outside the float64
        # context, with a dtype warning per step.)
        z = jnp.zeros(self.size, jnp.float64) if init is None else jax.lax.stop_gradient(init)
        iterations = jnp.asarray(0)
        if not self.exact:
            z, iterations = self._newton(jax.lax.stop_gradient(theta), z)
        # One (Newton) step from the stop-gradient point: exact for a quadratic, and at the mode
        # it has the implicit-function derivative dm/dtheta.
        g, matvec = self._hvp_at(theta, z)
        solve, chol = self._solver(matvec)
        step, it = solve(g)
        return z + step, matvec, solve, chol, iterations + it

    def prepare_exact_marginal(self) -> bool:
        """Whether ``log_marginal`` is exact without a ``key`` (Laplace blocks: the Laplace approximation),
        building the sparse precision of an exact block on the CG path first if it is not built yet.

        The dense path always has it (its Cholesky). On the CG path only exact blocks whose H has the
        sparse form of :mod:`autoreparam.precision` do (``precision_note`` says why not); building it
        reads the residual Jacobians once (about 40 s of CPU on the 1,739-value tensor block), so it is done
        here, on request, and never for the mean or the draws. Call it outside any transformation (it
        runs the model on concrete values).
        """
        if self.precision is None and self.precision_note == _PRECISION_NOT_BUILT:
            with jax.ensure_compile_time_eval(), jax.enable_x64(True):
                self.precision, self.precision_note = self._sparse_precision(self._seed)
            self._compiled_methods.pop("log_marginal", None)  # traced before H existed: the SLQ branch
        return self.dense or self.precision is not None

    @property
    def exact_marginal(self) -> bool:
        """Whether ``log_marginal`` is exact as things stand (see ``prepare_exact_marginal``, which builds
        what the CG path needs)."""
        return self.dense or self.precision is not None

    @property
    def sparse(self) -> bool:
        """Whether the sparse assembly of H (``precision``) serves ``CollapsedPosterior``'s draws: it
        computes in float64, so a caller with float64 disabled (warned once) takes the
        Hessian-vector-product path. (``log_marginal`` decides for itself, by path and caller.)"""
        return self.precision is not None and bool(jax.config.jax_enable_x64)

    def _sparse_draw(self, theta, eps):
        """One exact draw of the flat block given theta from standard normal ``eps`` (sparse path only)."""
        _, grad0, q = self._exact_parts(theta, assemble=False)
        return self.precision.draw(q, grad0, eps)

    def _newton(self, theta, z):
        f = lambda zz: self._log_joint(theta, zz)

        def cond(state):
            _, decrement, it, _ = state
            return (decrement > self.newton_tol) & (it < self.newton_maxiter)

        def body(state):
            z, decrement, it, cg_its = state
            g, matvec = self._hvp_at(theta, z)
            if self.dense:
                d, cg_it = self._solver(matvec)[0](g)
            else:
                # Inexact Newton: the CG tolerance of a direction tightens with the previous decrement
                # (superlinear convergence); the final step of _mode is solved to the full tolerance.
                forcing = jnp.clip(jnp.sqrt(decrement), self.tol, _NEWTON_FORCING)
                inv_diag = 1.0 / self._diag(matvec)
                d, cg_it = _pcg(matvec, g, inv_diag, forcing, self.maxiter)
            slope = jnp.vdot(g, d)  # Newton decrement squared, > 0
            f0 = f(z)

            # Backtracking (Armijo) on the log joint: Poisson rates can make a full step overshoot.
            def ls_cond(s):
                alpha, k = s
                return (f(z + alpha * d) < f0 + 1e-4 * alpha * slope) & (k < 30)

            alpha, _ = jax.lax.while_loop(ls_cond, lambda s: (0.5 * s[0], s[1] + 1), (jnp.asarray(1.0), 0))
            return z + alpha * d, slope, it + 1, cg_its + cg_it

        state = (z, jnp.asarray(jnp.inf), jnp.asarray(0), jnp.asarray(0))
        z, _, _, cg_its = jax.lax.while_loop(cond, body, state)
        return z, cg_its

    def _random_values(self, key, theta, m):
        """An ancestral prior draw of the block, and the likelihoods' observations redrawn at m.

        Runs in the CALLER's precision, outside the float64 context: JAX cannot generate
        float64 random bits (nor run a model switched back to 32 bits) inside a float32 caller's
        jit. Only the noise is then rounded to the caller's precision; it is solved in float64.
        """
        key_prior, key_lik = jax.random.split(key)

        def draw_prior(msg):
            if msg["type"] != "sample" or msg["is_observed"]:
                return None
            if msg["name"] in theta:
                return theta[msg["name"]]
            if msg["name"] in self._block_names:
                return msg["fn"].sample(_site_key(key_prior, msg["name"]), _sample_shape(msg))
            return None

        def redraw(name):
            fn, key = at_m[name]["fn"], _site_key(key_lik, name)
            if name not in self._laplace_lik_names:
                return fn.sample(key, _sample_shape(at_m[name]))
            # Continuous pseudo-observations with the likelihood's mean and variance: for a canonical
            # link the gradient is linear in the observation, so the noise is Gaussian with covariance
            # J^T W J exactly (redrawn counts would give that covariance but a skewed, lattice-valued
            # noise: not N(m, H^-1), and wrong importance weights on small data).
            shape = jnp.shape(at_m[name]["value"])
            return fn.mean + jnp.sqrt(fn.variance) * jax.random.normal(key, shape, dtype=jnp.result_type(float))

        prior_trace = self._run(None, substitute_fn=draw_prior, caller=True)
        at_m = self._run({**theta, **self._unravel(m)}, caller=True)
        return ({n: prior_trace[n]["value"] for n in self._block_names}, {n: redraw(n) for n in self._lik_names})

    def _noise(self, theta, m, z_prior, observations):
        """eps ~ N(0, H(m)): prior-gradient noise plus redrawn-likelihood gradient noise (float64)."""
        z_prior, observations = jax.lax.stop_gradient((self._ravel(z_prior), observations))
        tr = self._run({**theta, **self._unravel(m)})
        latent_names = [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]

        def prior_terms(z):
            return self._log_terms(self._run({**theta, **self._unravel(z)}), latent_names, power=0.5)

        def lik_terms(z):
            # The pseudo-observations of Laplace terms are not counts: validation would score them -inf.
            with numpyro.validation_enabled(False):
                tr = self._run({**theta, **self._unravel(z)})
                return self._log_terms(tr, self._lik_names, power=0.5, values=observations)

        return jax.grad(prior_terms)(z_prior) + jax.grad(lik_terms)(m)

    def _caller_theta(self, theta):
        missing = [n for n in self.block.theta if n not in theta]
        if missing:
            raise InputError(f"BlockConditional: theta is missing site '{missing[0]}' (expected {list(self.block.theta)})")
        return {n: jnp.asarray(theta[n]) for n in self.block.theta}

    def _draw_phases(self, key, theta, num_draws, init):
        """The mean (float64), the random values (caller's precision), the noise and solves (float64)."""
        dtype = _caller_float()
        theta_caller = self._caller_theta(theta)
        with jax.enable_x64(True):
            theta64 = self._as_theta(theta)
            m, matvec, solve, _, mode_its = self._mode(theta64, None if init is None else self._ravel(init))
            m_caller = m.astype(dtype)
        keys = key if num_draws is None else jax.random.split(key, num_draws)
        randomness = jax.vmap if num_draws is not None else (lambda f: f)
        z_prior, observations = randomness(lambda k: self._random_values(k, theta_caller, m_caller))(keys)
        return dtype, theta64, m, solve, mode_its, z_prior, observations

    # ----------------------------------------------------------------- public API

    def flatten(self, z: dict) -> jax.Array:
        """The flat float64 vector of a dict of block values (``block.sites`` order, row-major)."""
        with jax.enable_x64(True):
            return self._ravel(z)

    def _ravel_caller(self, z: dict):
        return jnp.concatenate([jnp.ravel(jnp.asarray(z[s.name], _caller_float())) for s in self.block.sites])

    def _out(self, z_flat, dtype):
        return {n: v.astype(dtype) for n, v in self._unravel(z_flat).items()}

    @_compiled()
    def mean(self, theta: dict, init: dict | None = None) -> dict:
        """The conditional mean (Normal likelihoods) or mode (Laplace) of every block site.

        ``init`` (a dict of block values, e.g. the previous mode) only warm-starts the solve.
        Differentiable in theta (implicit function theorem through a final Newton step).
        """
        theta = self._caller_theta(theta)
        init_flat = jnp.zeros(self.size, _caller_float()) if init is None else self._ravel_caller(init)

        def mean64(theta, init_flat):
            theta = self._as_theta(theta)
            return self._unravel(self._mode(theta, None if init is None else init_flat.astype(jnp.float64))[0])

        return float64_with_gradient(mean64)(theta, init_flat)

    @_compiled("num_draws", "return_info")
    def sample(self, key, theta: dict, num_draws: int | None = None, *, init: dict | None = None,
               return_info: bool = False):
        """Exact draws from N(m, H^-1) (Laplace: H at the mode), one CG solve per draw.

        Returns a dict of block values, with a leading ``num_draws`` axis when it is given;
        with ``return_info`` also ``{"mean": ..., "iterations": CG iterations per draw,
        "mode_iterations": CG iterations of the mean/mode solve}``. The draws carry no gradient
        in theta (theta is stop-gradiented): Fisher's identity needs none.
        """
        theta = jax.lax.stop_gradient(self._caller_theta(theta))
        dtype, theta, m, solve, mode_its, z_prior, observations = self._draw_phases(key, theta, num_draws, init)
        with jax.enable_x64(True):
            def one(zp, obs):
                step, it = solve(self._noise(theta, m, zp, obs))
                return m + step, it

            z, its = one(z_prior, observations) if num_draws is None else jax.vmap(one)(z_prior, observations)
            out = self._out(z, dtype)
            if return_info:
                return out, {"mean": self._out(m, dtype), "iterations": its, "mode_iterations": mode_its}
            return out

    @_compiled("num_draws", "return_info")
    def sample_weighted(self, key, theta: dict, num_draws: int, *, init: dict | None = None,
                        return_info: bool = False):
        """``num_draws`` draws and their self-normalised log importance weights.

        log w_i = log p(y, z_i, theta) - log N(z_i; m, H^-1) + const, normalised so that
        ``logsumexp(log_w) == 0``; uniform (all ``-log num_draws``) up to rounding for exact blocks.
        No gradient in theta, as for ``sample``; ``init`` and ``return_info`` as for ``sample``
        (the third value returned is then the info dict).
        """
        theta = jax.lax.stop_gradient(self._caller_theta(theta))
        dtype, theta, m, solve, mode_its, z_prior, observations = self._draw_phases(key, theta, num_draws, init)
        with jax.enable_x64(True):
            def one(zp, obs):
                eps = self._noise(theta, m, zp, obs)
                step, it = solve(eps)
                z = m + step
                # (z - m)^T H (z - m) = step . eps, so no further HVP is needed.
                return z, self._log_joint(theta, z) + 0.5 * jnp.vdot(step, eps), it

            z, log_w, its = jax.vmap(one)(z_prior, observations)
            log_w = log_w - jax.scipy.special.logsumexp(log_w)
            out = self._out(z, dtype), log_w.astype(dtype)
            if return_info:
                return (*out, {"mean": self._out(m, dtype), "iterations": its, "mode_iterations": mode_its})
            return out

    @_compiled("num_probes", "lanczos_steps")
    def log_marginal(self, theta: dict, key=None, *, num_probes: int = 16, lanczos_steps: int = 50,
                     init: dict | None = None):
        """log p(y, theta) = log of the integral of p(y, z, theta) over z (Laplace blocks: its Laplace approximation).

        log p(y, z=m, theta) + D/2 log(2 pi) - 1/2 log det H. On the dense path log det H comes
        from the Cholesky factor: exact for Normal blocks, and differentiable in theta. On the CG
        path, once ``prepare_exact_marginal`` has built the sparse precision, it is exact too (the
        grouped elimination of :mod:`autoreparam.precision`; ``key`` is then not used). Otherwise the
        CG path needs ``key`` and is a stochastic Lanczos quadrature ESTIMATE (``num_probes``
        Rademacher probes, ``lanczos_steps`` steps on the Jacobi-scaled H): unbiased in log det
        up to the quadrature error; its gradient in theta is not provided (log det is held
        fixed; for the gradient of log p(y, theta) use Fisher's identity with ``sample``).
        ``init`` (block values near the mode) warm-starts the mean/mode solve, as for ``mean``.
        """
        if not self.exact_marginal and key is None:
            raise InputError(
                f"BlockConditional.log_marginal: block ({', '.join(self._block_names)}) has size {self.size}, "
                f"above dense_below, and no sparse precision ({self.precision_note}): exact log det H needs "
                f"prepare_exact_marginal() (exact blocks) or method='dense' (size at most {DENSE_LIMIT}); "
                "pass key= for a stochastic Lanczos estimate")
        dtype = _caller_float()
        # The sparse H serves float64 callers on the dense path (CollapsedPosterior runs in float64):
        # under a float32 caller's gradient JAX would linearise its float64 factorisation outside the
        # float64 context, with a dtype warning per step (HybridELBO's exact marginal). On the CG path
        # it is the only exact log det H, so it serves every caller.
        sparse = self.precision is not None and (dtype == jnp.float64 or not self.dense)
        slq = not self.dense and not sparse
        probes = (jax.random.rademacher(key, (num_probes, self.size), dtype=jnp.int32).astype(dtype) if slq
                  else jnp.zeros((0, self.size), dtype))

        init_flat = jnp.zeros(self.size, dtype) if init is None else self._ravel_caller(init)

        def log_marginal64(theta, probes, init_flat):
            theta = self._as_theta(theta)
            if sparse:
                log_joint0, grad0, q = self._exact_parts(theta, assemble=False)
                return (log_joint0 + self.precision.log_integral(q, grad0)
                        + 0.5 * self.size * math.log(2 * math.pi))
            m, matvec, _, chol, _ = self._mode(theta, None if init is None else init_flat.astype(jnp.float64))
            if self.dense:
                log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
            else:
                log_det = jax.lax.stop_gradient(
                    self._slq_log_det(matvec, probes.astype(jnp.float64), lanczos_steps))
            return self._log_joint(theta, m) + 0.5 * self.size * math.log(2 * math.pi) - 0.5 * log_det

        return float64_with_gradient(log_marginal64)(self._caller_theta(theta), jax.lax.stop_gradient(probes),
                                                     jax.lax.stop_gradient(init_flat))

    def _slq_log_det(self, matvec, probes, steps):
        """log det H = sum log diag(H) + log det(S H S), S = diag(H)^-1/2, the latter by SLQ."""
        diag = self._diag(matvec)
        scale = 1.0 / jnp.sqrt(diag)
        scaled = lambda v: scale * matvec(scale * v)
        steps = min(steps, self.size)

        def quadrature(probe):
            def step(carry, _):
                v, v_prev, beta, done = carry
                w = scaled(v) - beta * v_prev
                alpha = jnp.vdot(w, v)
                w = w - alpha * v
                beta_next = jnp.linalg.norm(w)
                # After the Krylov space is exhausted, pad with decoupled unit eigenvalues (weight 0).
                stop = done | (beta_next < 1e-10 * jnp.abs(alpha))
                v_next = jnp.where(stop, 0.0, w / jnp.where(stop, 1.0, beta_next))
                return (v_next, v, jnp.where(stop, 0.0, beta_next), stop), \
                    (jnp.where(done, 1.0, alpha), jnp.where(stop, 0.0, beta_next))

            v0 = probe / jnp.linalg.norm(probe)
            init = (v0, jnp.zeros_like(v0), jnp.asarray(0.0), jnp.asarray(False))
            _, (alphas, betas) = jax.lax.scan(step, init, None, length=steps)
            tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
            eigenvalues, eigenvectors = jnp.linalg.eigh(tridiagonal)
            return self.size * jnp.sum(eigenvectors[0] ** 2 * jnp.log(eigenvalues))

        return jnp.sum(jnp.log(diag)) + jnp.mean(jax.vmap(quadrature)(probes))

    def covariance(self, theta: dict) -> jax.Array:
        """Dense H^-1 at the mean/mode (flat order of ``flatten``): small blocks only (tests)."""
        self._check_dense_size("covariance")
        dtype = _caller_float()
        with jax.enable_x64(True):
            theta = self._as_theta(theta)
            m = self._mode(theta, None)[0]
            H = self._dense_H(self._hvp_at(theta, m)[1])
            return jnp.linalg.inv(H).astype(dtype)

    def _check_dense_size(self, what):
        if self.size > DENSE_LIMIT:
            raise InputError(
                f"BlockConditional.{what}: block ({', '.join(self._block_names)}) has size {self.size}, "
                f"above DENSE_LIMIT={DENSE_LIMIT}")
