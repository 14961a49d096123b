"""Fresh names for the sites and params a reparameterization introduces."""

from __future__ import annotations

from collections.abc import Container

__all__ = ["fresh_name"]


def fresh_name(base: str, taken: Container[str]) -> str:
    """``base`` if it is free, else ``base_1``, ``base_2``, ... (the first one not in ``taken``).

    >>> fresh_name("a_base", {"a", "a_base", "a_base_1"})
    'a_base_2'
    """
    if base not in taken:
        return base
    k = 1
    while f"{base}_{k}" in taken:
        k += 1
    return f"{base}_{k}"
