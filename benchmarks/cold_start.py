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
- ``gradient``: the CPU cost of one potential-energy-and-gradient evaluation of
  ``autoreparam.reparameterize(model)`` against the original model, on every model of
  ``benchmarks/models.py`` (full sizes), in a fresh process per model and repeat.

How the gradient is timed, and why. NUTS evaluates the gradient inside a compiled loop, so a
Python loop of jitted calls measures mostly Python dispatch (10-20 us a call, more than a whole
gradient of eight_schools) and the idle spinning of XLA's threads on a shared machine. Instead:

- one jitted program evaluates the potential energy and its gradient ``n`` times in a
  ``lax.fori_loop``; each pass moves ``z`` by ``eps * gradient`` with ``eps = 0`` given at run time
  (XLA cannot hoist the work out of the loop) and adds the value and the gradient into the carry
  (nothing is dead code); ``n`` is chosen so that one call takes about ``GRADIENT_CALL_CPU`` s;
- XLA runs on one thread, and without its small-while-loop pass (``GRADIENT_XLA_FLAGS``, set in
  the child before jax is imported): that pass compiles a loop reading under 1 kB into one
  function, which happened to the timing loop of eight_schools' original model only, and not to
  the loop that evaluates the gradient inside NumPyro's NUTS (checked on eight_schools);
- original and reparameterized are timed in alternating rounds (at least ``GRADIENT_MIN_ROUNDS``,
  first one then the other first), as process CPU time (``getrusage``) per evaluation; each
  round's two calls run within a few hundredths of a second of each other, so the median of the
  rounds' ratios cancels most of a shared machine's load, which moves the seconds themselves
  by up to 2x.

The figure per model is the median over ``--repeats`` fresh processes.

autoreparam's bytecode is written first (``compileall``, as an installed package has it), so that
no child compiles autoreparam's source; ``--no-bytecode`` leaves that out.

Writes ``benchmarks/results/cold_start.md`` (and ``cold_start.json``), or ``gradient.md`` (and
``gradient.json``) when only the gradients are timed, and prints the tables.
The targets (issue 11): analyze beyond import at most 1 s on eight_schools and county_covariate
and at most 3 s on radon_mn and tensor_model; analyze beyond import at most 3x one jit;
reparameterized / original per-gradient cost at most 1.3x.

    python -m benchmarks.cold_start                         # everything (a few minutes)
    python -m benchmarks.cold_start --examples eight_schools --no-gradient
    python -m benchmarks.cold_start --repeats 3             # median of 3 fresh processes per figure
    python -m benchmarks.cold_start --no-examples --repeats 3   # only the gradients (gradient.md)
    python -m benchmarks.cold_start --alternate OLD/src NEW/src --repeats 3 --examples eight_schools
    python -m benchmarks.cold_start --alternate OLD/src NEW/src --examples --files docs/models/minibatch_numpy_index.py
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
# The gradient children run XLA on one thread (set before jax is imported), so that per-evaluation CPU
# is the program's work, not idle Eigen threads spinning on a shared machine; and without XLA's
# small-while-loop pass, which compiles a loop whose body reads under 1 kB into one function: it
# applied to the timing loop of eight_schools' original model, not to its reparameterized one, nor to
# the loop that evaluates the gradient inside NumPyro's NUTS (checked on eight_schools), which runs
# fusion by fusion. (The backend option goes first: XLA ignored the flags after
# `intra_op_parallelism_threads=1`.)
GRADIENT_XLA_FLAGS = ("--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=0 "
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
GRADIENT_CALL_CPU = 0.02  # CPU seconds of one timed call (a loop of evaluations): dispatch is < 0.5% of it
GRADIENT_MIN_ROUNDS = 20

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


def _gradient_programs(model, rmodel, args, kwargs):
    """Per model, a jitted ``loop(z, n, eps)`` that evaluates the potential energy and its gradient
    ``n`` times inside one compiled program, and the unconstrained point to start it at.

    Each pass moves ``z`` by ``eps * gradient`` (``eps`` is 0 at run time, so every pass evaluates
    at the same point, but XLA cannot know that and hoist the work out of the loop), and adds the
    value and the gradient's sum into the carry, so that nothing is dead code: like a leapfrog step.
    """
    import jax
    import jax.numpy as jnp
    from numpyro.infer.util import initialize_model

    programs = {}
    for label, m in (("original", model), ("reparameterized", rmodel)):
        info = initialize_model(jax.random.PRNGKey(0), m, model_args=args, model_kwargs=kwargs)
        value_and_grad = jax.value_and_grad(info.potential_fn)

        def loop(z, n, eps, value_and_grad=value_and_grad):
            def body(_, carry):
                z, total = carry
                value, grad = value_and_grad(z)
                z = jax.tree_util.tree_map(lambda x, g: x + eps * g, z, grad)
                total = total + value + sum(jnp.sum(g) for g in jax.tree_util.tree_leaves(grad))
                return z, total

            return jax.lax.fori_loop(0, n, body, (z, jnp.zeros((), jnp.result_type(float))))[1]

        programs[label] = (jax.jit(loop), info.param_info.z)
    return programs


def _gradient_child(name: str, min_cpu: float) -> dict:
    """CPU seconds per potential-energy-and-gradient evaluation inside one compiled loop, original and
    reparameterized timed in alternating rounds: the median of each, and the median of the rounds' ratios."""
    import autoreparam
    from benchmarks.models import MODELS

    spec = MODELS[name]
    args, kwargs = spec.inputs("full")
    model = spec.module.model
    programs = _gradient_programs(model, autoreparam.reparameterize(model), args, kwargs)

    def per_evaluation(label, n):
        fn, z = programs[label]
        start = _process_cpu()
        fn(z, n, 0.0).block_until_ready()
        return (_process_cpu() - start) / n

    evaluations = {}
    for label in programs:  # compile, then find a loop length whose call takes about GRADIENT_CALL_CPU
        per_evaluation(label, 1)
        n = 8
        while per_evaluation(label, n) * n < GRADIENT_CALL_CPU / 4 and n < 1 << 24:
            n *= 4
        evaluations[label] = max(1, int(GRADIENT_CALL_CPU / per_evaluation(label, n)))
    rounds = max(GRADIENT_MIN_ROUNDS, int(min_cpu / (len(programs) * GRADIENT_CALL_CPU)))
    times = {label: [] for label in programs}
    for i in range(rounds):  # alternate which goes first, so that neither always follows the other
        for label in (list(programs) if i % 2 == 0 else list(programs)[::-1]):
            times[label].append(per_evaluation(label, evaluations[label]))
    # Each round's two calls ran next to each other, under about the same load: the median of the
    # rounds' ratios is steadier than the ratio of the two minima on a shared machine.
    out = {label: statistics.median(t) for label, t in times.items()}
    out["ratio"] = statistics.median(r / o for o, r in zip(times["original"], times["reparameterized"]))
    out["ratio_of_minima"] = min(times["reparameterized"]) / min(times["original"])
    out["evaluations_per_call"] = evaluations
    out["rounds"] = {label: t for label, t in times.items()}
    out["sites"] = {label: len(z) for label, (_, z) in programs.items()}
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
        path = name if name.endswith(".py") else f"examples/{name}.py"
        for _ in range(repeats):
            imports.append(child_cpu([sys.executable, "-c", IMPORT_CODE], env)[0])
            for tree in trees:
                tree_env = dict(env, PYTHONPATH=os.pathsep.join([tree, str(ROOT)]))
                code = ANALYZE_CODE.format(path=path)
                runs[tree].append(child_cpu([sys.executable, "-c", code], tree_env)[0])
        results[name] = {tree: min(r) - min(imports) for tree, r in runs.items()}
        print(f"{name}: " + ", ".join(f"{tree} {v:.2f} s" for tree, v in results[name].items()),
              file=sys.stderr, flush=True)
    return results


def measure_gradients(names, min_cpu: float, repeats: int, env: dict) -> dict:
    """Per model, ``repeats`` fresh gradient children (one round over the models per repeat, so
    that a change of load falls on every model); the medians over the repeats, and each repeat's ratio."""
    env = dict(env, XLA_FLAGS=GRADIENT_XLA_FLAGS)
    runs = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            r = child_json(["--child", "gradient", name, "--min-cpu", str(min_cpu)], env)
            runs[name].append(r)
            print(f"{name}: per gradient {r['original'] * 1e6:.1f} us original, {r['reparameterized'] * 1e6:.1f} us "
                  f"reparameterized, ratio {r['ratio']:.2f}", file=sys.stderr, flush=True)
    return {name: {"original": statistics.median(r["original"] for r in rs),
                   "reparameterized": statistics.median(r["reparameterized"] for r in rs),
                   "ratio": statistics.median(r["ratio"] for r in rs),
                   "ratios": [r["ratio"] for r in rs], "runs": rs}
            for name, rs in runs.items()}


def markdown(payload: dict) -> str:
    what = ("Cold start", "CPU seconds (user + system) of fresh processes") if payload["examples"] \
        else ("Per-gradient cost", "fresh processes")
    lines = [f"{what[0]}, {payload['created']} (git {payload['git']}), {payload['machine']}; "
             f"{what[1]}, median of {payload['repeats']}; `{payload['command']}`.", ""]
    if payload.get("bytecode") and payload["examples"]:
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
        lines += ["Per gradient: CPU per potential-energy + gradient evaluation inside one compiled loop "
                  "(XLA on one thread), original and reparameterized in alternating rounds; per repeat (a "
                  "fresh process per model) the median over the rounds and the median of the rounds' "
                  "ratios; shown: the median over the repeats, and each repeat's ratio.", "",
                  "| model | per gradient, original | reparameterized | ratio (target 1.3x) | ratio per repeat |",
                  "|---|---:|---:|---:|---|"]
        for name, r in payload["gradients"].items():
            ok = "<=" if r["ratio"] <= GRADIENT_RATIO_TARGET else ">"
            repeats = ", ".join(f"{x:.2f}" for x in r.get("ratios", [r["ratio"]]))
            lines.append(f"| {name} | {_us(r['original'])} | {_us(r['reparameterized'])} | "
                         f"{r['ratio']:.2f}x ({ok} {GRADIENT_RATIO_TARGET:g}) | {repeats} |")
        lines.append("")
    return "\n".join(lines)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.3g} us"


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
    p.add_argument("--no-examples", action="store_true",
                   help="time no example's analyze (the same as --examples with no name): only the gradients")
    p.add_argument("--no-gradient", action="store_true", help="skip the per-gradient timings")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per figure (the median is shown)")
    p.add_argument("--min-cpu", type=float, default=2.0,
                   help="CPU seconds spent timing each model's gradients in each repeat (both models together)")
    p.add_argument("--cache", default=None,
                   help="run with AUTOREPARAM_COMPILATION_CACHE set to this directory (warmed by one "
                        "untimed run per example first)")
    p.add_argument("--no-bytecode", action="store_true",
                   help="do not write autoreparam's bytecode first (under PYTHONDONTWRITEBYTECODE=1 every "
                        "child then compiles its source, as the figures before this option did)")
    p.add_argument("--files", nargs="*", default=[], metavar="FILE",
                   help="with --alternate: model files (.py, as `autoreparam analyze` takes them) timed "
                        "after the examples")
    p.add_argument("--alternate", nargs="+", metavar="SRC", default=None,
                   help="only compare source trees (directories holding an autoreparam package, bytecode "
                        "written by you): their analyze, one after the other, --repeats rounds; prints JSON")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (and a .md beside it); default benchmarks/results/cold_start.json, or "
                        "gradient.json when only the gradients are timed")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.no_examples:
        ns.examples = []
    if ns.out is None:
        ns.out = HERE / "results" / ("gradient.json" if not ns.examples and not ns.no_gradient else "cold_start.json")
    return ns


def main(argv=None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    if ns.child:
        kind, name = ns.child
        if kind == "gradient":
            if "jax" in sys.modules:
                raise RuntimeError("the gradient child must set XLA_FLAGS before jax is imported")
            os.environ["XLA_FLAGS"] = GRADIENT_XLA_FLAGS
        result = _jit_child(name) if kind == "jit" else _gradient_child(name, ns.min_cpu)
        print(json.dumps(result))
        return 0
    env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    if ns.alternate:
        print(json.dumps(alternate([*ns.examples, *ns.files], ns.alternate, ns.repeats, env)))
        return 0
    if not ns.no_bytecode:
        child_cpu([sys.executable, "-c", BYTECODE_CODE], env)
    if ns.cache:
        env["AUTOREPARAM_COMPILATION_CACHE"] = str(Path(ns.cache).resolve())
        for name in ns.examples:
            child_cpu([sys.executable, "-c", ANALYZE_CODE.format(path=f"examples/{name}.py")], env)
    load_at_start = os.getloadavg()[0]
    payload = {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": _git(),
        "command": " ".join(["python -m benchmarks.cold_start", *(sys.argv[1:] if argv is None else argv)]),
        "repeats": ns.repeats, "cache": ns.cache, "bytecode": not ns.no_bytecode,
        "examples": measure_examples(ns.examples, ns.repeats, env),
        "gradients": {} if ns.no_gradient else measure_gradients(ns.models, ns.min_cpu, ns.repeats, env),
    }
    payload["machine"] = (f"{os.cpu_count()} CPUs, load average {load_at_start:.1f} at the start and "
                          f"{os.getloadavg()[0]:.1f} at the end")
    text = markdown(payload)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(payload, indent=1) + "\n")
    ns.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"wrote {ns.out} and {ns.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
