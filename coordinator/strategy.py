"""Server-side strategy: pure functions of their inputs, no clock, no I/O.

FedAvg folds the gateways' partials (weighted by sample count) into one mean delta;
the server applies it with a learning rate and optional momentum. Sampling picks a
round's participants from an explicit Generator. The coordinator owns time and state
and calls these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tern.aggregate import Partial, mean
from tern.errors import ShapeMismatch

__all__ = ["FedAvg", "sample_participants"]

F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class FedAvg:
    """``m = momentum * m + mean; w = w + server_lr * m`` (plain FedAvg: lr 1, momentum 0).

    With lr 1 and momentum 0 the result is bit for bit ``w + mean(partial)``.
    """

    server_lr: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def apply(
        self, weights: F32Array, momentum: F32Array, partial: Partial
    ) -> tuple[F32Array, F32Array]:
        """(new weights, new momentum buffer); the inputs are not modified."""
        if weights.shape != partial.weighted_sum.shape or momentum.shape != weights.shape:
            raise ShapeMismatch(
                f"weights {weights.shape}, momentum {momentum.shape} and partial "
                f"{partial.weighted_sum.shape} differ"
            )
        delta = mean(partial)
        if self.momentum == 0:
            step = delta  # exact: no 0 * m term that could turn a non-finite m into NaN
        else:
            step = (np.float32(self.momentum) * momentum + delta).astype(np.float32)
        if self.server_lr == 1.0:
            new = (weights + step).astype(np.float32)
        else:
            new = (weights + np.float32(self.server_lr) * step).astype(np.float32)
        return new, step.copy()


def sample_participants(
    devices: Sequence[str], fraction: float, rng: np.random.Generator
) -> tuple[str, ...] | None:
    """A sorted sample of ceil(fraction * n) devices (at least one); None means all.

    The draw is over the sorted ids, so the order `devices` come in does not matter.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ids = sorted(set(devices))
    if fraction >= 1 or not ids:
        return None
    k = max(1, math.ceil(fraction * len(ids)))
    if k >= len(ids):
        return None
    picked = rng.choice(len(ids), size=k, replace=False)
    return tuple(sorted(ids[int(i)] for i in picked))
