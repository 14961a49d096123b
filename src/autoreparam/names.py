"""Fresh names, so that the sites, params and variables autoreparam adds never collide with a model's own."""

from __future__ import annotations

from typing import Container

__all__ = ["fresh_name"]


def fresh_name(base: str, taken: Container[str]) -> str:
    """``base`` if it is not taken, else the first free one of ``base_1``, ``base_2``, ...

    >>> fresh_name("a_base", {"a", "a_base"})
    'a_base_1'
    """
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"
