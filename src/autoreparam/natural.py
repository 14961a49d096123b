"""A natural-gradient optimizer for q(theta) of ``AutoHybrid`` (seed 002), usable as SVI's ``optim``.

For a Gaussian q the Fisher information of its parameters has a closed form, so the natural
gradient F^-1 g costs O(dim theta) (mean-field) or O(dim theta^3) (full rank):

- mean-field, parameters (m, log s): F = diag(1/s^2, 2); damped (F + delta I), the step is
  ``m -= rho g_m s^2 / (1 + delta s^2)`` and ``log s -= rho g_log_s / (2 + delta)``;
- full rank, Sigma = C C^T: ``m -= rho (Sigma^-1 + delta I)^-1 g_m`` and
  ``C -= rho C Phi(C^T G_C)`` (Tan 2021: Phi keeps the lower triangle and halves the diagonal),
  with the diagonal of C stored as log values and updated to first order (the damping acts on the
  mean only: the damped Fisher of C has no closed-form inverse).

(g are gradients of the loss, the negative ELBO.) Parameters that are not q(theta)'s (the
model's own ``numpyro.param`` sites) take plain Adam steps.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.example_libraries import optimizers
from numpyro.optim import _NumPyroOptim

from .errors import InputError

__all__ = ["NaturalGradient", "decaying_step_size"]


def decaying_step_size(initial: float = 0.1, decay_steps: float = 200.0, power: float = 0.6,
                       final: float = 0.0) -> Callable:
    """rho_i = max(initial / (1 + i / decay_steps) ** power, final): steps summing to infinity, squares
    summing to a finite value (Robbins-Monro, for 0.5 < power <= 1).

    >>> rho = decaying_step_size(0.3, 200.0, 0.6)
    >>> [round(float(rho(i)), 4) for i in (0, 200, 2000)]
    [0.3, 0.1979, 0.0712]
    """
    if not (initial > 0 and decay_steps > 0 and power > 0 and final >= 0):
        raise InputError(f"decaying_step_size: expected initial > 0, decay_steps > 0, power > 0, final >= 0, got "
                         f"{initial}, {decay_steps}, {power}, {final}")

    def schedule(i):
        return jnp.maximum(initial / (1.0 + i / decay_steps) ** power, final)

    return schedule


def _natural_fn(guide, step_size, damping: float, max_step: float, other_step_size: float):
    names, form = guide.param_names, guide.theta_guide
    rho = step_size if callable(step_size) else (lambda i: step_size)
    own = set(names.values())
    adam_init, adam_update, adam_params = optimizers.adam(other_step_size)

    def init_fn(params):
        missing = [n for n in names.values() if n not in params]
        if len(missing) == len(names) and guide.prototype_trace is not None and not guide.theta_names:
            own.clear()  # every latent site is in the block: nothing for the natural gradient to do
        elif missing:
            raise InputError(f"NaturalGradient: parameter '{missing[0]}' of q(theta) is not among the SVI params "
                             f"({', '.join(sorted(params)) or 'none'}); is the optimizer built for this guide?")
        others = {k: v for k, v in params.items() if k not in own}
        return {k: params[k] for k in own}, adam_init(others)

    def update_fn(i, grads, state):
        q, others = state
        others = adam_update(i, {k: v for k, v in grads.items() if k not in own}, others)
        if not own:
            return q, others
        r = rho(i)
        loc, log_scale = q[names["loc"]], q[names["log_scale"]]
        g_loc, g_log_scale = grads[names["loc"]], grads[names["log_scale"]]
        new = dict(q)
        if form == "normal":
            s2 = jnp.exp(2 * log_scale)
            step_m = r * g_loc * s2 / (1.0 + damping * s2)
            step_log_s = r * g_log_scale / (2.0 + damping)
            # Fisher norm of the step: sqrt(2 KL(q_new || q)) to second order.
            norm = jnp.sqrt(jnp.sum(step_m ** 2 / s2) + 2 * jnp.sum(step_log_s ** 2))
            shrink = jnp.minimum(1.0, max_step / jnp.maximum(norm, 1e-300))
            new[names["loc"]] = loc - shrink * step_m
            new[names["log_scale"]] = log_scale - shrink * step_log_s
        else:
            offdiag = q[names["offdiag"]]
            diag = jnp.exp(log_scale)
            C = jnp.tril(offdiag, -1) + jnp.diag(diag)
            # Gradient with respect to C's entries: the log-diagonal's gradient divided by the diagonal.
            G = jnp.tril(grads[names["offdiag"]], -1) + jnp.diag(g_log_scale / diag)
            sigma = C @ C.T
            d = loc.shape[0]
            step_m = r * jnp.linalg.solve(jnp.eye(d) + damping * sigma, sigma @ g_loc)
            A = C.T @ G
            phi = r * (jnp.tril(A, -1) + 0.5 * jnp.diag(jnp.diag(A)))
            step_C = C @ phi
            # Fisher norm: step_m' Sigma^-1 step_m + 1/2 ||Phi + Phi'||^2 (Sigma^-1 dSigma = C^-T (Phi + Phi') C^T).
            m_part = jnp.sum(jax.scipy.linalg.solve_triangular(C, step_m, lower=True) ** 2)
            norm = jnp.sqrt(m_part + 0.5 * jnp.sum((phi + phi.T) ** 2))
            shrink = jnp.minimum(1.0, max_step / jnp.maximum(norm, 1e-300))
            new[names["loc"]] = loc - shrink * step_m
            new[names["offdiag"]] = jnp.tril(offdiag - shrink * step_C, -1)
            new[names["log_scale"]] = log_scale - shrink * jnp.diag(step_C) / diag
        return new, others

    def get_params_fn(state):
        q, others = state
        return {**q, **adam_params(others)}

    return init_fn, update_fn, get_params_fn


class NaturalGradient(_NumPyroOptim):
    """Natural-gradient steps on q(theta) of an ``AutoHybrid`` guide (``theta_guide`` "normal" or "full").

    :param guide: the ``AutoHybrid`` guide whose q(theta) is optimized.
    :param step_size: a number or a schedule ``i -> rho_i`` (default ``decaying_step_size()``).
    :param damping: Tikhonov damping delta added to the Fisher information.
    :param max_step: trust region: a step longer than this in the Fisher norm (about sqrt(2 KL)
        between q before and after) is shortened to it, so one noisy gradient cannot throw q far.
    :param other_step_size: Adam step size for parameters that are not q(theta)'s.

    >>> opt = NaturalGradient(AutoHybrid(lambda: None), step_size=0.1)
    >>> i, state = opt.init({"auto_loc": jnp.zeros(2), "auto_log_scale": jnp.log(jnp.array([1.0, 2.0]))})
    >>> new = opt.get_params(opt.update({"auto_loc": jnp.ones(2), "auto_log_scale": jnp.zeros(2)}, (i, state)))
    >>> new["auto_loc"]  # m - rho s^2 g_m
    Array([-0.1, -0.4], dtype=float32)
    """

    def __init__(self, guide, step_size=None, *, damping: float = 0.0, max_step: float = 0.3,
                 other_step_size: float = 1e-2):
        form = getattr(guide, "theta_guide", None)
        if form is None:
            raise InputError(f"NaturalGradient: expected an autoreparam.AutoHybrid guide, got {type(guide).__name__}")
        if form not in ("normal", "full"):
            raise InputError(f"NaturalGradient: theta_guide={form!r} has no closed-form natural gradient here; "
                             "use theta_guide='normal' or 'full', or an ordinary optimizer such as Adam")
        if not max_step > 0:
            raise InputError(f"NaturalGradient: max_step must be > 0, got {max_step!r}")
        if not damping >= 0:
            raise InputError(f"NaturalGradient: damping must be >= 0, got {damping!r}")
        if step_size is None:
            step_size = decaying_step_size()
        elif not callable(step_size) and not step_size > 0:
            raise InputError(f"NaturalGradient: step_size must be positive or a schedule, got {step_size!r}")
        self.guide = guide
        super().__init__(_natural_fn, guide, step_size, float(damping), float(max_step), other_step_size)
