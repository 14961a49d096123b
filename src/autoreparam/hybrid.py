"""Hybrid variational inference (seed 002): q(theta, z) = q(theta) p(z | theta, y).

theta are the latent sites outside the conditionally Gaussian block (scales, noise, anything
non-Gaussian); q(theta) is a Gaussian in their unconstrained space. The block z is drawn from its
exact conditional given theta (``conditional.BlockConditional``), so the guide never fits z.

The guide emits z as ``Delta(stop_gradient(z))``: log q(z) = 0 and no gradient flows through z,
so the gradient of ``-(log p(y, z, theta) - log q(theta))`` with respect to q's parameters is the
Fisher-identity gradient of the hybrid ELBO,

    grad_theta log p(y, theta) = E_{z ~ p(z | theta, y)} [grad_theta log p(y, z, theta)],

and no log-determinant is needed. ``HybridELBO`` has that gradient and reports the ELBO itself,
``E_q[log p(y, theta) - log q(theta)]``, where the conditional can give ``log p(y, theta)``.

Float64: the conditional's solves need it (CG tolerance 1e-8). Run the fit under
``jax.enable_x64(True)`` (``autoreparam.fit_hybrid`` does, for its own run only); the guide warns
once when it is traced with float64 disabled.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import ndtri
from numpyro import handlers
from numpyro.primitives import mutable
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import sum_rightmost
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoGuide
from numpyro.infer.initialization import init_to_median
from numpyro.infer.util import log_density

from .block import BlockLikelihood, BlockSite, GaussianBlock, block_of_model, refuse_discrete_latent  # noqa: F401 (doctest)
from .conditional import BlockConditional
from .arguments import positive_number, whole_number
from .errors import AutoreparamError, InputError, ModelError
from .trace import check_observed_sites, describe_exception, isolated_from_handlers

__all__ = ["AutoHybrid", "HybridELBO", "THETA_GUIDES", "LAPLACE_BLOCK_DRAWS", "CG_THETA_POOL"]

THETA_GUIDES = ("normal", "lowrank", "full")
#: Block size up to which the guide factorises H (Cholesky) instead of solving by CG: the dense path
#: also gives the exact ELBO at every step (the CG path gives log p(y, theta) for resampling theta
#: through the sparse precision, on request). CPU time per SVI step with 4 theta draws on the
#: tensor model (``benchmarks/bench_hybrid_scale.py --method dense|cg``, benchmarks/README.md):
#: D = 213: 7.9 ms dense, 6.2 ms CG; D = 515: 41 ms, 9.9 ms; D = 1739: 908 ms, 45 ms (CPU, under load).
HYBRID_DENSE_BELOW = 250
#: ``HybridELBO``'s default number of z draws per theta draw on Laplace blocks (exact blocks: 1), weighted by
#: self-normalised importance weights. The plain Laplace draw biases the Fisher-identity gradient; on
#: crossed_logistic at the reference theta the (prior-of-a part of the) sigma_a gradient is -15.0 from
#: plain draws and -8.1 / -5.6 / -3.8 / -2.7 / -1.9 with K = 4 / 8 / 16 / 32 / 64 weighted draws
#: (``python -m benchmarks.bench_laplace_bias``, benchmarks/README.md): the bias of a self-normalised
#: estimate falls as 1 / K, at one CG solve per draw.
LAPLACE_BLOCK_DRAWS = 16
#: Most proposals of theta ``fit_hybrid`` pools for resampling on the CG path (``sample_posterior``'s
#: ``theta_pool``; the dense path pools 4 per draw, unbounded): each is one elimination of the sparse H,
#: 24 ms of CPU on the 1,739-value tensor block (benchmarks/README.md), so 2,000 take about 50 s.
CG_THETA_POOL = 2000
#: Draws vmapped together by ``sample_posterior`` on the CG path (the rest run in sequence).
_CG_DRAW_BATCH = 16


def check_block_draws(where: str, block_draws) -> None:
    """``block_draws`` is None (the block's default) or a positive integer (numpy integers too)."""
    whole_number(where, "block_draws", block_draws, none_ok=True, what="z draws per theta draw")


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class AutoHybrid(AutoGuide):
    """Gaussian q(theta) in the unconstrained space; the block z drawn from p(z | theta, y).

    :param model: the NumPyro model.
    :param block: the ``GaussianBlock`` to integrate; ``None`` takes the one ``analyze`` finds.
    :param theta_guide: ``"normal"`` (mean-field, the default), ``"lowrank"`` or ``"full"``.
    :param init_scale: initial sd of q(theta) in the unconstrained space.
    :param rank: rank of the ``"lowrank"`` covariance factor (default: ``round(sqrt(dim theta))``).
    :param conditional_options: passed to ``BlockConditional`` (solver options; ``dense_below``
        defaults to ``HYBRID_DENSE_BELOW``, not the conditional's own ``DENSE_BELOW``: with several
        theta draws per step the factorisation pays for itself on larger blocks).

    Parameters (``prefix`` defaults to ``"auto"``): ``{prefix}_loc`` and ``{prefix}_log_scale``
    (the mean and log sd of the unconstrained theta vector), ``{prefix}_scale_tril_offdiag``
    (``"full"``: the strictly lower part of the Cholesky factor) or ``{prefix}_cov_factor``
    (``"lowrank"``).

    Laplace blocks (Bernoulli/Binomial/Poisson likelihoods) also carry ``{prefix}_block_mode``, a
    ``numpyro.mutable`` site holding the last conditional mode (a dict of block values): each step's
    Newton iterations start from it instead of from zero (``HybridELBO`` returns it as SVI's mutable
    state), and ``sample_posterior`` starts every draw's Newton from the mode at the median of q(theta).

    >>> def model(g, y=None):
    ...     tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    ...     with numpyro.plate("groups", 3):
    ...         a = numpyro.sample("a", dist.Normal(0.0, tau))
    ...     with numpyro.plate("data", len(g)):
    ...         numpyro.sample("y", dist.Normal(a[g], 0.5), obs=y)
    >>> block = GaussianBlock((BlockSite("a", (3,), "Normal"),), (BlockLikelihood("y", "Normal", "identity"),),
    ...                       ("tau",))
    >>> g, y = np.array([0, 0, 1, 2]), np.array([0.3, 0.1, -0.4, 1.2])
    >>> with jax.enable_x64(True):
    ...     guide = AutoHybrid(model, block=block)
    ...     svi = SVI(model, guide, numpyro.optim.Adam(0.05), HybridELBO())
    ...     result = svi.run(jax.random.PRNGKey(0), 200, g, y=y, progress_bar=False)
    ...     draws = guide.sample_posterior(jax.random.PRNGKey(1), result.params, g, y=y, sample_shape=(4,))
    >>> guide.theta_names, guide.z_names, draws["a"].shape
    (('tau',), ('a',), (4, 3))
    """

    def __init__(self, model, *, block: GaussianBlock | None = None, theta_guide: str = "normal",
                 init_scale: float = 0.1, rank: int | None = None, prefix: str = "auto",
                 init_loc_fn=init_to_median, **conditional_options):
        if theta_guide not in THETA_GUIDES:
            raise InputError(f"AutoHybrid: theta_guide={theta_guide!r}: expected one of {', '.join(THETA_GUIDES)}")
        init_scale = positive_number("AutoHybrid", "init_scale", init_scale)
        if block is not None and not isinstance(block, GaussianBlock):
            raise InputError(f"AutoHybrid: block must be a GaussianBlock or None, got {type(block).__name__}")
        rank = whole_number("AutoHybrid", "rank", rank, none_ok=True)
        self.block = block
        self.theta_guide = theta_guide
        self.init_scale = float(init_scale)
        self.rank = rank
        self.conditional_options = {"dense_below": HYBRID_DENSE_BELOW, **conditional_options}
        self.theta_names: tuple[str, ...] = ()
        self.z_names: tuple[str, ...] = ()
        self._warned_float32 = False
        self._compiled_draws = {}
        # z draws per call (None: the block's default, ``draws_per_theta``), and whether the call records
        # them for the loss; both set by HybridELBO through weighted_block_draws.
        self._block_draws = None
        self._record_draws = False
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    # -- set-up ------------------------------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs):
        # Before NumPyro's set-up, which would try to enumerate a discrete site (and ask for funsor) and
        # answer NaN data with "Cannot find valid initial parameters".
        try:
            with isolated_from_handlers():
                first = handlers.trace(handlers.seed(self.model, 0)).get_trace(*args, **kwargs)
        except AutoreparamError:
            raise
        except Exception as exc:
            raise ModelError(f"AutoHybrid: the model raised {describe_exception(exc)} when run on these "
                             "inputs") from exc
        check_observed_sites(first)
        refuse_discrete_latent(first, "AutoHybrid")
        super()._setup_prototype(*args, **kwargs)
        tr = self.prototype_trace
        for name, site in tr.items():
            if site["type"] == "plate" and site["args"][1] is not None and site["args"][1] != site["args"][0]:
                raise ModelError(f"AutoHybrid: plate '{name}' is subsampled ({site['args'][1]} of "
                                 f"{site['args'][0]}); the exact conditional of the block needs every "
                                 "observation: fit without subsampling")
        if self.block is None:
            self.block = _find_block(self.model, args, kwargs)
        latent = [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]
        block = self.block
        for s in block.sites:
            if s.name not in latent:
                raise ModelError(f"AutoHybrid: block site '{s.name}' is not a latent sample site of the model")
            shape = tuple(jnp.shape(tr[s.name]["value"]))
            if shape != tuple(s.shape):
                raise ModelError(f"AutoHybrid: block site '{s.name}' has shape {shape} in the model, the block "
                                 f"says {tuple(s.shape)}")
        self.z_names = tuple(n for n in latent if n in block.names)
        self.theta_names = tuple(n for n in latent if n not in block.names)
        for lik in block.likelihoods:
            site = tr.get(lik.name)
            if site is None or site["type"] != "sample":
                raise ModelError(f"AutoHybrid: block likelihood '{lik.name}' is not a sample site of the model")
            if not site["is_observed"]:
                raise ModelError(f"AutoHybrid: likelihood '{lik.name}' of the block is not observed in the inputs "
                                 "the guide was set up with; pass its data")
        if not all(_concrete(x) for x in jax.tree.leaves((args, kwargs))):
            raise InputError("AutoHybrid: the guide must be set up (its first call, e.g. svi.init) on concrete "
                             "inputs, not inside jit or vmap: the conditional of the block is built on them")
        self._theta_shapes = {n: tuple(jnp.shape(self._init_locs[n])) for n in self.theta_names}
        self._theta_sizes = {n: math.prod(s) for n, s in self._theta_shapes.items()}
        self.theta_dim = sum(self._theta_sizes.values())
        self._setup_inputs = (args, kwargs)
        # Built once, on the data of the set-up call: bad input (block too large for the solver,
        # unsupported link) fails here, and later calls (Predictive with y=None, new covariates)
        # draw z from the conditional given the data the guide was fitted on.
        with isolated_from_handlers():
            self.conditional = BlockConditional(self.model, self.block, args, kwargs, **self.conditional_options)

    @property
    def param_names(self) -> dict[str, str]:
        """{role: param name} of q(theta): loc, log_scale and offdiag (full) or cov_factor (lowrank)."""
        p = self.prefix
        names = {"loc": f"{p}_loc", "log_scale": f"{p}_log_scale"}
        if self.theta_guide == "full":
            names["offdiag"] = f"{p}_scale_tril_offdiag"
        elif self.theta_guide == "lowrank":
            names["cov_factor"] = f"{p}_cov_factor"
        return names

    def _check_float64(self):
        if jax.config.jax_enable_x64 or self._warned_float32:
            return
        self._warned_float32 = True
        warnings.warn("AutoHybrid: float64 is disabled, so the conditional of the block is solved in float32 "
                      "and its draws are inexact; run the fit inside `with jax.enable_x64(True):` or use "
                      "autoreparam.fit_hybrid", UserWarning, stacklevel=3)

    # -- q(theta) ----------------------------------------------------------------------------------
    def _init_theta_loc(self):
        if not self.theta_names:
            return jnp.zeros(0)
        return jnp.concatenate([jnp.ravel(self._init_locs[n]) for n in self.theta_names])

    def _q_theta(self, params=None):
        """q(theta) over the flat unconstrained theta vector, from numpyro.param (or ``params``)."""
        d, names = self.theta_dim, self.param_names
        get = (lambda role, init: numpyro.param(names[role], init)) if params is None else \
            (lambda role, init: params[names[role]])
        loc = get("loc", self._init_theta_loc())
        log_scale = get("log_scale", jnp.full((d,), math.log(self.init_scale), dtype=jnp.result_type(float)))
        scale = jnp.exp(log_scale)
        if self.theta_guide == "normal":
            return dist.Normal(loc, scale).to_event(1)
        if self.theta_guide == "full":
            offdiag = get("offdiag", jnp.zeros((d, d), dtype=jnp.result_type(float)))
            return dist.MultivariateNormal(loc, scale_tril=scale_tril(offdiag, log_scale))
        rank = self.rank or max(1, round(math.sqrt(d)))
        factor = get("cov_factor", jnp.zeros((d, rank), dtype=jnp.result_type(float)))
        return dist.LowRankMultivariateNormal(loc, factor, scale ** 2)

    def _unpack(self, flat) -> dict:
        out, i = {}, 0
        for n in self.theta_names:
            k = self._theta_sizes[n]
            out[n] = jnp.reshape(flat[..., i:i + k], jnp.shape(flat)[:-1] + self._theta_shapes[n])
            i += k
        return out

    def _constrain(self, unconstrained: dict) -> dict:
        return {n: biject_to(self.prototype_trace[n]["fn"].support)(u) for n, u in unconstrained.items()}

    # -- the guide ---------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        self._check_float64()
        theta = {}
        if self.theta_names:
            latent = numpyro.sample(f"_{self.prefix}_latent", self._q_theta(), infer={"is_auxiliary": True})
            for name, u in self._unpack(latent).items():
                fn = self.prototype_trace[name]["fn"]
                transform = biject_to(fn.support)
                value = transform(u)
                if numpyro.get_mask() is False:
                    log_density_ = 0.0
                else:
                    log_density_ = -transform.log_abs_det_jacobian(u, value)
                    log_density_ = sum_rightmost(log_density_, jnp.ndim(log_density_) - jnp.ndim(value) + fn.event_dim)
                theta[name] = numpyro.sample(name, dist.Delta(value, log_density=log_density_, event_dim=fn.event_dim))
        key = numpyro.prng_key()
        if key is None:
            raise InputError("AutoHybrid: the guide needs a random key to draw the block; run it under "
                             "numpyro.handlers.seed (SVI and Predictive do)")
        mode_state = None
        if not self.block.exact:
            mode_state = mutable(self.mode_name, self._zero_mode())
        num_draws = self.draws_per_theta(self._block_draws)
        theta_fixed = jax.lax.stop_gradient(theta)
        init = None if mode_state is None else lax.stop_gradient(mode_state)
        with handlers.block():
            z, draws, log_w, info = self._draw_block(key, theta_fixed, num_draws, init=init,
                                                     return_info=mode_state is not None)
            if mode_state is not None:
                # A non-finite mode (a theta far out in the tails) must not poison later warm starts.
                finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in info["mean"].values()]))
                mode_state.update({n: jnp.where(finite, lax.stop_gradient(info["mean"][n]).astype(init[n].dtype),
                                                init[n]) for n in init})
        if self._record_draws and num_draws > 1:
            for name in self.z_names:
                numpyro.deterministic(self._draws_site(name), lax.stop_gradient(draws[name]))
            numpyro.deterministic(self._draws_site(None), lax.stop_gradient(log_w))
        out = dict(theta)
        for name in self.z_names:
            value = lax.stop_gradient(z[name])
            # The model site's event dims, as NumPyro's ELBOs check (log q(z) is 0 whatever they are).
            out[name] = numpyro.sample(name, dist.Delta(value, event_dim=self.prototype_trace[name]["fn"].event_dim))
        return out

    def _draw_block(self, key, theta, num_draws: int, *, init=None, return_info: bool = False):
        """z given theta (run under ``handlers.block()``): ``(z, draws, log_w, info)``.

        One draw (``num_draws == 1``): z from ``conditional.sample``, ``draws``/``log_w`` None.
        K > 1: K draws of the conditional with their self-normalised log weights (Laplace blocks:
        p(y, z_i, theta) / N(z_i; m, H^-1); exact blocks: uniform) and z one of them picked by its
        weight (sampling-importance-resampling). ``info`` is the conditional's, with ``return_info``."""
        if num_draws == 1:
            out = self.conditional.sample(key, theta, init=init, return_info=return_info)
            z, info = out if return_info else (out, None)
            return z, None, None, info
        key, key_pick = jax.random.split(key)
        if self.block.exact:  # the weights are uniform: no log joint per draw
            draws, info = self.conditional.sample(key, theta, num_draws, init=init, return_info=True)
            log_w = jnp.full((num_draws,), -math.log(num_draws), dtype=jnp.result_type(float))
        else:
            draws, log_w, info = self.conditional.sample_weighted(key, theta, num_draws, init=init, return_info=True)
        pick = jax.random.categorical(key_pick, log_w)
        return {n: v[pick] for n, v in draws.items()}, draws, log_w, info if return_info else None

    @contextlib.contextmanager
    def weighted_block_draws(self, num_draws: int | None):
        """While active, each call of the guide draws ``num_draws`` z given its theta (``None``: 1 for exact
        blocks, ``LAPLACE_BLOCK_DRAWS`` for Laplace blocks) and, with more than one, records them with
        their self-normalised log importance weights p(y, z, theta) / N(z; m, H^-1) (uniform for exact
        blocks) as deterministic sites (see ``weighted_draws``). ``HybridELBO`` uses it. Outside it the
        guide draws the block's default number and records nothing: either way the emitted z is one
        of the draws, picked by weight (see ``sample_posterior``)."""
        check_block_draws("AutoHybrid.weighted_block_draws", num_draws)
        previous = self._block_draws, self._record_draws
        self._block_draws, self._record_draws = num_draws, True
        try:
            yield
        finally:
            self._block_draws, self._record_draws = previous

    def draws_per_theta(self, block_draws: int | None) -> int:
        """K, the z draws per theta draw: ``block_draws``, or (None) 1 for exact blocks and
        ``LAPLACE_BLOCK_DRAWS`` for Laplace blocks."""
        if block_draws is not None:
            return block_draws
        return 1 if self.block.exact else LAPLACE_BLOCK_DRAWS

    def _draws_site(self, name: str | None) -> str:
        return f"_{self.prefix}_block_log_weights" if name is None else f"_{self.prefix}_block_draws_{name}"

    def weighted_draws(self, guide_trace) -> tuple[dict, jax.Array] | None:
        """({z site: its draws, leading axis the draw}, normalised log weights) from a trace of the guide
        run under ``weighted_block_draws``; None for a trace without them."""
        weights = guide_trace.get(self._draws_site(None))
        if weights is None:
            return None
        return {n: guide_trace[self._draws_site(n)]["value"] for n in self.z_names}, weights["value"]

    @property
    def mode_name(self) -> str:
        """The ``numpyro.mutable`` site carrying the last conditional mode (Laplace blocks only)."""
        return f"{self.prefix}_block_mode"

    def _zero_mode(self) -> dict:
        dtype = jnp.result_type(float)
        return {s.name: jnp.zeros(s.shape, dtype) for s in self.block.sites}

    @property
    def exact_marginal(self) -> bool:
        """True when ``log_marginal`` (log p(y, theta); Laplace blocks: its Laplace approximation) is
        available without estimation: the conditional factorises H (dense path), or the block is exact
        and its sparse precision can be built (CG path; built here on first request, which takes a
        while on large blocks: about 40 s of CPU for 1,739 values). It decides whether ``sample_posterior`` can
        resample theta, not the cost of training: ``HybridELBO`` computes the exact ELBO by default only
        on the dense path (``exact_value``)."""
        self._require_setup("exact_marginal")
        return self.conditional.prepare_exact_marginal()

    def log_marginal(self, theta: dict, init: dict | None = None):
        """log p(y, theta) at constrained ``theta`` with the block integrated out (Laplace blocks: the
        Laplace approximation; ``init`` warm-starts its Newton); only where ``exact_marginal`` (ask it
        first, outside any jit: on the CG path it builds what this needs)."""
        with handlers.block():
            return self.conditional.log_marginal(theta, init=init)

    # -- after the fit -----------------------------------------------------------------------------
    def _inputs(self, args, kwargs, what: str):
        if args or kwargs:
            return args, kwargs
        if self._setup_inputs is None:
            raise InputError(f"AutoHybrid.{what}: pass the model's inputs (the guide was set up under a "
                             "transformation and kept no copy of them)")
        return self._setup_inputs

    def _require_setup(self, what: str):
        if self.prototype_trace is None:
            raise InputError(f"AutoHybrid.{what}: the guide has not been run yet; fit it first (svi.init / svi.run)")

    def sample_posterior(self, rng_key, params, *args, sample_shape=(), resample_theta: int = 0,
                         theta_pool: int | None = None, block_draws: int | None = None, return_info: bool = False,
                         **kwargs):
        """Draws of every latent site (theta from q, z from its conditional) and every deterministic site.

        ``block_draws=K`` (default ``None``: the block's, ``draws_per_theta``, so 1 for exact blocks and
        ``LAPLACE_BLOCK_DRAWS`` for Laplace blocks): per theta draw, K proposals of z from the
        conditional, each weighted by p(y, z, theta) / N(z; m, H^-1), and one kept, picked by its
        self-normalised weight (sampling-importance-resampling). For Laplace blocks this moves z from
        the Laplace Gaussian towards p(z | theta, y) (a bias that falls as about 1 / K), at K solves
        per draw; ``block_draws=1`` gives the plain Laplace draws. Exact blocks need no weights: K > 1
        only costs more. ``Predictive(model, guide=guide, params=...)`` draws z the same way, with
        the default K.

        Resampling theta (blocks with ``exact_marginal`` only; pooled sampling-importance-resampling):
        a pool of M proposals theta_i ~ q(theta), each weighted by p(y, theta_i) / q(theta_i); the n
        output thetas are drawn from the pool by weight, with replacement, and each gets its own fresh
        z ~ p(z | theta, y), so a repeated theta still has distinct z. It corrects a posterior of theta
        that is not Gaussian in the unconstrained space (a skewed scale), at M evaluations of
        log p(y, theta) (a factorisation of H each). ``resample_theta=k`` (k >= 1) makes the pool k
        proposals per output draw (M = k n); ``theta_pool=M`` fixes M whatever n, which bounds the cost
        for many draws from a large block (``fit_hybrid`` uses it on the CG path). The output is only as
        varied in theta as the pool's effective sample size allows, (sum w)^2 / sum w^2:
        ``return_info=True`` returns ``(draws, info)`` with ``info = {"pool_size": M, "pool_ess": ...}``
        (``{"pool_size": 0}`` without resampling).
        With no ``args``/``kwargs`` the inputs the guide was set up with are used.
        """
        self._require_setup("sample_posterior")
        args, kwargs = self._inputs(args, kwargs, "sample_posterior")
        n = max(int(np.prod(sample_shape)), 1)
        check_block_draws("AutoHybrid.sample_posterior", block_draws)
        num_draws = self.draws_per_theta(None if block_draws is None else int(block_draws))
        resample_theta = 0 if resample_theta is None or resample_theta is False else whole_number(
            "AutoHybrid.sample_posterior", "resample_theta", resample_theta, minimum=0)
        theta_pool = whole_number("AutoHybrid.sample_posterior", "theta_pool", theta_pool, none_ok=True)
        pool = int(theta_pool) if theta_pool is not None else n * resample_theta
        if pool and self.theta_names and not self.exact_marginal:
            raise InputError("AutoHybrid.sample_posterior: resample_theta/theta_pool need log p(y, theta), which the "
                             f"block ({self.conditional.size} values, on the CG path) does not have: "
                             f"{self.conditional.precision_note}")

        draw = functools.partial(self._draw_posterior, args=args, kwargs=kwargs, n=n, pool=pool, num_draws=num_draws)
        # One compile per set of inputs (keyed by their identities; the entry keeps them alive) and
        # draw count: sample_posterior is called at every checkpoint of a fit.
        cache_key = (tuple(id(x) for x in jax.tree.leaves((args, kwargs))), n, pool, num_draws)
        compiled, _ = self._compiled_draws.get(cache_key) or (jax.jit(draw), (args, kwargs))
        if not all(_concrete(x) for x in jax.tree.leaves((args, kwargs, rng_key, params))):
            compiled = draw  # already inside a jit: compiled with the caller's function
        try:
            draws, info = compiled(rng_key, params)
            self._compiled_draws.pop(cache_key, None)
            self._compiled_draws = {**dict(list(self._compiled_draws.items())[-3:]),
                                    cache_key: (compiled, (args, kwargs))}
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                jax.errors.TracerIntegerConversionError, jax.errors.TracerBoolConversionError):
            draws, info = draw(rng_key, params)  # the model's Python code needs concrete values: run it eagerly
        ess = info.get("pool_ess")
        if ess is not None and _concrete(ess) and not np.isfinite(float(ess)):
            raise ModelError(f"AutoHybrid.sample_posterior: none of the {pool} theta proposals has a finite "
                             "p(y, theta) / q(theta): q(theta) is far from the posterior (fit it longer) or the "
                             "model's log density is not finite there")
        draws = {k: jnp.reshape(v, tuple(sample_shape) + jnp.shape(v)[1:]) for k, v in draws.items()}
        return (draws, info) if return_info else draws

    def _draw_posterior(self, rng_key, params, *, args, kwargs, n, pool, num_draws):
        """``sample_posterior``'s draws, flat (``n`` of them), and the info of the theta pool (``pool``
        proposals; 0: plain draws of q): a pure function of the key and the params."""
        init = None
        if not self.block.exact:
            # Every draw's Newton starts from the mode at the median of q(theta): a few iterations
            # each instead of the full run from zero, in every lane of the vmap.
            median = self._constrain(self._unpack(params[self.param_names["loc"]])) if self.theta_names else {}
            with handlers.block():
                init = lax.stop_gradient(self.conditional.mean(median))

        def complete(key, theta):
            k_z, k_model = jax.random.split(key)
            with handlers.block():
                z = self._draw_block(k_z, theta, num_draws, init=init)[0]
            values = {**theta, **{name: z[name] for name in self.z_names}}
            mtr = handlers.trace(handlers.seed(handlers.substitute(self.model, data={**params, **values}), k_model)) \
                .get_trace(*args, **kwargs)
            values.update({name: s["value"] for name, s in mtr.items() if s["type"] == "deterministic"})
            return values

        key_theta, key_pick, key_rest = jax.random.split(rng_key, 3)
        info = {"pool_size": pool if self.theta_names else 0}
        if self.theta_names:
            qdist = self._q_theta(params)
            u = qdist.sample(key_theta, (pool or n,))
            theta = self._constrain(self._unpack(u))
            if pool:
                log_q = qdist.log_prob(u)
                for name, value in theta.items():
                    fn = self.prototype_trace[name]["fn"]
                    ladj = biject_to(fn.support).log_abs_det_jacobian(self._unpack(u)[name], value)
                    log_q = log_q - jnp.reshape(ladj, (u.shape[0], -1)).sum(-1)
                with handlers.block():
                    # One theta at a time: vmapped, the factorisations become batched LAPACK calls,
                    # which can deadlock XLA's thread pool (see HybridELBO.loss_with_mutable_state).
                    log_p = lax.map(lambda th: self.conditional.log_marginal(th, init=init), theta)
                log_w = log_p - log_q
                # A proposal whose marginal is not finite (a theta far in q's tails) gets weight 0
                # (sample_posterior raises if every one has).
                log_w = jnp.where(jnp.isfinite(log_w), log_w, -jnp.inf)
                pick = jax.random.categorical(key_pick, log_w, shape=(n,))
                theta = {name: v[pick] for name, v in theta.items()}
                info["pool_ess"] = jnp.exp(2 * jax.scipy.special.logsumexp(log_w)
                                           - jax.scipy.special.logsumexp(2 * log_w))
        else:
            theta = {}
        with handlers.block():
            # On the CG path each lane carries data-sized intermediates: vmapping hundreds of them at once
            # ran 3.6x slower per draw than batches of 20 (crossed_logistic, 100 draws).
            batch = None if self.conditional.dense else _CG_DRAW_BATCH
            draws = lax.map(lambda a: complete(*a), (jax.random.split(key_rest, n), theta), batch_size=batch)
        return draws, info

    def median(self, params, *args, **kwargs):
        """theta: the median of q(theta) (loc, mapped to the constrained space); z: its conditional mean
        given that theta (a plug-in value, not the median of z's marginal under q)."""
        self._require_setup("median")
        args, kwargs = self._inputs(args, kwargs, "median")
        theta = self._constrain(self._unpack(params[self.param_names["loc"]])) if self.theta_names else {}
        with handlers.block():
            z = self.conditional.mean(theta)
        return {**theta, **{n: z[n] for n in self.z_names}}

    def quantiles(self, params, quantiles, *args, num_samples: int = 1000, rng_key=None, **kwargs):
        """theta: exact quantiles of q(theta)'s marginals, mapped to the constrained space; z: Monte
        Carlo quantiles of ``num_samples`` draws of q(theta) p(z | theta, y) (z's marginal under q is a
        mixture of Gaussians with no closed form)."""
        self._require_setup("quantiles")
        args, kwargs = self._inputs(args, kwargs, "quantiles")
        q = jnp.asarray(quantiles, dtype=jnp.result_type(float))
        out = {}
        if self.theta_names:
            qdist = self._q_theta(params)
            sd = jnp.sqrt(jnp.diagonal(qdist.covariance_matrix)) if self.theta_guide != "normal" \
                else qdist.base_dist.scale
            flat = qdist.mean + sd * ndtri(q)[:, None]
            out.update(self._constrain(self._unpack(flat)))
        key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        draws = self.sample_posterior(key, params, *args, sample_shape=(num_samples,), **kwargs)
        for n in self.z_names:
            out[n] = jnp.quantile(draws[n], q, axis=0)
        return out


def scale_tril(offdiag, log_scale):
    """The Cholesky factor of the ``"full"`` q(theta): strictly lower part of ``offdiag``, exp(log_scale)
    on the diagonal."""
    return jnp.tril(offdiag, -1) + jnp.diag(jnp.exp(log_scale))


def _find_block(model, args, kwargs) -> GaussianBlock:
    block, note = block_of_model(model, args, kwargs)
    if block is None:
        raise ModelError(f"AutoHybrid: {note}")
    return block


class HybridELBO(Trace_ELBO):
    """The loss of ``AutoHybrid``: the Fisher-identity gradient of the hybrid ELBO, and its value.

    :param num_particles: theta draws per step.
    :param block_draws: z draws per theta draw, K. With K = 1 the gradient is that of
        ``-(log p(y, z, theta) - log q(theta))`` with z drawn from its conditional and held fixed
        (what ``Trace_ELBO`` would give with this guide). With K > 1 it is that of
        ``-(sum_i w_i log p(y, z_i, theta) - log q(theta))``, the weights w_i held fixed: for Laplace
        blocks the self-normalised importance weights p(y, z_i, theta) / N(z_i; m, H^-1) of K draws
        of the Laplace Gaussian, which move the Fisher-identity gradient from the Laplace Gaussian's
        expectation towards the exact conditional's (bias O(1/K) instead of O(1)); for exact blocks
        uniform weights (K draws only lower the variance). ``None`` (default): 1 for exact blocks,
        ``LAPLACE_BLOCK_DRAWS`` for Laplace blocks. Each draw costs one CG solve (or triangular
        solve) and one evaluation of the model's log density and its gradient.
    :param exact_value: see below; ``None`` (default) reports the exact value where the block is
        factorised anyway (dense path); ``True`` also on the CG path where the block's sparse
        precision gives log p(y, theta) (one elimination per theta draw per step: far dearer than the
        step itself on large blocks).
    :param vectorize_particles: vmap the theta draws (as ``Trace_ELBO``); they run in sequence anyway on
        the dense path, where each factors its own H: vmapped, the factorisations would be batched LAPACK
        calls, which can deadlock XLA's thread pool (about 25% more CPU per step on the 213-value tensor
        block, benchmarks/README.md).

    The reported value is ``-E_q[log p(y, theta) - log q(theta)]`` (the negative ELBO) with
    ``log p(y, theta)`` from ``guide.log_marginal``: exact (Cholesky) for Normal blocks, the Laplace
    approximation for Bernoulli/Binomial/Poisson blocks. Where the block is above the conditional's
    dense threshold (unless ``exact_value=True``), or with ``exact_value=False``, the value is the
    surrogate ``-E[log p(y, z, theta) - log q(theta)]``
    (with K > 1: the weighted ``-E[sum_i w_i log p(y, z_i, theta) - log q(theta)]``), which is *not*
    an ELBO: it leaves out the entropy of p(z | theta, y) (with K = 1 it is what ``Trace_ELBO``
    reports with this guide).
    """

    def __init__(self, num_particles: int = 1, *, block_draws: int | None = None, exact_value: bool | None = None,
                 vectorize_particles: bool = True):
        num_particles = whole_number("HybridELBO", "num_particles", num_particles)
        check_block_draws("HybridELBO", block_draws)
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)
        self.block_draws = None if block_draws is None else int(block_draws)
        self.exact_value = exact_value

    def draws_per_theta(self, guide) -> int:
        """K, the z draws per theta draw for this guide (``block_draws``, or its default for the block)."""
        return guide.draws_per_theta(self.block_draws)

    def reports_elbo(self, guide) -> bool:
        """Whether the loss value is the (negative) hybrid ELBO for this guide, or the joint surrogate."""
        if self.exact_value is None:
            return guide.conditional.dense  # the training cost does not change with the sparse marginal
        if self.exact_value and not guide.exact_marginal:
            raise InputError(f"HybridELBO(exact_value=True): the block ({guide.conditional.size} values) is above the "
                             "conditional's dense threshold and log p(y, theta) is not available "
                             f"({guide.conditional.precision_note}); use exact_value=None")
        return self.exact_value

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        if not isinstance(guide, AutoHybrid):
            raise InputError(f"HybridELBO: the guide must be an autoreparam.AutoHybrid, got {type(guide).__name__}")

        def model_log_density(key, guide_trace):
            return log_density(handlers.replay(handlers.seed(model, key), guide_trace), args, kwargs, param_map)[0]

        def particle(key):
            k_guide, k_model = jax.random.split(key)
            # (None: the guide picks the default for its block, which it may only find in this call.)
            with guide.weighted_block_draws(self.block_draws):
                guide_lp, guide_trace = log_density(handlers.seed(guide, k_guide), args, kwargs, param_map)
            weighted = guide.weighted_draws(guide_trace)
            if weighted is None:  # one z draw
                model_lp = model_log_density(k_model, guide_trace)
            else:
                draws, log_w = weighted

                def at(z):  # log p(y, z_i, theta): the guide's theta, the i-th draw of z
                    trace = dict(guide_trace)
                    trace.update({n: {**guide_trace[n], "value": z[n]} for n in z})
                    return model_log_density(k_model, trace)

                w = jnp.exp(lax.stop_gradient(log_w))
                # A weight that underflowed to 0 drops its draw, even where log p(y, z_i, theta) is -inf.
                model_lp = jnp.sum(jnp.where(w > 0, w * jax.vmap(at)(draws), 0.0))
            surrogate = model_lp - guide_lp
            mode = guide_trace[guide.mode_name]["value"] if guide.mode_name in guide_trace else None
            if not self.reports_elbo(guide):
                return surrogate, mode
            theta = {n: lax.stop_gradient(guide_trace[n]["value"]) for n in guide.theta_names}
            value = guide.log_marginal(theta, init=mode) - lax.stop_gradient(guide_lp)
            return surrogate + lax.stop_gradient(value - surrogate), mode

        keys = jax.random.split(rng_key, self.num_particles)
        # The particles run one after another (lax.map) where they would otherwise be vmapped into
        # batched LAPACK calls, and where float64 is off: (1) on the dense path, or where the value is
        # the exact ELBO, each particle factors its own H (and log_marginal its sparse H): vmapped, these become batched Cholesky and
        # triangular solves, whose jaxlib kernels split the batch over XLA's intra-op pool and block a
        # worker until the pieces finish, so two of them in one program can deadlock (as
        # CollapsedPosterior.complete did); (2) with float64 off, a vmap's batching rules run outside
        # the conditional's float64 context and mix float32 into its float64 solves (Laplace blocks
        # fail to trace).
        vectorize = (self.vectorize_particles and jax.config.jax_enable_x64 and not guide.conditional.dense
                     and not self.reports_elbo(guide))  # the sparse marginal factors too (CG path, exact_value=True)
        elbos, modes = jax.vmap(particle)(keys) if vectorize else lax.map(particle, keys)
        # The particles' conditional modes (Laplace blocks) at nearby theta: their mean warm-starts the next step.
        mutable = None if modes is None else {guide.mode_name: jax.tree.map(lambda v: jnp.mean(v, 0), modes)}
        return {"loss": -jnp.mean(elbos), "mutable_state": mutable}
