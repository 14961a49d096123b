import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def examples_dir():
    return os.path.join(ROOT, "examples")


@pytest.fixture(autouse=True)
def clean_handler_stack():
    """Every test, passing or failing, must leave NumPyro's handler stack empty."""
    import numpyro

    yield
    assert numpyro.primitives._PYRO_STACK == []
