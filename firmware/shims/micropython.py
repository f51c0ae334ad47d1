"""MicroPython's ``micropython`` module under CPython: the parts firmware code may use."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["const"]

T = TypeVar("T")


def const(value: T) -> T:
    """MicroPython folds const() at compile time; CPython just returns the value."""
    return value
