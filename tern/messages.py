"""Message bodies: the global model, updates and failures, kernels; and how every
receiver opens the coordinator's messages. The round schedule is in `tern.schedule`,
its aggregation policy in `tern.policy` (both re-exported here).

Each has ``to_body()`` (the CBOR value that goes into an Envelope's body) and a
checking ``from_body()``; field-by-field schemas are in topics.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from tern.aggregate import Accumulator, Partial
from tern.caps import KERNEL_CAPS, MAX_KERNEL_BYTES, model_caps, schedule_caps
from tern.codecs import CheckedTensor, Codec, CodecName, Float32Codec, codec_for
from tern.envelope import Envelope, Kind, open_envelope, seal
from tern.errors import (
    DigestMismatch,
    MalformedMessage,
    PayloadTooLarge,
    ShapeMismatch,
    UnknownCodec,
    Unsigned,
)
from tern.fields import body_map, codec_field, digest_field, number_field, tally_field, uint_field
from tern.fleet import COORDINATOR, Fleet
from tern.policy import Policy, StrategySpec
from tern.schedule import (
    DEFAULT_MAX_NORM,
    DEFAULT_MAX_WEIGHT,
    MIN_WEIGHT,
    Bounds,
    KernelRef,
    RoundSchedule,
    TrainConfig,
)
from tern.spec import MAX_PARAMS, ModelSpec
from tern.tensors import TypedArrayTag, decode_array, encode_array

__all__ = [
    "DEFAULT_MAX_NORM",
    "DEFAULT_MAX_WEIGHT",
    "MAX_KERNEL_BYTES",
    "MIN_WEIGHT",
    "Bounds",
    "CheckedUpdate",
    "Failure",
    "GlobalModel",
    "KernelFile",
    "KernelRef",
    "Policy",
    "RoundSchedule",
    "StrategySpec",
    "TrainConfig",
    "Update",
    "cohort_message",
    "encode_update",
    "model_body",
    "open_kernel",
    "open_model",
    "open_model_envelope",
    "open_schedule",
    "open_schedule_envelope",
    "schedule_body",
    "seal_kernel",
]

F32Array = npt.NDArray[np.float32]


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
    def from_body(cls, body: object, *, max_params: int = MAX_PARAMS) -> GlobalModel:
        """`max_params`: the receiver's bound (the fleet file's), checked before the weights."""
        m = body_map(body, frozenset({"spec", "weights"}), "model")
        spec = ModelSpec.from_cbor(m["spec"])
        if spec.size > max_params:
            raise ShapeMismatch(
                f"a model of {spec.size} parameters exceeds the fleet's {max_params}"
            )
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


# -- updates and partials ----------------------------------------------------------

_UPDATE_KEYS = frozenset({"codec", "weight", "count", "tensors"})


@dataclass(frozen=True, slots=True)
class Update:
    """A weighted sum of deltas on the wire: a device's update or a gateway's partial."""

    codec: CodecName
    weight: float
    count: int
    tensors: tuple[object, ...]  # wire values, spec order
    # devices below the sender that could not contribute, by reason (partials only)
    failed: Mapping[str, int] = field(default_factory=dict)

    def to_body(self) -> dict[str, object]:
        body: dict[str, object] = {
            "codec": str(self.codec),
            "weight": self.weight,
            "count": self.count,
            "tensors": list(self.tensors),
        }
        if self.failed:
            body["failed"] = dict(self.failed)
        return body

    @classmethod
    def from_body(cls, body: object) -> Update:
        m = body_map(body, _UPDATE_KEYS, "update", frozenset({"failed"}))
        tensors = m["tensors"]
        if not isinstance(tensors, list | tuple):
            raise MalformedMessage("update tensors must be an array")
        return cls(
            codec=codec_field(m["codec"]),
            weight=number_field(m["weight"], "update.weight", positive=True),
            count=uint_field(m["count"], "update.count", 1),
            tensors=tuple(tensors),
            failed=tally_field(m["failed"], "update.failed") if "failed" in m else {},
        )

    def check(self, spec: ModelSpec, *, density: float | None = None) -> CheckedUpdate:
        """Validate every tensor against `spec` before anything is accumulated; `density`:
        the schedule's, which bounds a sparse tensor's entries."""
        if len(self.tensors) != len(spec.tensors):
            raise ShapeMismatch(
                f"update has {len(self.tensors)} tensors, spec has {len(spec.tensors)}"
            )
        if self.codec is CodecName.SPARSE and density is None:
            raise UnknownCodec("a sparse update where the round names no density")
        codec = codec_for(self.codec, density=density)
        checked = tuple(
            codec.check(wire, t.shape, f"tensor {t.name!r}")
            for t, wire in zip(spec.tensors, self.tensors, strict=True)
        )
        return CheckedUpdate(spec, checked, self.weight, self.count, dict(self.failed))


@dataclass(frozen=True, slots=True)
class CheckedUpdate:
    spec: ModelSpec
    tensors: tuple[CheckedTensor, ...]
    weight: float
    count: int
    failed: Mapping[str, int] = field(default_factory=dict)

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

    def sq_norm(self) -> float:
        """The squared L2 norm of the weighted sum, in float64."""
        return sum(t.sq_norm() for t in self.tensors)

    def to_partial(self) -> Partial:
        acc = Accumulator(self.spec.size)
        self.add_to(acc)
        return acc.result()


@dataclass(frozen=True, slots=True)
class Failure:
    """In place of an update: participants that could not contribute, by reason.

    A device sends one for itself when its round failed (a refused kernel, a trap);
    a gateway sends one when nothing below it contributed but some reported failures.
    Either way the receiver stops waiting for the sender and counts the reasons.
    """

    failed: Mapping[str, int]

    def to_body(self) -> dict[str, object]:
        return {"failed": dict(self.failed)}

    @classmethod
    def from_body(cls, body: object) -> Failure:
        m = body_map(body, frozenset({"failed"}), "failure")
        failed = tally_field(m["failed"], "failure.failed")
        if not failed:
            raise MalformedMessage("a failure names at least one reason")
        return cls(failed)


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


def cohort_message(
    spec: ModelSpec, result: Partial, failed: Mapping[str, int], encoded: Update | None = None
) -> tuple[Kind, dict[str, object]] | None:
    """What a gateway sends its parent for a closed round: its fold as a ``partial``,
    `encoded` (by default the exact float32 sum), with the failures below it; or, when
    nothing was folded but some devices reported failures, a ``failure`` with their
    reasons; None when neither."""
    if result.count > 0:
        update = encoded if encoded is not None else encode_update(Float32Codec(), spec, result)[0]
        return Kind.PARTIAL, replace(update, failed=dict(failed)).to_body()
    if failed:  # nothing to fold, but the parent learns why and stops waiting
        return Kind.FAILURE, Failure(dict(failed)).to_body()
    return None


# -- the coordinator's messages, as every receiver opens them ---------------------------


def open_model_envelope(data: bytes, fleet: Fleet) -> Envelope:
    """The coordinator's signed envelope of a global model, its body not yet checked
    (`model_body`): a receiver can refuse an old one before it decodes the weights."""
    return open_envelope(
        data,
        {COORDINATOR: fleet.coordinator_key},
        fleet=fleet.fleet,
        kinds=(Kind.MODEL,),
        caps=model_caps(fleet.max_params),
    )


def model_body(env: Envelope, fleet: Fleet) -> GlobalModel:
    """The global model in an envelope from `open_model_envelope`; a TernError if its
    body is not one of at most the fleet's `max_params` parameters."""
    return GlobalModel.from_body(env.body, max_params=fleet.max_params)


def open_model(data: bytes, fleet: Fleet) -> tuple[Envelope, GlobalModel]:
    """A signed global model from the coordinator of `fleet`, of at most the fleet's
    `max_params` parameters; a TernError otherwise."""
    env = open_model_envelope(data, fleet)
    return env, model_body(env, fleet)


def open_schedule_envelope(data: bytes, fleet: Fleet) -> Envelope:
    """The coordinator's signed envelope of a round schedule, its body not yet checked
    (`schedule_body`)."""
    return open_envelope(
        data,
        {COORDINATOR: fleet.coordinator_key},
        fleet=fleet.fleet,
        kinds=(Kind.SCHEDULE,),
        caps=schedule_caps(len(fleet.devices)),
    )


def schedule_body(env: Envelope) -> RoundSchedule:
    """The schedule in an envelope from `open_schedule_envelope`; its round and model
    must be its envelope's."""
    schedule = RoundSchedule.from_body(env.body)
    if (schedule.round, schedule.model_version) != (env.round, env.model_version):
        raise MalformedMessage("the schedule's round or model differs from its envelope's")
    return schedule


def open_schedule(data: bytes, fleet: Fleet) -> tuple[Envelope, RoundSchedule]:
    """A signed round schedule from the coordinator of `fleet`; a TernError otherwise."""
    env = open_schedule_envelope(data, fleet)
    return env, schedule_body(env)


# -- training kernels ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KernelFile:
    """A WebAssembly training kernel as the coordinator publishes it."""

    abi: int
    wasm: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.wasm).hexdigest()

    def to_body(self) -> dict[str, object]:
        return {"abi": self.abi, "sha256": bytes.fromhex(self.sha256), "wasm": self.wasm}

    @classmethod
    def from_body(cls, body: object) -> KernelFile:
        m = body_map(body, frozenset({"abi", "sha256", "wasm"}), "kernel")
        wasm = m["wasm"]
        if not isinstance(wasm, bytes) or not wasm:
            raise MalformedMessage("kernel wasm must be a non-empty byte string")
        if len(wasm) > MAX_KERNEL_BYTES:
            raise PayloadTooLarge(len(wasm), MAX_KERNEL_BYTES)
        kernel = cls(uint_field(m["abi"], "kernel.abi", 1), wasm)
        if digest_field(m["sha256"], "kernel.sha256") != kernel.sha256:
            raise DigestMismatch("kernel bytes do not hash to the sha256 they carry")
        return kernel


def seal_kernel(kernel: KernelFile, fleet: str, key: SigningKey, *, run: int = 0) -> bytes:
    """The coordinator's signed kernel message (round and model fields are 0: unbound)."""
    env = Envelope(Kind.KERNEL, fleet, 0, 0, COORDINATOR, kernel.to_body(), run=run)
    return seal(env, key)


def open_kernel(data: bytes, fleet: Fleet, sha256: str) -> KernelFile:
    """The signed kernel whose SHA-256 is `sha256`; Unsigned, BadSignature,
    DigestMismatch or another TernError otherwise."""
    if data[:4] == b"\0asm":
        raise Unsigned("a bare WebAssembly module, not a kernel signed by the coordinator")
    env = open_envelope(
        data,
        {COORDINATOR: fleet.coordinator_key},
        fleet=fleet.fleet,
        kinds=(Kind.KERNEL,),
        caps=KERNEL_CAPS,
    )
    kernel = KernelFile.from_body(env.body)
    if kernel.sha256 != sha256:
        raise DigestMismatch(f"kernel {kernel.sha256[:12]}… where {sha256[:12]}… was asked for")
    return kernel
