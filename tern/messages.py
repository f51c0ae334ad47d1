"""Message bodies: the global model, the round schedule, and updates.

Each has ``to_body()`` (the CBOR value that goes into an Envelope's body) and a
checking ``from_body()``; field-by-field schemas are in topics.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from nacl.signing import VerifyKey

from tern.aggregate import Accumulator, Partial
from tern.codecs import CheckedTensor, Codec, CodecName, codec_for
from tern.envelope import Envelope, Kind, open_envelope
from tern.errors import MalformedMessage, NonFiniteValue, ShapeMismatch, UnknownCodec
from tern.fleet import COORDINATOR
from tern.spec import ModelSpec
from tern.tensors import TypedArrayTag, decode_array, encode_array

__all__ = [
    "CheckedUpdate",
    "GlobalModel",
    "RoundSchedule",
    "TrainConfig",
    "Update",
    "encode_update",
    "open_model",
    "open_schedule",
]

F32Array = npt.NDArray[np.float32]


def _map(value: object, keys: frozenset[str], what: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise MalformedMessage(f"{what} body must be a map")
    if set(value) != keys:
        got = sorted(map(str, value))
        raise MalformedMessage(f"{what} body keys {got} are not {sorted(keys)}")
    return value


def _number(value: object, what: str, *, positive: bool = False) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise MalformedMessage(f"{what} must be a number")
    try:
        f = float(value)
    except OverflowError:  # a CBOR bignum beyond any float
        raise NonFiniteValue(f"{what} is not finite") from None
    if not np.isfinite(f):
        raise NonFiniteValue(f"{what} is not finite")
    if f < 0 or (positive and f == 0):
        raise MalformedMessage(f"{what} must be {'positive' if positive else 'non-negative'}")
    return f


def _count(value: object, what: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 2**32:
        raise MalformedMessage(f"{what} must be an integer in [{minimum}, 2**32)")
    return value


def _codec_name(value: object) -> CodecName:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return CodecName(value)
    except ValueError:
        raise UnknownCodec(f"codec {value!r} is not one of {[str(c) for c in CodecName]}") from None


# -- global model ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GlobalModel:
    """The model every participant trains from: spec plus float32 weights (flat)."""

    spec: ModelSpec
    weights: F32Array

    def __post_init__(self) -> None:
        if self.weights.shape != (self.spec.size,) or self.weights.dtype != np.float32:
            raise ShapeMismatch(f"weights must be float32 of shape ({self.spec.size},)")

    def to_body(self) -> dict[str, object]:
        parts = self.spec.split(self.weights)
        return {
            "spec": self.spec.to_cbor(),
            "weights": [
                encode_array(parts[t.name], TypedArrayTag.FLOAT32_LE) for t in self.spec.tensors
            ],
        }

    @classmethod
    def from_body(cls, body: object) -> GlobalModel:
        m = _map(body, frozenset({"spec", "weights"}), "model")
        spec = ModelSpec.from_cbor(m["spec"])
        tensors = m["weights"]
        if not isinstance(tensors, list | tuple) or len(tensors) != len(spec.tensors):
            raise ShapeMismatch(
                f"model holds a weights array unlike the spec's {len(spec.tensors)}"
            )
        flat = np.empty(spec.size, dtype=np.float32)
        for t, o, wire in zip(spec.tensors, spec.offsets, tensors, strict=True):
            a = decode_array(wire, t.shape, TypedArrayTag.FLOAT32_LE, f"weights {t.name!r}")
            flat[o : o + t.size] = a.reshape(-1)
        return cls(spec, flat)


# -- round schedule ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.5  # measured best for the shipped MLP on MNIST-1D (bench/compression.py)

    def to_cbor(self) -> dict[str, object]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}

    @classmethod
    def from_cbor(cls, value: object) -> TrainConfig:
        m = _map(value, frozenset({"epochs", "batch_size", "lr"}), "train")
        return cls(
            _count(m["epochs"], "train.epochs", 1),
            _count(m["batch_size"], "train.batch_size", 1),
            _number(m["lr"], "train.lr", positive=True),
        )


@dataclass(frozen=True, slots=True)
class RoundSchedule:
    """What round `round` asks of participants, built on model `model_version`."""

    round: int
    model_version: int
    codec: CodecName
    deadline: float  # unix seconds
    min_contributors: int
    participants: tuple[str, ...] | None = None  # None: everyone
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_body(self) -> dict[str, object]:
        return {
            "round": self.round,
            "model": self.model_version,
            "codec": str(self.codec),
            "deadline": self.deadline,
            "min_contributors": self.min_contributors,
            "participants": None if self.participants is None else list(self.participants),
            "seed": self.seed,
            "train": self.train.to_cbor(),
        }

    @classmethod
    def from_body(cls, body: object) -> RoundSchedule:
        keys = frozenset(
            {
                "round",
                "model",
                "codec",
                "deadline",
                "min_contributors",
                "participants",
                "seed",
                "train",
            }
        )
        m = _map(body, keys, "schedule")
        participants = m["participants"]
        if participants is not None:
            if not isinstance(participants, list | tuple) or not all(
                isinstance(p, str) for p in participants
            ):
                raise MalformedMessage("schedule participants must be null or an array of ids")
            participants = tuple(participants)
        return cls(
            round=_count(m["round"], "schedule.round"),
            model_version=_count(m["model"], "schedule.model"),
            codec=_codec_name(m["codec"]),
            deadline=_number(m["deadline"], "schedule.deadline"),
            min_contributors=_count(m["min_contributors"], "schedule.min_contributors"),
            participants=participants,
            seed=_count(m["seed"], "schedule.seed"),
            train=TrainConfig.from_cbor(m["train"]),
        )


# -- updates and partials ----------------------------------------------------------

_UPDATE_KEYS = frozenset({"codec", "weight", "count", "tensors"})


@dataclass(frozen=True, slots=True)
class Update:
    """A weighted sum of deltas on the wire: a device's update or a gateway's partial."""

    codec: CodecName
    weight: float
    count: int
    tensors: tuple[object, ...]  # wire values, spec order

    def to_body(self) -> dict[str, object]:
        return {
            "codec": str(self.codec),
            "weight": self.weight,
            "count": self.count,
            "tensors": list(self.tensors),
        }

    @classmethod
    def from_body(cls, body: object) -> Update:
        m = _map(body, _UPDATE_KEYS, "update")
        tensors = m["tensors"]
        if not isinstance(tensors, list | tuple):
            raise MalformedMessage("update tensors must be an array")
        return cls(
            codec=_codec_name(m["codec"]),
            weight=_number(m["weight"], "update.weight", positive=True),
            count=_count(m["count"], "update.count", 1),
            tensors=tuple(tensors),
        )

    def check(self, spec: ModelSpec) -> CheckedUpdate:
        """Validate every tensor against `spec` before anything is accumulated."""
        if len(self.tensors) != len(spec.tensors):
            raise ShapeMismatch(
                f"update has {len(self.tensors)} tensors, spec has {len(spec.tensors)}"
            )
        codec = codec_for(self.codec)
        checked = tuple(
            codec.check(wire, t.shape, f"tensor {t.name!r}")
            for t, wire in zip(spec.tensors, self.tensors, strict=True)
        )
        return CheckedUpdate(spec, checked, self.weight, self.count)


@dataclass(frozen=True, slots=True)
class CheckedUpdate:
    spec: ModelSpec
    tensors: tuple[CheckedTensor, ...]
    weight: float
    count: int

    def add_to(self, acc: Accumulator) -> None:
        """Decode straight into `acc`: the same bits as ``acc.add(self.to_partial())``."""
        if acc.sum.shape != (self.spec.size,):
            raise ShapeMismatch(
                f"accumulator of shape {acc.sum.shape}, spec needs ({self.spec.size},)"
            )
        for t, o, checked in zip(self.spec.tensors, self.spec.offsets, self.tensors, strict=True):
            checked.add_to(acc.sum[o : o + t.size])
        acc.total_weight += self.weight
        acc.count += self.count

    def to_partial(self) -> Partial:
        acc = Accumulator(self.spec.size)
        self.add_to(acc)
        return acc.result()


def encode_update(
    codec: Codec,
    spec: ModelSpec,
    partial: Partial,
    residual: F32Array | None = None,
) -> tuple[Update, F32Array]:
    """Encode a partial aggregate, with error feedback.

    Quantization error is kept per unit weight, (target - sent) / weight, so that
    it carries over when the weight changes between rounds. Returns the update and
    the residual to pass in next time (zeros for a lossless codec).
    """
    if partial.weighted_sum.shape != (spec.size,):
        raise ShapeMismatch(
            f"partial of shape {partial.weighted_sum.shape}, spec needs ({spec.size},)"
        )
    if partial.total_weight <= 0 or partial.count < 1:
        raise ValueError("an update needs a positive weight and at least one contributor")
    weight = np.float32(partial.total_weight)
    target = partial.weighted_sum
    if residual is not None:
        if residual.shape != target.shape:
            raise ShapeMismatch(f"residual shape {residual.shape} differs from {target.shape}")
        target = target + residual * weight
    wires: list[object] = []
    sent = np.empty_like(target)
    for t, o in zip(spec.tensors, spec.offsets, strict=True):
        wire, decoded = codec.encode(target[o : o + t.size].reshape(t.shape))
        wires.append(wire)
        sent[o : o + t.size] = decoded.reshape(-1)
    new_residual = ((target - sent) / weight).astype(np.float32)
    update = Update(codec.name, float(partial.total_weight), partial.count, tuple(wires))
    return update, new_residual


# -- the coordinator's messages, as every receiver opens them ---------------------------


def open_model(data: bytes, coordinator_key: VerifyKey, fleet: str) -> tuple[Envelope, GlobalModel]:
    """A signed global model from the coordinator of `fleet`; a TernError otherwise."""
    env = open_envelope(data, {COORDINATOR: coordinator_key}, fleet=fleet, kinds=(Kind.MODEL,))
    return env, GlobalModel.from_body(env.body)


def open_schedule(
    data: bytes, coordinator_key: VerifyKey, fleet: str
) -> tuple[Envelope, RoundSchedule]:
    """A signed round schedule from the coordinator of `fleet`; a TernError otherwise."""
    env = open_envelope(data, {COORDINATOR: coordinator_key}, fleet=fleet, kinds=(Kind.SCHEDULE,))
    return env, RoundSchedule.from_body(env.body)
