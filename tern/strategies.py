"""Server strategies: the coordinator's step from the round's fold to the next model.

Pure functions of their inputs: no clock, no I/O, no randomness. A strategy takes the
global weights, its own state and the round's partial (tern.aggregate: weighted sum,
total weight, count) and returns the new weights and a new state; the inputs are not
modified. The round's policy (tern.policy) names the strategy, so `strategy_from`
builds the one the schedule signs.

The coordinator calls `apply` only for a round that passed (at least its
`min_contributors` and a positive weight). Each strategy still defines the empty
partial: FedAvg keeps the arithmetic it always had (a zero mean; momentum coasts),
FedAdam takes no step at all (weights and state unchanged).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from tern.aggregate import Partial, mean
from tern.errors import ShapeMismatch
from tern.policy import STRATEGY_PARAMS, PolicyError, StrategySpec

__all__ = [
    "FedAdam",
    "FedAvg",
    "ServerState",
    "Strategy",
    "strategy_from",
]

F32Array = npt.NDArray[np.float32]
_BUFFER_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _frozen_copy(a: F32Array) -> F32Array:
    out = np.array(a, dtype=np.float32, copy=True)
    out.flags.writeable = False
    return out


@dataclass(frozen=True, slots=True, eq=False)
class ServerState:
    """A strategy's state between rounds: named flat float32 buffers, all of one size,
    and the number of steps taken.

    The buffers are read-only copies, so a state is a value. Persist it with
    `to_arrays` (one .npy file per buffer name) and `from_arrays`. A store that keeps
    one state per model version can restore `step` as that version: every version after
    the first is one step. FedAvg's one buffer, ``momentum``, is the array the
    coordinator has always saved as ``models/m{N}.npy``.
    """

    step: int
    buffers: Mapping[str, F32Array] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 0:
            raise ValueError("a server state's step is an integer >= 0")
        shapes = set()
        frozen = {}
        for name in sorted(self.buffers):
            if not isinstance(name, str) or _BUFFER_NAME.fullmatch(name) is None:
                raise ValueError("a server state's buffer names are slugs (a-z, 0-9, _)")
            a = self.buffers[name]
            if not isinstance(a, np.ndarray) or a.dtype != np.float32:
                raise ValueError(f"buffer {name!r} is not a float32 array")
            if a.ndim != 1:
                raise ShapeMismatch(f"buffer {name!r} has shape {a.shape}, not a flat array")
            shapes.add(a.shape)
            frozen[name] = _frozen_copy(a)
        if len(shapes) > 1:
            raise ShapeMismatch(f"a server state's buffers differ in shape: {sorted(shapes)}")
        object.__setattr__(self, "buffers", MappingProxyType(frozen))

    def to_arrays(self) -> dict[str, F32Array]:
        """A writable float32 copy of each buffer, by name."""
        return {name: np.array(a, dtype=np.float32, copy=True) for name, a in self.buffers.items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, F32Array], step: int = 0) -> ServerState:
        """The state `to_arrays` saved; every array must be flat float32 of one size."""
        return cls(step, arrays)

    def same_as(self, other: ServerState) -> bool:
        """Equal step, buffer names and buffer bits."""
        return (
            self.step == other.step
            and self.buffers.keys() == other.buffers.keys()
            and all(
                a.tobytes() == other.buffers[n].tobytes() and a.shape == other.buffers[n].shape
                for n, a in self.buffers.items()
            )
        )


class Strategy(Protocol):
    """The server step: pure; `apply` modifies none of its inputs."""

    @property
    def name(self) -> str: ...

    def init_state(self, size: int) -> ServerState:
        """The state before the first round, for a model of `size` parameters."""
        ...

    def apply(
        self, weights: F32Array, state: ServerState, partial: Partial
    ) -> tuple[F32Array, ServerState]:
        """(new weights, new state) after the round whose fold is `partial`."""
        ...


def _buffers(state: ServerState, names: tuple[str, ...], weights: F32Array) -> list[F32Array]:
    if tuple(sorted(state.buffers)) != tuple(sorted(names)):
        raise ShapeMismatch(f"state holds buffers {sorted(state.buffers)}, not {sorted(names)}")
    out = [state.buffers[n] for n in names]
    for n, a in zip(names, out, strict=True):
        if a.shape != weights.shape:
            raise ShapeMismatch(f"buffer {n!r} of shape {a.shape}, weights {weights.shape}")
    return out


def _check_partial(weights: F32Array, partial: Partial) -> None:
    if weights.shape != partial.weighted_sum.shape:
        raise ShapeMismatch(
            f"weights {weights.shape} and partial {partial.weighted_sum.shape} differ"
        )


def _check(name: str, **values: float) -> None:
    rules = STRATEGY_PARAMS[name]
    for key, value in values.items():
        if not rules[key].admits(value):
            raise ValueError(f"{name} {key} must be in {rules[key].describe()}, got {value}")


@dataclass(frozen=True, slots=True)
class FedAvg:
    """``m = momentum * m + mean; w = w + server_lr * m`` (plain FedAvg: lr 1, momentum 0).

    With lr 1 and momentum 0 the result is bit for bit ``w + mean(partial)``. The state
    holds one buffer, ``momentum``: m after the step (the mean itself without momentum).
    """

    server_lr: float = 1.0
    momentum: float = 0.0
    name: ClassVar[str] = "fedavg"

    def __post_init__(self) -> None:
        _check(self.name, lr=self.server_lr, momentum=self.momentum)

    def init_state(self, size: int) -> ServerState:
        return ServerState(0, {"momentum": np.zeros(size, dtype=np.float32)})

    def apply(
        self, weights: F32Array, state: ServerState, partial: Partial
    ) -> tuple[F32Array, ServerState]:
        _check_partial(weights, partial)
        (momentum,) = _buffers(state, ("momentum",), weights)
        # The arithmetic, its order and its casts are those of every model this
        # coordinator has saved: resuming a state directory gives the same bits.
        delta = mean(partial)
        if self.momentum == 0:
            step = delta  # exact: no 0 * m term that could turn a non-finite m into NaN
        else:
            step = (np.float32(self.momentum) * momentum + delta).astype(np.float32)
        if self.server_lr == 1.0:
            new = (weights + step).astype(np.float32)
        else:
            new = (weights + np.float32(self.server_lr) * step).astype(np.float32)
        return new, ServerState(state.step + 1, {"momentum": step})


@dataclass(frozen=True, slots=True)
class FedAdam:
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"), float32 throughout:

    ``d = mean; m = b1*m + (1-b1)*d; v = b2*v + (1-b2)*d*d; w = w + lr * m / (sqrt(v) + tau)``

    No bias correction, as in the paper. `tau` > 0 keeps the division finite; the
    result is finite while every term fits float32 (|d| below about 1.8e19, so that
    d*d does). An empty partial (count 0 or weight 0) takes no step: the weights and
    the state come back unchanged.
    """

    lr: float = STRATEGY_PARAMS["fedadam"]["lr"].default
    beta1: float = STRATEGY_PARAMS["fedadam"]["beta1"].default
    beta2: float = STRATEGY_PARAMS["fedadam"]["beta2"].default
    tau: float = STRATEGY_PARAMS["fedadam"]["tau"].default
    name: ClassVar[str] = "fedadam"

    def __post_init__(self) -> None:
        _check(self.name, lr=self.lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau)

    def init_state(self, size: int) -> ServerState:
        zeros = np.zeros(size, dtype=np.float32)
        return ServerState(0, {"m": zeros, "v": zeros})

    def apply(
        self, weights: F32Array, state: ServerState, partial: Partial
    ) -> tuple[F32Array, ServerState]:
        _check_partial(weights, partial)
        m, v = _buffers(state, ("m", "v"), weights)
        if partial.count == 0 or partial.total_weight <= 0:
            return np.array(weights, dtype=np.float32, copy=True), state
        one = np.float32(1)
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        d = mean(partial)
        new_m = (b1 * m + (one - b1) * d).astype(np.float32)
        new_v = (b2 * v + (one - b2) * (d * d)).astype(np.float32)
        step = (new_m / (np.sqrt(new_v) + np.float32(self.tau))).astype(np.float32)
        new = (weights + np.float32(self.lr) * step).astype(np.float32)
        return new, ServerState(state.step + 1, {"m": new_m, "v": new_v})


def strategy_from(spec: StrategySpec) -> Strategy:
    """The strategy a policy names, with its parameters (defaults for those it does not
    name); PolicyError when this build has no such strategy or parameter."""
    why = spec.supported()
    if why is not None:
        raise PolicyError(why)
    p = spec.values()
    try:
        if spec.name == "fedavg":
            return FedAvg(server_lr=p["lr"], momentum=p["momentum"])
        if spec.name == "fedadam":
            return FedAdam(lr=p["lr"], beta1=p["beta1"], beta2=p["beta2"], tau=p["tau"])
    except ValueError as exc:  # a spec's known parameters are checked when it is made
        raise PolicyError(f"strategy {spec.name!r}: {exc}") from exc
    raise PolicyError(f"strategy {spec.name!r} is known but not built here")
