"""tern coordinator: runs federated rounds for one fleet over MQTT.

It holds the model spec and the global model, publishes the signed model and the
round schedule (retained), collects the gateways' partial aggregates, folds them with
FedAvg, and persists every model version and round record so a restart resumes
where it stopped. See docs/rounds.md.
"""

from coordinator.config import ConfigError, CoordinatorConfig, CoordinatorError, RoundTimeout
from coordinator.service import Coordinator, TestSet
from coordinator.store import RoundRecord, StateStore, StoreError
from coordinator.strategy import FedAvg, sample_participants

__all__ = [
    "ConfigError",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorError",
    "FedAvg",
    "RoundRecord",
    "RoundTimeout",
    "StateStore",
    "StoreError",
    "TestSet",
    "sample_participants",
]
