"""Argument checks shared by the pure cores: one wording for "must be an int >= N" and for
"a list of X, not a bare X". Pure (no Ray)."""

from __future__ import annotations

from typing import Any, Iterable


def check_int(name: str, value: Any, lo: int, error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int (not a bool) ``>= lo``; else ``error`` naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise error(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def list_of(items: Iterable[Any], cls: type, *, call: str, arg: str, plural: str, one: str) -> list[Any]:
    """``items`` as a list whose every item is a ``cls``.

    Raises:
        TypeError: ``items`` is itself a single ``cls`` ("``call`` expects a list of ``plural``,
            got a single ...; wrap it in a list"), or ``items[i]`` is not a ``cls`` ("``arg``\\[i]
            must be ``one``, got ...").
    """
    if isinstance(items, cls):
        raise TypeError(f"{call} expects a list of {plural}, got a single {cls.__name__} (wrap it in a list)")
    items = list(items)
    for i, x in enumerate(items):
        if not isinstance(x, cls):
            raise TypeError(f"{arg}[{i}] must be {one}, got {type(x).__name__}")
    return items
