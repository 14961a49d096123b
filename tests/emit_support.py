"""Shared helpers for the source-emitter tests (tests/test_emit*.py).

Analyses are cached per process: every golden case and example is analysed once here and
reused by the golden, equivalence and round-trip tests.
"""

import functools
import glob
import os

import jax
import numpy as np
import numpyro
from numpyro import handlers

import autoreparam
from autoreparam.cli import load_module

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
CASES_DIR = os.path.join(TESTS, "cases", "emit")
EXAMPLES_DIR = os.path.join(ROOT, "examples")
REGEN = os.environ.get("AUTOREPARAM_REGEN") == "1"


def case_names():
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CASES_DIR, "*.py"))
                  if not p.endswith(".expected.py"))


def case_path(name):
    return os.path.join(CASES_DIR, name + ".py")


def expected_path(name):
    return os.path.join(CASES_DIR, name + ".expected.py")


def read(path):
    # newline="" keeps the bytes as they are (no newline translation)
    with open(path, newline="", encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def load(path):
    """(module, args, kwargs) of a model file; the module is imported once per process."""
    module = load_module(path)
    args, kwargs = module.model_args()
    return module, tuple(args), dict(kwargs)


@functools.lru_cache(maxsize=None)
def report_for(path):
    module, args, kwargs = load(path)
    return autoreparam.analyze(module.model, *args, **kwargs)


def fresh_plan(path, **options):
    """A plan from a new analysis (not cached), for the reproducibility checks."""
    module, args, kwargs = load(path)
    return autoreparam.analyze(module.model, *args, **kwargs).make_plan(**options)


@functools.lru_cache(maxsize=None)
def plan_for(path, noncentre="auto"):
    """The plan of a model file (``noncentre=False``: offsets only).

    ``noncentre`` only decides which funnels are non-centred, so when the default plan
    non-centres nothing it is also the offsets-only plan (saves a second curvature pass).
    """
    if noncentre is False:
        default = plan_for(path)
        if not any(s.noncentred for s in default.sites):
            return default
    return report_for(path).make_plan(noncentre=noncentre)


_counter = [0]


def import_source(text, directory, stem="emitted"):
    """Write ``text`` to a new file in ``directory`` and import it as a fresh module."""
    _counter[0] += 1
    path = os.path.join(str(directory), f"{stem}_{_counter[0]}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return load_module(path)


def trace(model, args, kwargs, seed=0, data=None):
    fn = handlers.seed(model, jax.random.PRNGKey(seed))
    if data is not None:
        fn = handlers.substitute(fn, data=data)
    return handlers.trace(fn).get_trace(*args, **kwargs)


def latent_names(tr):
    return [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]


def random_params(tr, seed, scale=1.0):
    """Random values for the param sites of a trace (unit-interval params kept inside (0, 1))."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, site in tr.items():
        if site["type"] != "param":
            continue
        shape = np.shape(site["value"])
        if name.endswith("_centered"):
            out[name] = jax.numpy.asarray(rng.uniform(0.05, 0.95, shape), dtype=np.float32)
        else:
            out[name] = jax.numpy.asarray(scale * rng.normal(size=shape), dtype=np.float32)
    return out


def prior_samples(model, args, kwargs, names, num_samples, seed, params=None):
    """Prior draws of ``names`` (observed sites resampled: kwargs' observations dropped)."""
    kwargs = {k: (None if k == "y" else v) for k, v in kwargs.items()}
    predictive = numpyro.infer.Predictive(model, params=params or {}, num_samples=num_samples,
                                          return_sites=list(names))
    return predictive(jax.random.PRNGKey(seed), *args, **kwargs)
