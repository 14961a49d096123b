"""A small dense Cholesky inside a jitted loop, with OpenBLAS's default threads and with one.

    python -m benchmarks.blas_threads [--size 148] [--calls 100] [--repeats 5]

jaxlib's CPU Cholesky calls the OpenBLAS that scipy ships; on a machine with few cores its
threads compete with XLA's. Prints milliseconds per factorisation (best of ``--repeats`` loops
after the compile), first with the process's default BLAS threads, then inside
``autoreparam.one_blas_thread()``. 148 is tensor_small's Schur complement in collapsed NUTS.
Run it without OPENBLAS_NUM_THREADS set, or the default is one thread already.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from autoreparam import one_blas_thread


def best_ms(loop, h, calls, repeats):
    jax.block_until_ready(loop(h))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(loop(h))
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=148)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.size, a.size))
    with jax.enable_x64(True):
        h = jnp.asarray(x @ x.T + a.size * np.eye(a.size))
        loop = jax.jit(lambda h: jax.lax.fori_loop(
            0, a.calls, lambda i, acc: acc + jnp.linalg.cholesky(h + i * 1e-9)[0, 0], 0.0))
        default = best_ms(loop, h, a.calls, a.repeats)
        with one_blas_thread():
            one = best_ms(loop, h, a.calls, a.repeats)
    print(f"{a.size} x {a.size} Cholesky, ms each: default BLAS threads {default:.3f}, one thread {one:.3f} "
          f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, load {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
