"""The cost of ``CollapsedPosterior.complete`` (the exact z draws and deterministic sites), compile apart.

    python -m benchmarks.collapsed_complete_cost MODEL

A ``CollapsedPosterior`` on the block the analysis finds; theta = ``constrain`` of 0.3 N(0, 1) draws
around the unconstrained example, 2 chains x 300 draws. One 1-draw call (the compile), then calls
of 600 draws (the first at that size, then three more) and one of 2 x 250 draws; wall time of each.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

from autoreparam.collapsed import CollapsedPosterior, _find_block

from .models import MODELS


def main(argv=None):
    name = (argv if argv is not None else sys.argv[1:])[0]
    spec = MODELS[name]
    args, kwargs = spec.inputs("full")
    model = spec.module.model
    t = time.perf_counter()
    post = CollapsedPosterior(model, _find_block(model, args, kwargs, "collapsed_complete_cost"), args, kwargs)
    print(f"{name} setup: {time.perf_counter() - t:.2f} s", flush=True)
    u = jax.tree.map(lambda v: 0.3 * jax.random.normal(jax.random.PRNGKey(5), (2, 300) + jnp.shape(v)),
                     post.unconstrain(post._theta_example))
    theta = post.constrain(u)

    def timed(label, th, key):
        t = time.perf_counter()
        jax.block_until_ready(post.complete(jax.random.PRNGKey(key), th))
        print(f"{name} {label}: {(time.perf_counter() - t) * 1000:.1f} ms", flush=True)

    timed("first call, 1 draw (compile)", {k: v[:1, :1] for k, v in theta.items()}, 1)
    timed("first call, 600 draws", theta, 2)
    for i in range(3):
        timed("again, 600 draws", theta, 3 + i)
    timed("first call, 2 x 250 draws", {k: v[:, :250] for k, v in theta.items()}, 9)


if __name__ == "__main__":
    main()
