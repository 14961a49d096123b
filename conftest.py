"""The names the docstring examples in src/autoreparam use (pytest collects them as doctests)."""

import os

import pytest

# Small dense linear algebra is far slower with BLAS threads competing for 2 cores (two test
# processes already share them); set before numpy is imported by the tests.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Inputs and golden outputs of the emitter: read as text by the tests, never imported as modules.
collect_ignore_glob = ["tests/cases/*"]


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
