"""``python -m benchmarks.cold_start``: the CPU cost of a cold ``autoreparam analyze``, and the
per-gradient cost of the reparameterized model against the original.

Run from the repository root. Every figure comes from a fresh Python process, timed as the user
plus system CPU time the kernel reports for it (``os.wait4``), so that the load of other
processes on a shared machine distorts it less than wall time would:

- ``analyze``: ``autoreparam analyze examples/X.py`` (the report and its plan, as the CLI prints
  them), the whole process;
- ``import``: ``import jax, numpyro`` alone; ``beyond import`` is the difference;
- ``jit``: one ``jax.jit`` of the model's potential energy and its gradient
  (``numpyro.infer.util.potential_energy``), traced, compiled and called once, timed inside
  a fresh process after the imports and a first (tiny) jitted call that starts the backend;
- ``gradient``: the steady-state CPU time of one jitted potential-energy-and-gradient call of
  ``autoreparam.reparameterize(model)`` against the original model, on every model of
  ``benchmarks/models.py`` (full sizes), timed over many calls after compilation.

autoreparam's bytecode is written first (``compileall``, as an installed package has it), so that
no child compiles autoreparam's source; ``--no-bytecode`` leaves that out.

Writes ``benchmarks/results/cold_start.md`` (and ``cold_start.json``) and prints the tables.
The targets (issue 11): analyze beyond import at most 1 s on eight_schools and county_covariate
and at most 3 s on radon_mn and tensor_model; analyze beyond import at most 3x one jit;
reparameterized / original per-gradient cost at most 1.3x.

    python -m benchmarks.cold_start                         # everything (a few minutes)
    python -m benchmarks.cold_start --examples eight_schools --no-gradient
    python -m benchmarks.cold_start --repeats 3             # median of 3 fresh processes per figure
    python -m benchmarks.cold_start --alternate OLD/src NEW/src --repeats 3 --examples eight_schools
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLES = ("eight_schools", "county_covariate", "radon_mn", "tensor_model", "crossed_logistic")
# Issue 11's targets for the CPU time of `autoreparam analyze` beyond the import of jax and numpyro.
BEYOND_IMPORT_TARGET = {"eight_schools": 1.0, "county_covariate": 1.0, "radon_mn": 3.0, "tensor_model": 3.0}
JIT_RATIO_TARGET = 3.0
GRADIENT_RATIO_TARGET = 1.3

IMPORT_CODE = "import jax, numpyro"
# Writes the bytecode of the autoreparam package that the children import, as `pip install` does: this
# machine sets PYTHONDONTWRITEBYTECODE=1, under which every fresh process compiled autoreparam's
# source again (about 0.2 s of CPU, counted in the figures measured before this option).
BYTECODE_CODE = ("import compileall, os, autoreparam; "
                 "compileall.compile_dir(os.path.dirname(autoreparam.__file__), quiet=1)")
ANALYZE_CODE = "import sys; from autoreparam.cli import main; sys.exit(main(['analyze', {path!r}]))"


def child_cpu(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    """(user + system CPU seconds of the child process, its stdout); raises if it fails."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{stderr[-3000:]}")
    return usage.ru_utime + usage.ru_stime, stdout


def child_json(args: list[str], env: dict | None = None) -> dict:
    """Run this module as a child (``--child ...``) and read the JSON it prints last."""
    _, stdout = child_cpu([sys.executable, "-m", "benchmarks.cold_start", *args], env)
    return json.loads(stdout.strip().splitlines()[-1])


def _process_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _potential_and_grad(model, args, kwargs):
    """A jitted (potential energy, gradient) of ``model`` and unconstrained values to call it at."""
    import jax
    from numpyro.infer.util import initialize_model

    info = initialize_model(jax.random.PRNGKey(0), model, model_args=args, model_kwargs=kwargs)
    return jax.jit(jax.value_and_grad(info.potential_fn)), info.param_info.z


def _jit_child(name: str) -> dict:
    """CPU seconds of tracing, compiling and calling once the potential energy + gradient of an example."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from numpyro import handlers
    from numpyro.infer.util import potential_energy, transform_fn  # noqa: F401

    module = _load_example(name)
    args, kwargs = module.model_args()
    model = module.model
    (jnp.zeros(2) + 1).block_until_ready()  # start the backend outside the timed region
    # The unconstrained values: zeros of every continuous latent site's shape (from an abstract trace).
    sites = {}

    def shapes():
        tr = handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs)
        for n, s in tr.items():
            if s["type"] == "sample" and not s["is_observed"] and not s["fn"].support.is_discrete:
                sites[n] = (s["fn"].support, jnp.shape(s["value"]))
        return 0

    jax.eval_shape(shapes)
    from numpyro.distributions import biject_to

    params = {n: np.zeros(biject_to(c).inverse_shape(shape), np.float32) for n, (c, shape) in sites.items()}

    def energy(p):
        return potential_energy(model, args, kwargs, p)

    start = _process_cpu()
    fn = jax.jit(jax.value_and_grad(energy))
    value, grad = fn(params)
    jax.block_until_ready((value, grad))
    return {"jit_cpu": _process_cpu() - start}


def _gradient_child(name: str, min_cpu: float) -> dict:
    """Steady-state CPU seconds per jitted potential-energy-and-gradient call, original vs reparameterized."""
    import jax

    import autoreparam
    from benchmarks.models import MODELS

    spec = MODELS[name]
    args, kwargs = spec.inputs("full")
    model = spec.module.model
    rmodel = autoreparam.reparameterize(model)
    out = {}
    for label, m in (("original", model), ("reparameterized", rmodel)):
        fn, z = _potential_and_grad(m, args, kwargs)
        jax.block_until_ready(fn(z))
        calls = 1
        while True:  # find a call count that takes ~min_cpu / 5
            start = _process_cpu()
            for _ in range(calls):
                r = fn(z)
            jax.block_until_ready(r)
            spent = _process_cpu() - start
            if spent >= min_cpu / 5 or calls >= 1 << 20:
                break
            calls *= 2 if spent < min_cpu / 50 else max(2, int(min_cpu / 5 / max(spent, 1e-9)) + 1)
        blocks = []
        for _ in range(5):
            start = _process_cpu()
            for _ in range(calls):
                r = fn(z)
            jax.block_until_ready(r)
            blocks.append((_process_cpu() - start) / calls)
        out[label] = min(blocks)
        out[f"{label}_sites"] = len(z)
    out["ratio"] = out["reparameterized"] / out["original"]
    return out


def measure_examples(names, repeats: int, env: dict) -> dict:
    results = {}
    for name in names:
        path = f"examples/{name}.py"
        runs = {"analyze": [], "import": [], "jit": []}
        for _ in range(repeats):
            runs["import"].append(child_cpu([sys.executable, "-c", IMPORT_CODE], env)[0])
            runs["analyze"].append(child_cpu([sys.executable, "-c", ANALYZE_CODE.format(path=path)], env)[0])
            runs["jit"].append(child_json(["--child", "jit", name], env)["jit_cpu"])
        med = {k: statistics.median(v) for k, v in runs.items()}
        beyond = med["analyze"] - med["import"]
        results[name] = {"analyze": med["analyze"], "import": med["import"], "beyond_import": beyond,
                         "jit": med["jit"], "ratio": beyond / med["jit"], "runs": runs}
        print(f"{name}: analyze {med['analyze']:.2f} s, import {med['import']:.2f} s, beyond {beyond:.2f} s, "
              f"jit {med['jit']:.2f} s, ratio {beyond / med['jit']:.1f}", file=sys.stderr, flush=True)
    return results


def alternate(names, trees: list[str], repeats: int, env: dict) -> dict:
    """Before/after on a loaded machine: per example, fresh analyze processes of each source tree
    (``PYTHONPATH=TREE``) one after the other, ``repeats`` rounds; the minimum CPU beyond the minimum
    import of each tree (the least disturbed run of each)."""
    results = {}
    for name in names:
        imports, runs = [], {tree: [] for tree in trees}
        for _ in range(repeats):
            imports.append(child_cpu([sys.executable, "-c", IMPORT_CODE], env)[0])
            for tree in trees:
                tree_env = dict(env, PYTHONPATH=os.pathsep.join([tree, str(ROOT)]))
                code = ANALYZE_CODE.format(path=f"examples/{name}.py")
                runs[tree].append(child_cpu([sys.executable, "-c", code], tree_env)[0])
        results[name] = {tree: min(r) - min(imports) for tree, r in runs.items()}
        print(f"{name}: " + ", ".join(f"{tree} {v:.2f} s" for tree, v in results[name].items()),
              file=sys.stderr, flush=True)
    return results


def measure_gradients(names, min_cpu: float, env: dict) -> dict:
    results = {}
    for name in names:
        results[name] = child_json(["--child", "gradient", name, "--min-cpu", str(min_cpu)], env)
        r = results[name]
        print(f"{name}: per gradient {r['original'] * 1e6:.0f} us original, {r['reparameterized'] * 1e6:.0f} us "
              f"reparameterized, ratio {r['ratio']:.2f}", file=sys.stderr, flush=True)
    return results


def markdown(payload: dict) -> str:
    lines = [f"Cold start, {payload['created']} (git {payload['git']}), {payload['machine']}; "
             f"CPU seconds (user + system) of fresh processes, median of {payload['repeats']}; "
             f"`{payload['command']}`.", ""]
    if payload.get("bytecode"):
        lines += ["autoreparam's bytecode written first (as an installed package has it); without it, every "
                  "fresh process also compiles autoreparam's source (`--no-bytecode`).", ""]
    if payload.get("cache"):
        lines += [f"With the persistent compilation cache `{payload['cache']}` (warmed by a first run).", ""]
    if payload["examples"]:
        lines += ["| example | analyze | import jax, numpyro | beyond import (target) | one jit of log density + grad "
                  "| beyond import / jit (target 3x) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in payload["examples"].items():
            target = BEYOND_IMPORT_TARGET.get(name)
            ok = "" if target is None else f" ({'<=' if r['beyond_import'] <= target else '>'} {target:g})"
            lines.append(f"| {name} | {r['analyze']:.2f} | {r['import']:.2f} | {r['beyond_import']:.2f}{ok} | "
                         f"{r['jit']:.2f} | {r['ratio']:.1f}x |")
        lines.append("")
    if payload["gradients"]:
        lines += ["| model | per gradient, original | reparameterized | ratio (target 1.3x) |",
                  "|---|---:|---:|---:|"]
        for name, r in payload["gradients"].items():
            lines.append(f"| {name} | {r['original'] * 1e6:.0f} us | {r['reparameterized'] * 1e6:.0f} us | "
                         f"{r['ratio']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse(argv):
    from benchmarks.models import MODELS

    p = argparse.ArgumentParser(prog="python -m benchmarks.cold_start", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", nargs="*", choices=EXAMPLES, default=list(EXAMPLES), metavar="EXAMPLE",
                   help=f"examples whose cold analyze is timed (default: all of {', '.join(EXAMPLES)})")
    p.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS), metavar="MODEL",
                   help="benchmark models whose per-gradient cost is timed (default: all)")
    p.add_argument("--no-gradient", action="store_true", help="skip the per-gradient timings")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per figure (the median is shown)")
    p.add_argument("--min-cpu", type=float, default=2.0, help="CPU seconds spent timing each gradient")
    p.add_argument("--cache", default=None,
                   help="run with AUTOREPARAM_COMPILATION_CACHE set to this directory (warmed by one "
                        "untimed run per example first)")
    p.add_argument("--no-bytecode", action="store_true",
                   help="do not write autoreparam's bytecode first (under PYTHONDONTWRITEBYTECODE=1 every "
                        "child then compiles its source, as the figures before this option did)")
    p.add_argument("--alternate", nargs="+", metavar="SRC", default=None,
                   help="only compare source trees (directories holding an autoreparam package, bytecode "
                        "written by you): their analyze, one after the other, --repeats rounds; prints JSON")
    p.add_argument("--out", type=Path, default=HERE / "results" / "cold_start.json")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    if ns.child:
        kind, name = ns.child
        result = _jit_child(name) if kind == "jit" else _gradient_child(name, ns.min_cpu)
        print(json.dumps(result))
        return 0
    env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    if ns.alternate:
        print(json.dumps(alternate(ns.examples, ns.alternate, ns.repeats, env)))
        return 0
    if not ns.no_bytecode:
        child_cpu([sys.executable, "-c", BYTECODE_CODE], env)
    if ns.cache:
        env["AUTOREPARAM_COMPILATION_CACHE"] = str(Path(ns.cache).resolve())
        for name in ns.examples:
            child_cpu([sys.executable, "-c", ANALYZE_CODE.format(path=f"examples/{name}.py")], env)
    payload = {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": _git(),
        "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "command": " ".join(["python -m benchmarks.cold_start", *(sys.argv[1:] if argv is None else argv)]),
        "repeats": ns.repeats, "cache": ns.cache, "bytecode": not ns.no_bytecode,
        "examples": measure_examples(ns.examples, ns.repeats, env),
        "gradients": {} if ns.no_gradient else measure_gradients(ns.models, ns.min_cpu, env),
    }
    text = markdown(payload)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(payload, indent=1) + "\n")
    ns.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"wrote {ns.out} and {ns.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
