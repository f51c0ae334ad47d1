"""tern device: the Pi-class agent that trains locally and sends its update to its gateway."""

from device.agent import DeviceAgent, DeviceError, RoundOutcome, local_update, training_rng
from device.trainer import NumpyTrainer, Trainer, trainer_for

__all__ = [
    "DeviceAgent",
    "DeviceError",
    "NumpyTrainer",
    "RoundOutcome",
    "Trainer",
    "local_update",
    "trainer_for",
    "training_rng",
]
