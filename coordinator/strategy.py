"""The coordinator's server strategy and its sampling of participants.

The strategies (FedAvg, FedAdam: tern.strategies) and the sampling of a round's
participants from an explicit Generator (tern.rounds.opening) are pure values and
functions of the protocol layer, re-exported here.
"""

from __future__ import annotations

from tern.rounds.opening import sample_participants
from tern.strategies import FedAdam, FedAvg, ServerState, Strategy, strategy_from

__all__ = [
    "FedAdam",
    "FedAvg",
    "ServerState",
    "Strategy",
    "sample_participants",
    "strategy_from",
]
