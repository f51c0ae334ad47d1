"""The coordinator's server strategy and its sampling of participants.

The strategies (FedAvg, FedAdam) are pure values in the protocol layer
(tern.strategies), built from the round's signed policy; they are re-exported here.
Sampling picks a round's participants from an explicit Generator: the coordinator
owns time and randomness and calls these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tern.strategies import FedAdam, FedAvg, ServerState, Strategy, strategy_from

__all__ = [
    "FedAdam",
    "FedAvg",
    "ServerState",
    "Strategy",
    "sample_participants",
    "strategy_from",
]


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
