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

__all__ = ["whole_number", "positive_number", "shown"]


def whole_number(where: str, name: str, value, *, minimum: int | None = 1, none_ok: bool = False,
                 what: str = ""):
    """``value`` as an int at least ``minimum`` (any int for None; None passes when ``none_ok``); else one
    InputError line."""
    if value is None and none_ok:
        return None
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
            or (minimum is not None and value < minimum)):
        kind = "an integer" if minimum is None else "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"{where}: {name}{f' ({what})' if what else ''} must be {kind}"
                         f"{' or None' if none_ok else ''}, got {shown(value)}")
    return int(value)


def positive_number(where: str, name: str, value) -> float:
    """``value`` as a float > 0 (and finite); else one InputError line."""
    try:
        ok = (not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Real)
              and 0 < float(value) < np.inf)
    except OverflowError:  # an integer beyond any float
        ok = False
    if not ok:
        raise InputError(f"{where}: {name} must be a positive number, got {shown(value)}")
    return float(value)


def shown(value) -> str:
    """A value for a one-line message: its repr, or the shape and dtype of an array."""
    if hasattr(value, "shape") and np.ndim(value) > 0:
        return f"an array of shape {tuple(np.shape(value))} ({getattr(value, 'dtype', '?')})"
    text = repr(value)
    return text if len(text) <= 60 and "\n" not in text else text.replace("\n", " ")[:57] + "..."
