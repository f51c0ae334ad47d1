"""The trainer interface a device agent trains through, and the numpy reference trainer.

A trainer is one pure step: from the global weights and the device's local data to
new weights, all randomness from the Generator it is given. The WebAssembly trainer
(kernels/wasm.py) implements the same Protocol; `trainer_for("wasm")` pins the
packaged kernel, while a DeviceAgent without a trainer runs the kernel each round's
schedule names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from kernels.reference import train_local
from kernels.wasm import WasmTrainer
from tern.messages import TrainConfig
from tern.spec import ModelSpec

__all__ = ["TRAINERS", "NumpyTrainer", "Trainer", "trainer_for"]

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.integer]


class Trainer(Protocol):
    name: str

    def train(
        self,
        spec: ModelSpec,
        weights: F32Array,
        x: F32Array,
        y: IntArray,
        config: TrainConfig,
        rng: np.random.Generator,
    ) -> F32Array:
        """New flat float32 weights after local training; `weights` is left unchanged."""


class NumpyTrainer:
    """`kernels.reference.train_local`: minibatch SGD on a dense MLP."""

    name = "numpy"

    def train(
        self,
        spec: ModelSpec,
        weights: F32Array,
        x: F32Array,
        y: IntArray,
        config: TrainConfig,
        rng: np.random.Generator,
    ) -> F32Array:
        return train_local(spec, weights, x, y, config, rng)


TRAINERS: dict[str, Callable[[], Trainer]] = {"numpy": NumpyTrainer, "wasm": WasmTrainer}


def trainer_for(name: str) -> Trainer:
    """The trainer called `name`; ValueError for an unknown one."""
    try:
        return TRAINERS[name]()
    except KeyError:
        raise ValueError(f"trainer {name!r} is not one of {sorted(TRAINERS)}") from None
