"""What the coordinator publishes of a new model: the next server model after a round
and, when its strategy sends deltas (`tern.downlink.CompressedDownlink`), the delta that
makes it from the one before. Pure."""

from __future__ import annotations

import numpy as np
from nacl.signing import SigningKey

from tern.aggregate import Partial
from tern.downlink import CompressedDownlink, ModelDelta
from tern.envelope import Envelope, Kind, seal
from tern.errors import NonFiniteValue
from tern.fleet import COORDINATOR
from tern.rounds.opening import ServerModel
from tern.strategies import Strategy

__all__ = ["next_model", "seal_delta"]


def next_model(
    model: ServerModel, strategy: Strategy, partial: Partial
) -> tuple[ServerModel | None, ModelDelta | None]:
    """The next version after a round that folded `partial`, and its delta (None when
    the strategy sends full models); (None, None) when it would not be finite."""
    if not isinstance(strategy, CompressedDownlink):
        return model.step(strategy, partial), None
    try:
        compressed, state = strategy.step(model.weights, model.state, partial, model.version)
    except NonFiniteValue:
        return None, None
    if not all(bool(np.isfinite(b).all()) for b in state.buffers.values()):
        return None, None
    return ServerModel(model.version + 1, compressed.model.weights, state), compressed.delta


def seal_delta(
    delta: ModelDelta, fleet: str, round: int, version: int, run: int, key: SigningKey
) -> bytes:
    """The coordinator's signed delta to model `version`, published as round `round` opens."""
    env = Envelope(Kind.MODEL_DELTA, fleet, round, version, COORDINATOR, delta.to_body(), run=run)
    return seal(env, key)
