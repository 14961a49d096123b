"""Checks of plain arguments: numpy scalars as Python's, one line for anything else."""

import numpy as np
import pytest

from autoreparam.arguments import positive_number, whole_number
from autoreparam.errors import InputError


def test_numpy_scalars_are_counts():
    assert whole_number("f", "steps", np.int64(3)) == 3 and type(whole_number("f", "steps", np.int32(3))) is int
    assert positive_number("f", "init_scale", np.float32(0.5)) == 0.5
    assert whole_number("f", "seed", -3, minimum=None) == -3
    assert whole_number("f", "theta_pool", None, none_ok=True) is None


@pytest.mark.parametrize("value, words", [
    (True, "got True"), (np.bool_(True), "got np.True_"), (2.0, "got 2.0"), (0, "got 0"),
    (np.ones((30, 30)), "got an array of shape (30, 30) (float64)"), ("3", "got '3'")])
def test_bad_counts_are_one_line(value, words):
    with pytest.raises(InputError) as info:
        whole_number("fit_hybrid", "steps", value)
    assert str(info.value) == f"fit_hybrid: steps must be a positive integer, {words}"


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), 10 ** 400, True, "0.1"])
def test_bad_scales_are_one_line(value):
    with pytest.raises(InputError, match=r"^AutoHybrid: init_scale must be a positive number, got [^\n]*$"):
        positive_number("AutoHybrid", "init_scale", value)
