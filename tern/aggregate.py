"""Partial aggregates: (weighted sum of deltas, total weight, contributors).

A device's update, a gateway's partial and a partial of partials are the same value,
so a gateway at any depth folds its children exactly as the coordinator folds
gateways. Never an average: the mean is taken once, at the top (`mean`).

Float addition is not associative, so a fold's bits depend on its order. Components
that must agree bit for bit fold in one documented order: ascending sender id
(`fold_sorted`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tern.errors import ShapeMismatch

__all__ = ["Accumulator", "Partial", "fold", "fold_sorted", "mean"]

F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Partial:
    weighted_sum: F32Array  # flat float32, the spec's parameter order
    total_weight: float
    count: int

    @staticmethod
    def zero(size: int) -> Partial:
        return Partial(np.zeros(size, dtype=np.float32), 0.0, 0)


def fold(a: Partial, b: Partial) -> Partial:
    """a + b. Pure: neither input changes."""
    if a.weighted_sum.shape != b.weighted_sum.shape:
        raise ShapeMismatch(
            f"cannot fold partials of shapes {a.weighted_sum.shape} and {b.weighted_sum.shape}"
        )
    return Partial(
        a.weighted_sum + b.weighted_sum, a.total_weight + b.total_weight, a.count + b.count
    )


def fold_sorted(parts: Iterable[tuple[str, Partial]], size: int) -> Partial:
    """Fold (sender id, partial) pairs in ascending sender-id order from zero."""
    ordered = sorted(parts, key=lambda item: item[0])
    ids = [sender for sender, _ in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError(f"sender ids repeat, so the fold order is ambiguous: {ids}")
    acc = Accumulator(size)
    for _, p in ordered:
        acc.add(p)
    return acc.result()


def mean(p: Partial) -> F32Array:
    """The weighted mean delta; zero when nothing arrived."""
    if p.count == 0 or p.total_weight <= 0:
        return np.zeros_like(p.weighted_sum)
    return (p.weighted_sum / np.float32(p.total_weight)).astype(np.float32)


class Accumulator:
    """In-place `fold` for hot paths: the same bits as folding the same parts in order.

    Owned by one component; `result()` hands out a copy, so the Partial stays a value.
    """

    def __init__(self, size: int) -> None:
        self.sum = np.zeros(size, dtype=np.float32)
        self.total_weight = 0.0
        self.count = 0

    def add(self, p: Partial) -> None:
        if p.weighted_sum.shape != self.sum.shape:
            raise ShapeMismatch(
                f"partial of shape {p.weighted_sum.shape}, expected {self.sum.shape}"
            )
        np.add(self.sum, p.weighted_sum, out=self.sum)
        self.total_weight += p.total_weight
        self.count += p.count

    def result(self) -> Partial:
        return Partial(self.sum.copy(), self.total_weight, self.count)
