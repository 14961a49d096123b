"""MCMC with the conditionally Gaussian block integrated out: NUTS on theta only.

Given the hyperparameters theta, the block z is Gaussian, p(z | theta, y) = N(m, H^-1), so

    log p(y, theta) = log p(y, z, theta) - log N(z; m, H^-1)   at z = m
                    = log p(y, m, theta) + D/2 log(2 pi) - 1/2 log det H

with log det H exact (``BlockConditional.log_marginal``): where the block's Normal terms have
residual Jacobians that do not depend on theta (gathers, sums, products with data), H is
assembled from them and integrated out by eliminating small groups and factoring the Schur complement (:mod:`autoreparam.precision`);
otherwise H comes from D Hessian-vector products and a dense Cholesky. NUTS samples the
unconstrained theta (log-Jacobians of the transforms included) from this marginal; each theta
draw then gets one exact draw of z from its conditional, and the model is re-run at (theta, z)
for its deterministic sites, so the samples hold every latent and deterministic site of the
original model, by chain.

- :class:`CollapsedPosterior`: the potential function (``NUTS(potential_fn=...)``), the
  transforms, initial values and :meth:`~CollapsedPosterior.complete` (the z draws).
- :func:`collapsed_mcmc`: the one-line entry point; :func:`gibbs_mcmc`: HMC-within-Gibbs with
  NUTS on theta given z and z drawn exactly given theta (no log det H, so no size limit
  beyond the conditional solver's), for blocks too large to factor at every gradient.

Laplace blocks (Bernoulli/Binomial logits, Poisson log rate) have no exact marginal: collapsed
NUTS then targets the Laplace approximation of p(theta | y) and is only run with
``approximate=True``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import diagnostics, handlers
from numpyro.distributions import biject_to
from numpyro.distributions.util import sum_rightmost
from numpyro.infer import MCMC, NUTS, HMCGibbs

from .arguments import whole_number
from .block import GaussianBlock, block_of_model, discrete_latent_sites, refuse_discrete_latent
from .conditional import DENSE_LIMIT, BlockConditional, float64_with_gradient
from .errors import InputError, ModelError
from .threads import one_blas_thread
from .trace import isolated_from_handlers

__all__ = ["CollapsedPosterior", "CollapsedResult", "collapsed_mcmc", "gibbs_mcmc", "gibbs_kernel", "choose_mcmc",
           "MCMCChoice", "COLLAPSED_LIMIT", "AUTO_COLLAPSED_LIMIT"]

#: Largest block whose marginal collapsed NUTS computes: every gradient of the potential forms
#: the dense D x D precision (sparse assembly or D Hessian-vector products) and factors it.
COLLAPSED_LIMIT = DENSE_LIMIT

#: Largest block :func:`choose_mcmc` integrates out. Each collapsed gradient factors a dense
#: matrix of up to D x D (the Schur complement after the groups the sparse assembly eliminates), so
#: its cost grows like D^3 (measured in benchmarks/README.md, "Collapsed NUTS"; the limit was set
#: for the HVP path and not re-measured for the sparse one).
AUTO_COLLAPSED_LIMIT = 500

_COMPLETE_BATCH = 64


def _key(rng_key):
    if isinstance(rng_key, (int, np.integer)):
        return jax.random.PRNGKey(int(rng_key))
    return rng_key


def _int32_data(tree):
    """Numpy inputs as fresh copies, integer ones as int32 when x64 is off.

    The conditional traces the model in float64 and the caller's NUTS in float32; JAX caches
    index arithmetic on an int64 numpy array with the integer width of whichever ran first, and
    the other then fails (``lax.add`` of int32 and int64). int32 data mean the same in both, and
    copies keep the caller's own arrays out of that cache (see ``fit.inputs_for_float64``).
    """
    narrow = not jax.config.jax_enable_x64

    def cast(x):
        if not isinstance(x, np.ndarray):
            return x
        if narrow and x.dtype.kind in "iu" and x.dtype.itemsize > 4:
            return x.astype(np.int32)
        return np.array(x)

    return jax.tree.map(cast, tree)


def _check_block(block, where: str, approximate: bool, limit: int | None):
    if block is None:
        raise InputError(f"{where}: the model has no conditionally Gaussian block (block=None); "
                         "expected a GaussianBlock of at least one Gaussian latent site")
    if not isinstance(block, GaussianBlock):
        raise InputError(f"{where}: block must be an autoreparam GaussianBlock, got {type(block).__name__}")
    if not block.sites:
        raise InputError(f"{where}: the model has no conditionally Gaussian block (no block sites)")
    if limit is not None and block.size > limit:
        raise InputError(
            f"{where}: block ({', '.join(block.names)}) has size {block.size}, above the limit {limit} "
            "for the exact log det H of the marginal; use gibbs_mcmc")
    if not block.exact and not approximate:
        laplace = [f"{lik.name} ({lik.family})" for lik in block.likelihoods if not lik.exact]
        raise InputError(
            f"{where}: likelihood {', '.join(laplace)} is not Normal, so the marginal is a Laplace "
            "approximation; pass approximate=True to sample the approximate posterior")


class CollapsedPosterior:
    """p(theta | y) of ``model(*args, **kwargs)`` with ``block`` integrated out, for NumPyro's NUTS.

    ``potential_fn`` takes a dict of UNCONSTRAINED theta values and returns -log p(y, theta)
    minus the log-Jacobians of the transforms; it is computed (value and gradient together) in
    float64 and returned in the dtype of its input.

    >>> import numpyro, numpyro.distributions as dist
    >>> from numpyro.infer import NUTS
    >>> from autoreparam.block import BlockSite, BlockLikelihood, GaussianBlock
    >>> def model(y):
    ...     s = numpyro.sample("s", dist.HalfNormal(1.0))
    ...     a = numpyro.sample("a", dist.Normal(0.0, s).expand([2]).to_event(1))
    ...     numpyro.sample("y", dist.Normal(a, 1.0).to_event(1), obs=y)
    >>> block = GaussianBlock((BlockSite("a", (2,), "Normal"),),
    ...                       (BlockLikelihood("y", "Normal", "identity"),), ("s",))
    >>> post = CollapsedPosterior(model, block, (np.array([2.0, -4.0]),))
    >>> # u = log s = 0: -[log N(y; 0, 2 I) + log HalfNormal(1; 1) + log s]
    >>> round(float(post.potential_fn({"s": jnp.array(0.0)})), 4)
    8.2568
    >>> kernel = NUTS(potential_fn=post.potential_fn)   # then MCMC(kernel, ...).run(key, init_params=...)
    >>> u = {"s": jnp.array([[0.0, 0.5, -0.5]])}            # (chains, draws), unconstrained
    >>> samples = post.complete(jax.random.PRNGKey(2), post.constrain(u))
    >>> sorted(samples), samples["a"].shape
    (['a', 's'], (1, 3, 2))
    """

    def __init__(self, model: Callable, block: GaussianBlock, args: tuple = (), kwargs: dict | None = None,
                 *, approximate: bool = False, seed: int = 0):
        _check_block(block, "collapsed NUTS", approximate, COLLAPSED_LIMIT)
        self.model = model
        self.block = block
        self.args = _int32_data(tuple(args))
        self.kwargs = _int32_data(dict(kwargs or {}))
        self.approximate = not block.exact
        trace = handlers.trace(handlers.seed(model, seed)).get_trace(*self.args, **self.kwargs)
        refuse_discrete_latent(trace, "collapsed NUTS")
        self._model_key = jax.random.PRNGKey(0)
        self.conditional = BlockConditional(model, block, self.args, self.kwargs, method="dense", seed=seed)
        self.theta_names = tuple(block.theta)
        self._theta_example = {n: jnp.asarray(trace[n]["value"]) for n in self.theta_names}
        self._block_names = set(block.names)
        self._latent_names = tuple(n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"])
        self._deterministic_names = tuple(n for n, s in trace.items() if s["type"] == "deterministic")
        self.potential_fn = self._make_potential()
        # Draws per compiled chunk of ``complete``: at most ~32 MB of dense precisions at once.
        self._chunk = max(1, min(_COMPLETE_BATCH, 4_000_000 // (block.size * block.size)))
        # One program per posterior for every call of ``complete`` (chunk index and theta in, draws out).
        self._complete_chunk = jax.jit(self._complete_chunk_fn)

    # --------------------------------------------------------------- transforms

    def _transformed(self, u: dict) -> tuple[dict, jax.Array]:
        """Constrained theta and the sum of the log-Jacobians (by the model's own supports)."""
        theta, log_det = {}, []

        def constrain(msg):
            name = msg["name"]
            if msg["type"] != "sample" or name not in u:
                # The block's values do not matter here; zeros avoid a random draw (float64 random
                # bits inside a float32 jit do not lower).
                if name in self._block_names:
                    return jnp.zeros(msg["fn"].shape(msg["kwargs"].get("sample_shape", ())))
                return None
            transform = biject_to(msg["fn"].support)
            value = transform(u[name])
            ladj = transform.log_abs_det_jacobian(u[name], value)
            ladj = sum_rightmost(ladj, jnp.ndim(ladj) - jnp.ndim(value) + len(msg["fn"].event_shape))
            if msg["scale"] is not None:
                ladj = msg["scale"] * ladj
            theta[name] = value
            log_det.append(jnp.sum(ladj))
            return value

        # A key made once, outside: a seed 0 would build it inside the potential's float64 trace,
        # where JAX warns that it truncates an int64.
        model = handlers.substitute(handlers.seed(self.model, self._model_key), substitute_fn=constrain)
        handlers.trace(model).get_trace(*self.args, **self.kwargs)
        return theta, sum(log_det, jnp.zeros(()))

    def constrain(self, u: dict) -> dict:
        """Constrained theta of unconstrained ``u`` (any leading batch dims, e.g. chains and draws)."""
        if not self.theta_names:
            return {}
        first = np.ndim(u[self.theta_names[0]]) - np.ndim(self._theta_example[self.theta_names[0]])
        fn = lambda x: self._transformed(x)[0]
        for _ in range(first):
            fn = jax.vmap(fn)
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
        # In float64 like the potential (integer data indices of a vmapped model mix int64 and
        # int32 in a float32 trace).
        with jax.enable_x64(True):
            theta = fn({n: jnp.asarray(v, jnp.float64) for n, v in u.items()})
            return {n: v.astype(dtype) for n, v in theta.items()}

    def unconstrain(self, theta: dict) -> dict:
        """Unconstrained values of a single constrained theta (the inverse of :meth:`constrain`)."""
        supports = {}

        def record(msg):
            if msg["type"] == "sample" and msg["name"] in theta:
                supports[msg["name"]] = msg["fn"].support
            return None

        handlers.trace(handlers.substitute(handlers.seed(self.model, 0), substitute_fn=record)).get_trace(
            *self.args, **self.kwargs)
        return {n: biject_to(supports[n]).inv(jnp.asarray(theta[n])) for n in self.theta_names}

    def init_params(self, rng_key, num_chains: int | None = None) -> dict:
        """Unconstrained initial values, uniform in (-2, 2) like ``init_to_uniform`` (a leading
        ``num_chains`` axis when given)."""
        rng_key = _key(rng_key)
        example = self.unconstrain(self._theta_example)
        shape = () if num_chains is None else (num_chains,)
        keys = jax.random.split(rng_key, len(self.theta_names))
        return {n: jax.random.uniform(k, shape + jnp.shape(example[n]), minval=-2.0, maxval=2.0)
                for n, k in zip(self.theta_names, keys)}

    # --------------------------------------------------------------- potential

    def _neg_log_density(self, u: dict) -> jax.Array:
        theta, log_det = self._transformed(u)
        return -(self.conditional.log_marginal(theta) + log_det)

    def _make_potential(self):
        # float64 inside, value and gradient alike, for callers in either precision.
        return float64_with_gradient(
            lambda u: self._neg_log_density({n: jnp.asarray(v, jnp.float64) for n, v in u.items()}))

    # --------------------------------------------------------------- completion

    def _draw_block(self, keys, theta):
        """Flat z draws, one per theta draw of a chunk (leading axis): z = m + L^-T eps from the factor
        the marginal uses (no perturbation-optimisation noise: two more runs of the model).

        The model runs (the Q entries and the gradient at z = 0, or the HVPs of the dense path) are
        vmapped over the chunk, but the dense factorisation and triangular solves of each draw run by
        themselves (``lax.map``). jaxlib's batched LAPACK kernels split a batch over XLA's intra-op
        thread pool and block a worker of that same pool until the pieces are done; XLA runs
        independent operations at once, so two batched solves (the mean's and the noise's) can hold
        every worker of a 2-thread pool waiting on pieces that no worker is left to run: a deadlock
        (tensor_small: every thread in a futex wait, no CPU). One matrix at a time runs inline.
        """
        cond = self.conditional
        eps = jax.vmap(lambda k: jax.random.normal(k, (self.block.size,), jnp.float64))(keys)
        if cond.sparse:  # by the marginal's own elimination, no dense H
            parts = lambda th: cond._exact_parts(cond._as_theta(th), assemble=False)
            if theta:
                _, grad0, q = jax.vmap(parts)(theta)
            else:  # no theta: one H for every draw
                _, grad0, q = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(keys),) + jnp.shape(x)), parts({}))
            draw = lambda a: cond.precision.draw(*a)
            if cond.precision.vectorizable:  # no LAPACK call to batch
                return jax.vmap(draw)((q, grad0, eps))
            return jax.lax.map(draw, (q, grad0, eps))

        def dense_draw(args):
            th, e = args
            m, _, _, chol, _ = cond._mode(cond._as_theta(th), None)
            return m + jax.scipy.linalg.solve_triangular(chol.T, e, lower=False)

        return jax.lax.map(dense_draw, (theta, eps))

    def _complete_chunk_fn(self, key, index, theta):
        """Every latent and deterministic site for one chunk of theta draws (``_chunk`` of them)."""
        keys = jax.random.split(jax.random.fold_in(key, index), 2 * self._chunk)
        z = jax.vmap(self.conditional._unravel)(self._draw_block(keys[:self._chunk], theta))

        def run(key_model, th, zz):
            tr = handlers.trace(handlers.substitute(handlers.seed(self.model, key_model), data={**th, **zz})).get_trace(
                *self.args, **self.kwargs)
            return {name: tr[name]["value"] for name in self._latent_names + self._deterministic_names}

        return jax.vmap(run)(keys[self._chunk:], theta, z)

    @one_blas_thread()
    def complete(self, rng_key, theta: dict, batch_shape: tuple[int, ...] | None = None) -> dict:
        """Every latent and deterministic site of the model for each draw of (constrained) ``theta``.

        One exact draw of z from p(z | theta, y) per theta draw (Laplace: from N(mode, H^-1)),
        then the model is run at (theta, z) for its deterministic sites. ``theta`` values carry
        any leading batch dims (chains, draws), which the result keeps. Draws are made in chunks
        of a fixed size by one compiled program, which every later call reuses. A model with no
        latent site outside the block has no theta: pass ``{}`` and the ``batch_shape`` of draws.
        """
        rng_key = _key(rng_key)
        if self.theta_names:
            name0 = self.theta_names[0]
            batch = np.shape(theta[name0])[:np.ndim(theta[name0]) - np.ndim(self._theta_example[name0])]
        elif batch_shape is None:
            raise InputError("CollapsedPosterior.complete: the model has no theta (every latent site is in the "
                             "block); pass batch_shape=, the leading shape of the draws")
        else:
            batch = tuple(batch_shape)
        n = int(np.prod(batch))
        chunk = self._chunk
        padded = -(-n // chunk) * chunk
        # Padding, chunking and gathering in numpy: eager JAX ops would compile anew for every new
        # number of draws (seconds, against milliseconds of drawing for a small block).
        flat = {k: np.reshape(np.asarray(v), (n,) + np.shape(self._theta_example[k])) for k, v in theta.items()
                if k in self.theta_names}
        flat = {k: np.concatenate([v, np.repeat(v[:1], padded - n, axis=0)]) for k, v in flat.items()}
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
        # Traced wholly in float64: the draws use float64 random bits, which do not lower inside a
        # float32 jit. Every chunk is dispatched before the first is read back.
        with jax.enable_x64(True):
            parts = [self._complete_chunk(rng_key, np.int32(i // chunk), {k: v[i:i + chunk] for k, v in flat.items()})
                     for i in range(0, padded, chunk)]
            out = {k: np.concatenate([np.asarray(p[k]) for p in parts])[:n] for k in parts[0]}
        out = {k: np.reshape(v, tuple(batch) + np.shape(v)[1:]) for k, v in out.items()}
        # device_put, not jnp.asarray: the latter compiles a copy for every new shape (0.03-0.4 s).
        return {k: jax.device_put(v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v)
                for k, v in out.items()}


class CollapsedResult:
    """The samples of a collapsed (or Gibbs) MCMC run, by chain, with MCMC-style accessors.

    ``mcmc`` is the underlying ``numpyro.infer.MCMC`` (None for exact draws: a model without theta); ``method`` names the method, ``reason`` says why
    :func:`autoreparam.auto_mcmc` chose it; ``num_gradients`` the gradient evaluations
    (leapfrog steps, all chains) after warm-up; ``seconds`` the wall time of warm-up, sampling
    and completion (compilation included).
    """

    def __init__(self, samples: dict, mcmc, method: str, *, num_gradients: int, seconds: float, divergences: int,
                 reason: str = ""):
        self._samples = samples  # site -> (chains, draws, ...)
        self.mcmc = mcmc
        self.method = method
        self.reason = reason  # why this method (``auto_mcmc``)
        self.num_gradients = int(num_gradients)
        self.seconds = float(seconds)
        self.divergences = int(divergences)

    def get_samples(self, group_by_chain: bool = False) -> dict:
        if group_by_chain:
            return dict(self._samples)
        return {k: jnp.reshape(v, (-1,) + jnp.shape(v)[2:]) for k, v in self._samples.items()}

    def get_extra_fields(self, group_by_chain: bool = False) -> dict:
        return {} if self.mcmc is None else self.mcmc.get_extra_fields(group_by_chain=group_by_chain)

    def summary(self, prob: float = 0.9) -> dict:
        """``numpyro.diagnostics.summary`` of every site (mean, std, quantiles, n_eff, r_hat)."""
        return diagnostics.summary({k: np.asarray(v) for k, v in self._samples.items()}, prob=prob, group_by_chain=True)

    def print_summary(self, prob: float = 0.9) -> None:
        diagnostics.print_summary({k: np.asarray(v) for k, v in self._samples.items()}, prob=prob, group_by_chain=True)
        print(f"Number of divergences: {self.divergences}")


def _run_mcmc(kernel, num_warmup, num_samples, num_chains, chain_method, progress_bar, rng_key, *model_args,
              prefix="", init_params=None, **model_kwargs):
    """One MCMC run (warm-up and sampling in one compiled loop); sampling gradients and divergences."""
    steps, diverging = prefix + "num_steps", prefix + "diverging"
    mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                chain_method=chain_method, progress_bar=progress_bar)
    mcmc.run(rng_key, *model_args, extra_fields=(steps, diverging), init_params=init_params, **model_kwargs)
    extra = mcmc.get_extra_fields()
    return mcmc, dict(num_gradients=int(np.sum(extra[steps])), divergences=int(np.sum(extra[diverging])))


def _check_chain_sizes(where: str, num_warmup, num_samples, num_chains) -> None:
    whole_number(where, "num_warmup", num_warmup, minimum=0)
    whole_number(where, "num_samples", num_samples)
    whole_number(where, "num_chains", num_chains)


def _refuse_vectorized_chains(where: str, chain_method: str) -> None:
    # A vmap over chains batches the block's Cholesky factorisations and triangular solves; two
    # independent batched LAPACK kernels can deadlock XLA's CPU thread pool (see complete).
    if chain_method == "vectorized":
        raise InputError(f"{where}: chain_method='vectorized' batches the block's dense factorisations over "
                         "chains, which can deadlock jaxlib's LAPACK kernels on CPU; use 'sequential' "
                         "(the default) or 'parallel'")


@one_blas_thread()
def collapsed_mcmc(model: Callable, *args, block: GaussianBlock | None = None, num_warmup: int = 500,
                   num_samples: int = 500, num_chains: int = 1, chain_method: str = "sequential",
                   rng_key=0, approximate: bool = False, progress_bar: bool = True, **kwargs) -> CollapsedResult:
    """NUTS on theta of ``model(*args, **kwargs)`` with the Gaussian ``block`` integrated out.

    ``block=None`` takes the block the analysis finds (``autoreparam.block.find_block``).
    Returns a :class:`CollapsedResult` whose samples hold every latent and deterministic site
    of ``model``, by chain (``print_summary()`` works on them). ``approximate=True`` allows
    Laplace blocks (non-Normal likelihoods): the posterior is then the Laplace approximation's.

    >>> result = autoreparam.collapsed_mcmc(model, sigma, y=y, block=block)  # doctest: +SKIP
    >>> result.print_summary()  # doctest: +SKIP
    """
    _check_chain_sizes("collapsed_mcmc", num_warmup, num_samples, num_chains)
    _refuse_vectorized_chains("collapsed_mcmc", chain_method)
    args, kwargs = _int32_data(args), _int32_data(kwargs)
    if block is None:
        block = _find_block(model, args, kwargs, "collapsed NUTS")
    posterior = CollapsedPosterior(model, block, args, kwargs, approximate=approximate)
    rng_key = _key(rng_key)
    key_init, key_mcmc, key_complete = jax.random.split(rng_key, 3)
    start = time.perf_counter()
    if not posterior.theta_names:  # p(z | y) itself is the Gaussian (or its Laplace approximation): no chain
        samples = posterior.complete(key_complete, {}, batch_shape=(num_chains, num_samples))
        jax.block_until_ready(samples)
        method = "Laplace draws (no theta, approximate)" if posterior.approximate else "exact draws (no theta)"
        return CollapsedResult(samples, None, method, seconds=time.perf_counter() - start, num_gradients=0,
                               divergences=0)
    init = posterior.init_params(key_init, None if num_chains == 1 else num_chains)
    mcmc, counts = _run_mcmc(
        NUTS(potential_fn=posterior.potential_fn), num_warmup, num_samples, num_chains, chain_method,
        progress_bar, key_mcmc, init_params=init)
    u = mcmc.get_samples(group_by_chain=True)
    samples = posterior.complete(key_complete, posterior.constrain(u))
    jax.block_until_ready(samples)
    method = "collapsed NUTS" + (" (Laplace, approximate)" if posterior.approximate else "")
    return CollapsedResult(samples, mcmc, method, seconds=time.perf_counter() - start, **counts)


@one_blas_thread()
def gibbs_mcmc(model: Callable, *args, block: GaussianBlock | None = None, num_warmup: int = 500,
               num_samples: int = 500, num_chains: int = 1, chain_method: str = "sequential", rng_key=0,
               approximate: bool = False, progress_bar: bool = True, **kwargs) -> CollapsedResult:
    """HMC-within-Gibbs: NUTS on theta given z, z drawn exactly from p(z | theta, y) given theta.

    No log det H is needed, so it applies to blocks of any size the conditional's CG solver
    handles; it mixes slowly when the data pin z weakly (theta and z then move together).
    ``approximate=True`` allows Laplace blocks (z then drawn from the Laplace approximation,
    so the chain is approximate).

    >>> result = autoreparam.gibbs_mcmc(model, sigma, y=y, block=block)  # doctest: +SKIP
    """
    _check_chain_sizes("gibbs_mcmc", num_warmup, num_samples, num_chains)
    _refuse_vectorized_chains("gibbs_mcmc", chain_method)
    args, kwargs = _int32_data(args), _int32_data(kwargs)
    if block is None:
        block = _find_block(model, args, kwargs, "Gibbs MCMC")
    kernel, args, kwargs = gibbs_kernel(model, block, args, kwargs, approximate=approximate)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    start = time.perf_counter()
    # The whole chain runs in float64: the conditional's draws use float64 random bits, which do
    # not lower inside a float32 jit.
    with jax.enable_x64(True):
        mcmc, counts = _run_mcmc(kernel, num_warmup, num_samples, num_chains, chain_method,
                                                     progress_bar, _key(rng_key), *args, prefix="hmc_state.",
                                                     **kwargs)
        samples = {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
                   for k, v in mcmc.get_samples(group_by_chain=True).items()}
        jax.block_until_ready(samples)
    return CollapsedResult(samples, mcmc, "Gibbs (NUTS on theta, exact z)", seconds=time.perf_counter() - start,
                           **counts)


def gibbs_kernel(model: Callable, block: GaussianBlock, args: tuple = (), kwargs: dict | None = None, *,
                 approximate: bool = False):
    """NumPyro's ``HMCGibbs``: NUTS on theta given z, z drawn exactly given theta; with the (int32) inputs
    to run it on, as ``(kernel, args, kwargs)``. Run it inside ``jax.enable_x64(True)``: the exact
    draws use float64 random bits."""
    _check_block(block, "Gibbs MCMC", approximate, None)
    args, kwargs = _int32_data(tuple(args)), _int32_data(dict(kwargs or {}))
    with isolated_from_handlers():
        refuse_discrete_latent(handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs), "Gibbs MCMC")
    conditional = BlockConditional(model, block, args, kwargs)

    def gibbs_fn(rng_key, gibbs_sites, hmc_sites):
        return conditional.sample(rng_key, {n: hmc_sites[n] for n in block.theta}, init=gibbs_sites)

    return HMCGibbs(NUTS(model), gibbs_fn=gibbs_fn, gibbs_sites=list(block.names)), args, kwargs


@dataclass(frozen=True)
class MCMCChoice:
    """The MCMC method :func:`choose_mcmc` picks: ``"collapsed"`` (NUTS on theta, the block integrated out) or
    ``"offsets"`` (NUTS on ``autoreparam.reparameterize(model)``), the block it saw and a one-line reason."""

    method: str
    reason: str
    block: GaussianBlock | None = None

    def __str__(self) -> str:
        return f"{self.method}: {self.reason}"


def choose_mcmc(model: Callable, *args, block: GaussianBlock | None = None, **kwargs) -> MCMCChoice:
    """Collapsed NUTS where the block is exactly Gaussian and at most ``AUTO_COLLAPSED_LIMIT`` values,
    NUTS on the offsets otherwise (no block, a Laplace block, or a block too large for a dense H at
    every gradient). ``block=None`` runs the block search on ``model(*args, **kwargs)``.

    >>> import numpyro, numpyro.distributions as dist
    >>> def model(y):
    ...     s = numpyro.sample("s", dist.HalfNormal(1.0))
    ...     a = numpyro.sample("a", dist.Normal(0.0, s).expand([2]).to_event(1))
    ...     numpyro.sample("y", dist.Normal(a, 1.0).to_event(1), obs=y)
    >>> print(choose_mcmc(model, np.array([2.0, -4.0])))
    collapsed: exact Gaussian block a (2 values) integrated out; NUTS on s
    """
    with isolated_from_handlers():
        discrete = discrete_latent_sites(handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs))
    if discrete:
        return MCMCChoice("offsets", f"discrete latent site {', '.join(map(repr, discrete))}: collapsed NUTS needs "
                                     "every latent site outside the block continuous", block)
    if block is None:
        block, note = block_of_model(model, args, kwargs)
        if block is None:
            return MCMCChoice("offsets", f"no conditionally Gaussian block ({note})")
    names = ", ".join(block.names)
    if not block.exact:
        laplace = ", ".join(f"{lik.name} ({lik.family})" for lik in block.likelihoods if not lik.exact)
        return MCMCChoice("offsets", f"block {names} has a non-Normal likelihood {laplace}: its marginal would "
                                     "only be a Laplace approximation", block)
    if block.size > AUTO_COLLAPSED_LIMIT:
        return MCMCChoice("offsets", f"block {names} has {block.size} values, above {AUTO_COLLAPSED_LIMIT} for a "
                                     "dense H at every gradient", block)
    if not block.theta:
        return MCMCChoice("collapsed", f"exact Gaussian block {names} ({block.size} values) and no other latent "
                                       "site: independent exact draws", block)
    return MCMCChoice("collapsed", f"exact Gaussian block {names} ({block.size} values) integrated out; NUTS on "
                                   f"{', '.join(block.theta)}", block)


def _find_block(model, args, kwargs, where: str) -> GaussianBlock:
    """The block the analysis finds in ``model(*args, **kwargs)``; one clear line when there is none."""
    found, note = block_of_model(model, args, kwargs)
    if found is None:
        raise InputError(f"{where}: {note}")
    return found
