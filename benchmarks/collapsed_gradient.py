"""The cost of one gradient: collapsed NUTS's potential against the original model's, as NUTS calls them.

    python -m benchmarks.collapsed_gradient [--models eight_schools radon_mn tensor_small] [--calls 200]

Per model: ``jax.value_and_grad`` of the original model's potential (``initialize_model``) and of
``CollapsedPosterior.potential_fn`` (the block the analysis finds integrated out), each jitted
inside one ``fori_loop`` of ``--calls`` calls, so that dispatch is not timed (NUTS runs its
gradients inside one compiled loop too). Each call's input depends on the previous call's output,
so XLA cannot hoist the work out of the loop. CPU seconds per call (process time, which
counts both cores), best of ``--repeats`` loops after the compile. Default precision, as a user
runs NUTS: float32 for the original model; the collapsed potential computes in float64 inside.
Writes ``benchmarks/results/collapsed_gradient.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from numpyro.infer.util import initialize_model  # noqa: E402

from autoreparam.collapsed import CollapsedPosterior, _find_block  # noqa: E402

from .machine import json_safe  # noqa: E402
from .models import HERE, MODELS  # noqa: E402

RESULTS = HERE / "results"


def seconds_per_call(potential, u, calls: int, repeats: int) -> dict:
    value_and_grad = jax.value_and_grad(potential)

    @jax.jit
    def loop(u):
        def body(_, carry):
            u, acc = carry
            value, grad = value_and_grad(u)
            # A nudge far below float32 resolution of u that still depends on the last result.
            nudge = 1e-30 * (value + sum(jnp.sum(g) for g in jax.tree.leaves(grad)))
            return jax.tree.map(lambda x: x + nudge.astype(x.dtype), u), acc + value

        return jax.lax.fori_loop(0, calls, body, (u, jnp.zeros((), jnp.result_type(float))))[1]

    t0 = time.perf_counter()
    jax.block_until_ready(loop(u))
    compile_s = time.perf_counter() - t0
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(loop(u))
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return {"cpu_us": 1e6 * best_cpu / calls, "wall_us": 1e6 * best_wall / calls, "compile_s": compile_s}


def measure(name: str, calls: int, repeats: int) -> dict:
    spec = MODELS[name]
    args, kwargs = spec.inputs("full")
    model = spec.module.model
    info = initialize_model(jax.random.PRNGKey(0), model, model_args=tuple(args), model_kwargs=dict(kwargs))
    original = seconds_per_call(info.potential_fn, info.param_info.z, calls, repeats)
    block = _find_block(model, args, kwargs, "collapsed_gradient")
    post = CollapsedPosterior(model, block, args, kwargs)
    collapsed = seconds_per_call(post.potential_fn, post.init_params(jax.random.PRNGKey(0)), calls, repeats)
    return {"model": name, "block_size": block.size, "theta": list(block.theta),
            "sparse": bool(post.conditional.sparse), "original": original, "collapsed": collapsed,
            "ratio_cpu": collapsed["cpu_us"] / original["cpu_us"], "load_after": os.getloadavg()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["eight_schools", "radon_mn", "tensor_small"])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args(argv)
    rows = []
    print(f"{'model':<14}{'block':>6}{'original us':>13}{'collapsed us':>14}{'ratio':>8}  (CPU per value+gradient)")
    for name in a.models:
        r = measure(name, a.calls, a.repeats)
        rows.append(r)
        print(f"{name:<14}{r['block_size']:>6}{r['original']['cpu_us']:>13.2f}{r['collapsed']['cpu_us']:>14.2f}"
              f"{r['ratio_cpu']:>7.1f}x", flush=True)
    if not a.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "collapsed_gradient.json").write_text(json.dumps(json_safe(
            {"command": " ".join(["python -m benchmarks.collapsed_gradient"] + list(sys.argv[1:] if argv is None else argv)), "results": rows}),
            indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
