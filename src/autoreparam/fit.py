"""``fit_hybrid``: hybrid variational inference in one line (AutoHybrid, HybridELBO, NaturalGradient, SVI)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer import SVI

from .arguments import whole_number
from .errors import InputError
from .hybrid import CG_THETA_POOL, AutoHybrid, HybridELBO, check_block_draws
from .natural import NaturalGradient, decaying_step_size
from .threads import one_blas_thread

__all__ = ["fit_hybrid", "HybridFit"]


@dataclass
class HybridFit:
    """The result of ``fit_hybrid``: the guide, its params, the loss per step and posterior draws.

    ``samples`` holds every latent and deterministic site of the model (numpy, float64), the
    first axis indexing draws; ``theta_pool`` is the number of proposals of theta they were resampled
    from (0: plain draws of q(theta) p(z | theta, y)), ``theta_pool_ess`` that pool's effective sample
    size (None without resampling), ``resample_theta`` the proposals per draw asked for. ``elbo`` is
    the mean of the last 10% of the losses, negated: the
    hybrid ELBO where the block's marginal is exact (see ``HybridELBO``).
    """

    guide: AutoHybrid
    params: dict
    losses: np.ndarray = field(repr=False)
    samples: dict = field(repr=False)
    seconds: float = 0.0
    resample_theta: int = 0
    theta_pool: int = 0
    theta_pool_ess: float | None = None

    @property
    def elbo(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return -float(np.mean(tail))

    def summary(self) -> dict:
        """{site: (mean, sd)} of the draws, averaged over each site's elements."""
        return {n: (float(np.mean(v)), float(np.mean(np.std(v, axis=0)))) for n, v in self.samples.items()}


def inputs_for_float64(tree):
    """The model inputs to use inside ``jax.enable_x64(True)``: float arrays as float64 JAX arrays, other
    numpy arrays as fresh copies.

    The copies keep the caller's own arrays usable afterwards with float64 off: JAX 0.10 caches the
    conversion of a numpy array by the array's identity, not by precision, so an int64 index array
    once converted under float64 stays int64 and later breaks ``x[index]`` in float32 code
    ("lax.add requires arguments to have the same dtypes, got int64, int32").
    """
    def convert(x):
        if isinstance(x, (np.ndarray, jax.Array)) and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x, dtype=jnp.float64)
        return np.array(x) if isinstance(x, np.ndarray) else x
    return jax.tree.map(convert, tree)


@one_blas_thread()
def fit_hybrid(model, *args, steps: int = 2000, theta_guide: str = "normal", optimizer="natural",
               step_size=None, num_particles: int = 4, block_draws: int | None = None, num_samples: int = 1000,
               seed: int = 0, block=None, init_scale: float = 0.1, progress_bar: bool = False, resample_theta="auto",
               theta_pool: int | None = None, **kwargs) -> HybridFit:
    """Fit ``model(*args, **kwargs)`` with ``AutoHybrid`` and return guide, params, losses and draws.

    ``optimizer``: ``"natural"`` (``NaturalGradient`` with ``step_size``, default
    ``decaying_step_size()``), ``"adam"`` (``numpyro.optim.Adam(step_size or 0.01)``) or any NumPyro
    optimizer. The whole fit runs under ``jax.enable_x64(True)`` (and floating-point arrays among the
    inputs are converted to float64); the global JAX setting is left as it was. Steps whose loss or
    gradient is not finite are skipped (``SVI.stable_update``).

    ``num_particles`` theta draws per step, each with ``block_draws`` z draws (``HybridELBO``; default: 1
    for exact blocks, ``LAPLACE_BLOCK_DRAWS`` importance-weighted draws for Laplace blocks); the
    returned draws of z are resampled from as many proposals each (``AutoHybrid.sample_posterior``).

    ``resample_theta``: the draws of theta are importance-resampled by p(y, theta) / q(theta) from
    one pool of this many proposals per draw (pooled SIR, ``AutoHybrid.sample_posterior``); ``"auto"``
    (default) is 4 where the block's marginal is exact (``guide.exact_marginal``: dense blocks, and
    exact blocks on the CG path through their sparse precision) and 0 (plain draws of q) elsewhere.
    On the CG path the pool is capped at ``CG_THETA_POOL`` proposals (each costs an elimination of
    the sparse H), or set by ``theta_pool``. It corrects a q(theta) that is Gaussian where the
    posterior of a scale is skewed: on radon it brought the worst sd ratio from 0.85 to 0.94
    (benchmarks/README.md).

    >>> fit = fit_hybrid(model, g, y=y, steps=500)      # doctest: +SKIP
    >>> fit.samples["tau"].mean(), fit.elbo             # doctest: +SKIP
    """
    steps = whole_number("fit_hybrid", "steps", steps)
    if not (isinstance(resample_theta, str) and resample_theta == "auto"):
        try:
            resample_theta = whole_number("fit_hybrid", "resample_theta", resample_theta, minimum=0)
        except InputError:
            raise InputError(f"fit_hybrid: resample_theta must be 'auto' or an integer >= 0, got {resample_theta!r}") \
                from None
    theta_pool = whole_number("fit_hybrid", "theta_pool", theta_pool, none_ok=True)
    num_samples = whole_number("fit_hybrid", "num_samples", num_samples)
    num_particles = whole_number("fit_hybrid", "num_particles", num_particles)
    seed = whole_number("fit_hybrid", "seed", seed, minimum=None)
    check_block_draws("fit_hybrid", block_draws)
    if not (isinstance(optimizer, str) or all(callable(getattr(optimizer, m, None)) for m in ("init", "update"))):
        raise InputError(f"fit_hybrid: optimizer={optimizer!r}: expected 'natural', 'adam' or a NumPyro optimizer")
    with jax.enable_x64(True):
        args, kwargs = inputs_for_float64((tuple(args), dict(kwargs)))
        guide = AutoHybrid(model, block=block, theta_guide=theta_guide, init_scale=init_scale)
        if optimizer == "natural":
            optim = NaturalGradient(guide, step_size if step_size is not None else decaying_step_size())
        elif optimizer == "adam":
            optim = numpyro.optim.Adam(step_size if step_size is not None else 1e-2)
        elif isinstance(optimizer, str):
            raise InputError(f"fit_hybrid: optimizer={optimizer!r}: expected 'natural', 'adam' or a NumPyro optimizer")
        else:
            optim = optimizer
        svi = SVI(model, guide, optim, HybridELBO(num_particles, block_draws=block_draws))
        key_fit, key_draw = jax.random.split(jax.random.PRNGKey(seed))
        start = time.perf_counter()
        result = svi.run(key_fit, steps, *args, progress_bar=progress_bar, stable_update=True, **kwargs)
        jax.block_until_ready(result.params)
        seconds = time.perf_counter() - start
        if resample_theta == "auto":
            resample_theta = 4 if guide.exact_marginal else 0
        if theta_pool is None and resample_theta and not guide.conditional.dense:
            theta_pool = min(resample_theta * num_samples, CG_THETA_POOL)
        draws, info = guide.sample_posterior(key_draw, result.params, *args, sample_shape=(num_samples,),
                                             resample_theta=resample_theta, theta_pool=theta_pool,
                                             block_draws=block_draws, return_info=True, **kwargs)
        samples = {k: np.asarray(v) for k, v in draws.items()}
        params = {k: np.asarray(v) for k, v in result.params.items()}
        ess = float(info["pool_ess"]) if "pool_ess" in info else None
        return HybridFit(guide, params, np.asarray(result.losses), samples, seconds, resample_theta,
                         int(info["pool_size"]), ess)
