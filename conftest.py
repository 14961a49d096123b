"""The names the docstring examples in src/autoreparam use (pytest collects them as doctests)."""

import os

import pytest

# Small dense linear algebra is far slower with BLAS threads competing for 2 cores (two test
# processes already share them); set before numpy is imported by the tests.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Inputs and golden outputs of the emitter: read as text by the tests, never imported as modules.
collect_ignore_glob = ["tests/cases/*"]

# The longest test files, longest first (CPU seconds of each alone, -n 0, December 2026): test_benchmarks
# (its quick benchmark subprocess), test_hybrid (~250 s), test_collapsed, test_conditional and
# test_emit_examples (~130 s), test_cli_commands (~110 s), test_mvn_funnel (~90 s). xdist hands out whole
# files in collection order (`--dist loadfile --no-loadscope-reorder` in pyproject.toml): started first,
# they do not leave one worker busy at the end while the other idles (by default xdist starts the files
# with the most tests first, and test_emit_examples, with 6 tests, came last).
LONGEST_FILES = ("test_benchmarks.py", "test_hybrid.py", "test_collapsed.py", "test_conditional.py",
                 "test_emit_examples.py", "test_cli_commands.py", "test_mvn_funnel.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def doctest_names(request):
    """Give every docstring example NumPyro, JAX, numpy, autoreparam and the plan's classes."""
    if type(request.node).__name__ != "DoctestItem":
        return
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    from numpyro import handlers

    import jax
    from numpyro.infer import SVI

    import autoreparam
    from autoreparam.hybrid import AutoHybrid, HybridELBO
    from autoreparam.plan import Offset, Plan, SitePlan, SparseMap
    from autoreparam.trace import trace_model

    request.getfixturevalue("doctest_namespace").update(
        jnp=jnp, np=np, numpyro=numpyro, dist=dist, handlers=handlers, autoreparam=autoreparam,
        Offset=Offset, Plan=Plan, SitePlan=SitePlan, SparseMap=SparseMap, jax=jax, SVI=SVI,
        AutoHybrid=AutoHybrid, HybridELBO=HybridELBO, trace_model=trace_model)
