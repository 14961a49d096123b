"""The hybrid on the tensor model at scale: seconds per step and peak memory against the data size.

    python -m benchmarks.bench_hybrid_scale --sizes 32,32,10 1000,100,10 --steps 5
    python -m benchmarks.bench_hybrid_scale --sizes 8,6,10 14,14,10 32,32,10 --method dense --out dense.json

``--method`` is the conditional's solver (``auto``: the guide's default, ``HYBRID_DENSE_BELOW``); the
second line is how the dense/CG threshold of ``AutoHybrid`` was measured.

Per size (I, J, T): the analysis (finds the block), the guide's set-up (builds the conditional),
the compile of one jitted SVI step (NaturalGradient, HybridELBO with 4 theta draws: 5 CG solves
per step), then ``--steps`` steps, timed in wall and CPU seconds; peak resident memory of the
process (``ru_maxrss``) after each size, so sizes should run from small to large. The CG
iterations per draw are read at the theta the fit has reached.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import SVI

import autoreparam

from .models import example


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(I, J, T, steps, method="auto"):
    m = example("tensor_model")
    args, kwargs = m.model_args(I, J, T)
    out = {"size": [I, J, T], "observations": I * J * T}
    with jax.enable_x64(True):
        kwargs = {k: jnp.asarray(v, jnp.float64) for k, v in kwargs.items()}
        t0, c0 = time.perf_counter(), cpu()
        guide = autoreparam.AutoHybrid(m.model, **({} if method == "auto" else {"method": method}))
        svi = SVI(m.model, guide, autoreparam.NaturalGradient(guide), autoreparam.HybridELBO(4))
        state = svi.init(jax.random.PRNGKey(0), *args, **kwargs)
        out.update(setup_seconds=time.perf_counter() - t0, setup_cpu=cpu() - c0, block_size=guide.conditional.size,
                   dense=guide.conditional.dense)
        step = jax.jit(lambda st: svi.stable_update(st, *args, **kwargs))
        t0, c0 = time.perf_counter(), cpu()
        step = step.lower(state).compile()
        out.update(compile_seconds=time.perf_counter() - t0, compile_cpu=cpu() - c0)
        state, loss = step(state)
        jax.block_until_ready(loss)
        t0, c0 = time.perf_counter(), cpu()
        for _ in range(steps):
            state, loss = step(state)
        jax.block_until_ready(loss)
        out.update(steps=steps, seconds_per_step=(time.perf_counter() - t0) / steps,
                   cpu_per_step=(cpu() - c0) / steps, final_loss=float(loss))
        params = svi.get_params(state)
        theta = {n: v for n, v in guide.median(params).items() if n in guide.theta_names}
        _, info = guide.conditional.sample(jax.random.PRNGKey(1), theta, 2, return_info=True)
        out.update(cg_iterations_per_draw=float(np.mean(info["iterations"])),
                   mode_cg_iterations=float(np.asarray(info["mode_iterations"])), peak_mib=peak_mib())
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_hybrid_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["32,32,10", "1000,100,10"], help="I,J,T per run, small first")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--method", choices=["auto", "dense", "cg"], default="auto", help="the conditional's solver")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "hybrid_scale.json")
    ns = p.parse_args(argv)
    results = [run(*(int(x) for x in s.split(",")), ns.steps, ns.method) for s in ns.sizes]
    ns.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
