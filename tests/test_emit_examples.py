"""Every example in examples/ round-trips: analyse, emit the source, fit the emitted model with SVI."""

import glob
import os

import jax
import numpy as np
import numpyro
import numpyro.primitives
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

import autoreparam
from autoreparam.cli import load_module
from autoreparam.emit import MARKER
from emit_support import EXAMPLES_DIR, import_source, read

EXAMPLES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(EXAMPLES_DIR, "*.py")))
# The tensor model at its default size (8, 6, 10) takes ~16 s to analyse; its own model_args
# at a small size keeps the suite fast.
INPUTS = {"tensor_model": lambda module: module.model_args(3, 2, 4)}


def test_examples_are_all_covered():
    assert {"tensor_model", "eight_schools", "county_covariate"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_round_trips_under_svi(name, tmp_path):
    path = os.path.join(EXAMPLES_DIR, name + ".py")
    module = load_module(path)
    args, kwargs = INPUTS.get(name, lambda m: m.model_args())(module)
    plan = autoreparam.analyze(module.model, *args, **kwargs).plan
    result = autoreparam.emit_source(read(path), "model", plan)
    assert result.warnings == []
    assert set(result.rewritten) == set(plan.names) and result.rewritten
    assert result.source.startswith(MARKER)

    emitted = import_source(result.source, tmp_path, stem=name)
    args, kwargs = INPUTS.get(name, lambda m: m.model_args())(emitted)  # the emitted file's own inputs
    guide = AutoNormal(emitted.model)
    svi = SVI(emitted.model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO())
    run = svi.run(jax.random.PRNGKey(0), 25, *args, progress_bar=False, **kwargs)
    losses = np.asarray(run.losses)
    assert losses.shape == (25,) and np.all(np.isfinite(losses)), losses
    # the emitted parameterization is what SVI fitted: offset / centredness params, base sites
    for site in plan.sites:
        if site.offsets:
            assert f"{site.name}_offset_{site.offsets[0].parent}" in run.params
            assert f"{site.name}_base_auto_loc" in run.params or f"{site.name}_decentered_auto_loc" in run.params
        if site.noncentred and site.learn_centredness:
            assert f"{site.name}_centered" in run.params
