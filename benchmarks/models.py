"""The benchmark's models: which example, at which size, against which reference posterior.

Every model lives in ``examples/`` (function ``model``, function ``model_args``), so the CLI
works on it too. References:

- ``nuts``: a long NUTS run made by the harness itself (own seeds, more chains and draws than
  the NUTS methods that are compared against it), on the original model or, where NUTS on the
  original does not mix at all in the time budget (the large tensor model: min ESS 3 and R-hat
  1.7 in 4 x 500 draws), on ``autoreparam.reparameterize(model)``, which has the same posterior;
- ``inference_gym``: the published ground truth of TensorFlow Probability's inference_gym
  (long CmdStan runs), ``benchmarks/data/radon_mn_reference.json``;
- ``posteriordb``: posteriordb's reference draws (10 chains x 1000),
  ``benchmarks/data/eight_schools_reference.json``.

See ``benchmarks/data/PROVENANCE.md``.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data"
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


def example(name: str):
    return importlib.import_module(name)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    example: str
    description: str
    reference: str  # "nuts" | "inference_gym" | "posteriordb"
    # mode -> (args, kwargs); quick mode uses small sizes
    inputs: Callable[[str], tuple]
    # mode -> size note for the table
    size: Callable[[str], str]
    # SVI steps per mode (the same for every VI method of the model)
    steps: dict = field(default_factory=dict)
    # For reference "nuts": which parameterization the long reference run samples. Both have the
    # same posterior (the reparameterization is an exact change of variables); "autoreparam" is
    # for models where NUTS on the original does not mix within the time budget.
    reference_model: str = "original"

    @property
    def module(self):
        return example(self.example)


def _tensor_inputs(full, quick):
    def inputs(mode):
        I, J, T = full if mode == "full" else quick
        return example("tensor_model").model_args(I, J, T)
    return inputs


def _tensor_size(full, quick):
    def size(mode):
        I, J, T = full if mode == "full" else quick
        return f"I={I}, J={J}, T={T}: {I * J * T:,} obs"
    return size


def _crossed_inputs(mode):
    m = example("crossed_logistic")
    return m.model_args() if mode == "full" else m.model_args(40, 20, 400)


def _crossed_size(mode):
    rows, cols, n = (300, 100, 15000) if mode == "full" else (40, 20, 400)
    return f"{rows} x {cols} levels: {n:,} obs"


MODELS = {
    "tensor_small": ModelSpec(
        "tensor_small", "tensor_model",
        "the seed's tensor model y_ijt ~ N(mu + a_i + b_j + z_t + A_it + B_jt + C_ij, sigma), synthetic",
        "nuts", _tensor_inputs((8, 6, 10), (4, 3, 5)), _tensor_size((8, 6, 10), (4, 3, 5)),
        {"full": 10000, "quick": 200}),
    "tensor_large": ModelSpec(
        "tensor_large", "tensor_model",
        "the same tensor model with >= 10^4 observations, synthetic",
        "nuts", _tensor_inputs((32, 32, 10), (4, 3, 5)), _tensor_size((32, 32, 10), (4, 3, 5)),
        {"full": 5000, "quick": 200}, reference_model="autoreparam"),
    "radon_mn": ModelSpec(
        "radon_mn", "radon_mn",
        "radon, Minnesota (real data): county intercepts centred on a mean, uranium and "
        "floor-by-county covariates (inference_gym radon_contextual_effects_minnesota)",
        "inference_gym", lambda mode: example("radon_mn").model_args(),
        lambda mode: "919 houses, 85 counties", {"full": 10000, "quick": 200}),
    "eight_schools": ModelSpec(
        "eight_schools", "eight_schools", "eight schools, centred (real data)",
        "posteriordb", lambda mode: example("eight_schools").model_args(),
        lambda mode: "8 schools", {"full": 10000, "quick": 200}),
    "crossed_logistic": ModelSpec(
        "crossed_logistic", "crossed_logistic",
        "crossed random-effects logistic regression mu + a[row] + b[col], synthetic (seed 0)",
        "nuts", _crossed_inputs, _crossed_size, {"full": 5000, "quick": 200}),
}


def load_reference(spec: ModelSpec) -> dict:
    """{site: {"mean": array, "sd": array, "mean_se": array or None}} from the shipped files."""
    if spec.reference == "inference_gym":
        path = DATA / "radon_mn_reference.json"
    elif spec.reference == "posteriordb":
        path = DATA / "eight_schools_reference.json"
    else:
        raise ValueError(f"{spec.name}: reference {spec.reference!r} is computed, not loaded")
    d = json.loads(path.read_text())
    out = {}
    for site, v in d["sites"].items():
        out[site] = {k: (None if v.get(k) is None else np.asarray(v[k], dtype=np.float64))
                     for k in ("mean", "sd", "mean_se")}
    return out


# -- geometry models (NUTS only): shapes on which reparameterization once made NUTS worse ------------
@dataclass(frozen=True)
class GeometrySpec:
    """A NUTS-only benchmark model from ``benchmarks/geometry_models.py`` (synthetic, fixed seed)."""

    name: str
    description: str

    def inputs(self, mode: str):
        from . import geometry_models

        return getattr(geometry_models, f"{self.name}_data")("full" if mode == "full" else "quick")

    @property
    def model(self):
        from . import geometry_models

        return getattr(geometry_models, self.name)


GEOMETRY_MODELS = {spec.name: spec for spec in (
    GeometrySpec("tutorial", "NumPyro's hierarchical linear regression tutorial shape: 176 patients x 9 visits, "
                             "intercepts near 2,700, HalfNormal(100) scales"),
    GeometrySpec("group_logistic", "logistic regression, 40 hierarchical group intercepts x 25 obs, common slope"),
    GeometrySpec("lkj_gaussian", "varying intercepts and slopes, LKJ-correlated block, 30 groups x 10, Gaussian"),
    GeometrySpec("lkj_logistic", "varying effects logistic, LKJ-correlated block, 30 groups x 10, Bernoulli"),
    GeometrySpec("horseshoe", "horseshoe regression, 20 coefficients (3 signals), 100 obs"),
    GeometrySpec("weak_schools", "control: eight-schools-like weak data, 16 schools (non-centring should win)"),
)}
