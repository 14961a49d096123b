"""Checks of plain arguments (counts, sizes), one message each; numpy scalars are as good as Python's.

>>> whole_number("fit_hybrid", "steps", np.int64(200))
200
>>> whole_number("fit_hybrid", "steps", 0)
Traceback (most recent call last):
...
autoreparam.errors.InputError: fit_hybrid: steps must be a positive integer, got 0
"""

from __future__ import annotations

import numbers

import numpy as np

from .errors import InputError

__all__ = ["whole_number", "positive_number"]


def whole_number(where: str, name: str, value, *, minimum: int = 1, none_ok: bool = False, what: str = ""):
    """``value`` as an int at least ``minimum`` (None passes when ``none_ok``); else one InputError line."""
    if value is None and none_ok:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"{where}: {name}{f' ({what})' if what else ''} must be {kind}"
                         f"{' or None' if none_ok else ''}, got {value!r}")
    return int(value)


def positive_number(where: str, name: str, value) -> float:
    """``value`` as a float > 0 (and finite); else one InputError line."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not np.isfinite(value)
            or value <= 0):
        raise InputError(f"{where}: {name} must be a positive number, got {value!r}")
    return float(value)
