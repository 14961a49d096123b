"""The distributions that both the runtime reparameterization and the emitted files use.

The emitted helper block (``emit.py``) is generated from the source of these classes, so a
reparameterized model and its emitted file draw the same laws from one definition.
"""

from __future__ import annotations

import inspect
import re

import jax.numpy as jnp
import numpyro

__all__ = ["AutoreparamShifted", "emitted_source"]


class AutoreparamShifted(numpyro.distributions.Distribution):
    """The law of x + delta for x ~ base (real support: unit Jacobian)."""

    arg_constraints = {}
    pytree_data_fields = ("base", "delta")

    def __init__(self, base, delta, *, validate_args=None):
        ndim = jnp.ndim(delta) - len(base.event_shape)
        batch_shape = jnp.broadcast_shapes(base.batch_shape, jnp.shape(delta)[:max(ndim, 0)])
        self.base, self.delta = base.expand(batch_shape), delta
        super().__init__(batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def support(self):
        return self.base.support

    def sample(self, key, sample_shape=()):
        return self.base.sample(key, sample_shape) + self.delta

    def log_prob(self, value):
        return self.base.log_prob(value - self.delta)


def emitted_source(cls: type, name: str) -> str:
    """The source of ``cls`` as a ``string.Template`` for the emitted file: the class is ``$name``
    and the modules it uses are ``$jnp`` and ``$numpyro`` (the emitter picks names that are free).

    >>> print(emitted_source(AutoreparamShifted, "Shifted").splitlines()[0])
    class $Shifted($numpyro.distributions.Distribution):
    """
    text = inspect.getsource(cls)
    text = re.sub(rf"\b{cls.__name__}\b", f"${name}", text)
    return re.sub(r"(?<![\w.$])(jnp|numpyro)\.", r"$\1.", text)
