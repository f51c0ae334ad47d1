"""The round schedule: what a round asks of its participants, signed by the coordinator.

Field-by-field schema in topics.md ("schedule"); `Bounds` are what one contribution may
claim in the round (topics.md "The trust boundary").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tern.codecs import CodecName
from tern.errors import MalformedMessage
from tern.fields import (
    body_map,
    codec_field,
    digest_field,
    number_field,
    uint64_field,
    uint_field,
)
from tern.policy import Policy
from tern.privacy.terms import DpTerms, Noise
from tern.secagg.terms import SecAggTerms

__all__ = [
    "DEFAULT_MAX_NORM",
    "DEFAULT_MAX_WEIGHT",
    "MIN_WEIGHT",
    "Bounds",
    "DpTerms",
    "KernelRef",
    "Noise",
    "Policy",
    "RoundSchedule",
    "SecAggTerms",
    "TrainConfig",
    "partials_conflict",
    "privacy_conflict",
]

MIN_WEIGHT = 1.0  # an update's weight counts training samples: at least one
# The schedule's defaults (coordinator flags --max-weight, --max-norm). The demo's devices
# hold 145-708 samples; their ternary updates have norms (per unit weight) of 2.9-6.6
# (measured over 30 rounds of the demo task), so 20 leaves honest updates 3x room while
# an update scaled by 100 is far outside it.
DEFAULT_MAX_WEIGHT = 10_000.0
DEFAULT_MAX_NORM = 20.0


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.5  # measured best for the shipped MLP on MNIST-1D (bench/compression.py)

    def to_cbor(self) -> dict[str, object]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}

    @classmethod
    def from_cbor(cls, value: object) -> TrainConfig:
        m = body_map(value, frozenset({"epochs", "batch_size", "lr"}), "train")
        return cls(
            uint_field(m["epochs"], "train.epochs", 1),
            uint_field(m["batch_size"], "train.batch_size", 1),
            number_field(m["lr"], "train.lr", positive=True),
        )


@dataclass(frozen=True, slots=True)
class KernelRef:
    """The training kernel a round runs, and the budget a device gives it."""

    sha256: str  # hex; the kernel's topic level
    abi: int
    fuel: int  # wasmtime fuel units for the whole local training of one round
    memory: int  # bytes of linear memory

    def to_cbor(self) -> dict[str, object]:
        return {
            "sha256": bytes.fromhex(self.sha256),
            "abi": self.abi,
            "fuel": self.fuel,
            "memory": self.memory,
        }

    @classmethod
    def from_cbor(cls, value: object) -> KernelRef:
        m = body_map(value, frozenset({"sha256", "abi", "fuel", "memory"}), "schedule.kernel")
        return cls(
            digest_field(m["sha256"], "schedule.kernel.sha256"),
            uint_field(m["abi"], "schedule.kernel.abi", 1),
            uint64_field(m["fuel"], "schedule.kernel.fuel", 1),
            uint64_field(m["memory"], "schedule.kernel.memory", 1),
        )


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one contribution may claim, signed in every schedule (topics.md "Bounds").

    `max_weight`: a device's update weighs at most this, unless the fleet file gives the
    device its own bound (a gateway's partial: at most the sum of its devices' bounds).
    `max_norm`: the L2 norm of an update's mean delta (its sum divided by its weight) is
    at most this, for a device's update and a gateway's partial alike.
    """

    max_weight: float = DEFAULT_MAX_WEIGHT
    max_norm: float = DEFAULT_MAX_NORM

    def __post_init__(self) -> None:
        for name in ("max_weight", "max_norm"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"bounds.{name} must be finite and > 0")
        if self.max_weight < MIN_WEIGHT:
            raise ValueError(f"bounds.max_weight must be at least {MIN_WEIGHT}")

    def to_cbor(self) -> dict[str, object]:
        return {"max_weight": float(self.max_weight), "max_norm": float(self.max_norm)}

    @classmethod
    def from_cbor(cls, value: object) -> Bounds:
        m = body_map(value, frozenset({"max_weight", "max_norm"}), "schedule.bounds")
        max_weight = number_field(m["max_weight"], "schedule.bounds.max_weight", positive=True)
        if max_weight < MIN_WEIGHT:
            raise MalformedMessage(f"schedule.bounds.max_weight must be at least {MIN_WEIGHT}")
        return cls(
            max_weight, number_field(m["max_norm"], "schedule.bounds.max_norm", positive=True)
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
    kernel: KernelRef | None = None  # None: devices train with what they shipped with
    bounds: Bounds = field(default_factory=Bounds)
    # How the round aggregates (tern.policy). Only a policy other than the default is
    # on the wire, so a default schedule's bytes, and its signature, are what they were
    # before policies existed.
    policy: Policy = field(default_factory=Policy)
    # Secure aggregation in every cohort, and differential privacy (tern.secagg.terms,
    # tern.privacy.terms): per-fleet options, on the wire only when set.
    secagg: SecAggTerms | None = None
    dp: DpTerms | None = None
    # Compression: the codec gateways send their partials in (float32, the exact sum, is
    # the default and then not on the wire), the share of entries a sparse codec keeps,
    # and the SHA-256 of the model version the round trains from (`tern.downlink`), which
    # every receiver checks the model it holds against.
    partials: CodecName = CodecName.FLOAT32
    density: float | None = None
    model_hash: bytes | None = None
    # The codec of the coordinator's deltas when it sends them (None: full models only,
    # which receivers then stay subscribed to: tern.rounds.follow).
    downlink: CodecName | None = None

    def __post_init__(self) -> None:
        sparse = CodecName.SPARSE in (self.codec, self.partials)
        if sparse != (self.density is not None):
            raise MalformedMessage("a schedule gives a density exactly when a codec is sparse")
        if self.density is not None and not 0 < self.density <= 1:
            raise MalformedMessage("schedule.density must be in (0, 1]")
        if self.model_hash is not None and len(self.model_hash) != 32:
            raise MalformedMessage("schedule.model_hash must be 32 bytes")

    def to_body(self) -> dict[str, object]:
        body: dict[str, object] = {
            "bounds": self.bounds.to_cbor(),
            "kernel": None if self.kernel is None else self.kernel.to_cbor(),
            "round": self.round,
            "model": self.model_version,
            "codec": str(self.codec),
            "deadline": self.deadline,
            "min_contributors": self.min_contributors,
            "participants": None if self.participants is None else list(self.participants),
            "seed": self.seed,
            "train": self.train.to_cbor(),
        }
        if self.policy != Policy():
            body["policy"] = self.policy.to_cbor()
        if self.secagg is not None:
            body["secagg"] = self.secagg.to_cbor()
        if self.dp is not None:
            body["dp"] = self.dp.to_cbor()
        if self.partials is not CodecName.FLOAT32:
            body["partials"] = str(self.partials)
        if self.density is not None:
            body["density"] = float(self.density)
        if self.model_hash is not None:
            body["model_hash"] = self.model_hash
        if self.downlink is not None:
            body["downlink"] = str(self.downlink)
        return body

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
                "kernel",
                "bounds",
            }
        )
        optional = frozenset(
            {"policy", "secagg", "dp", "partials", "density", "model_hash", "downlink"}
        )
        m = body_map(body, keys, "schedule", optional)
        policy = Policy()
        if "policy" in m:
            policy = Policy.from_cbor(m["policy"])
            if policy == Policy():  # one encoding per schedule: the default is left out
                raise MalformedMessage("a schedule names its policy only when not the default")
        participants = m["participants"]
        if participants is not None:
            if not isinstance(participants, list | tuple) or not all(
                isinstance(p, str) for p in participants
            ):
                raise MalformedMessage("schedule participants must be null or an array of ids")
            participants = tuple(participants)
            if len(set(participants)) != len(participants):
                raise MalformedMessage("schedule participants repeat an id")
        secagg = None if "secagg" not in m else SecAggTerms.from_cbor(m["secagg"])
        dp = None if "dp" not in m else DpTerms.from_cbor(m["dp"])
        partials = CodecName.FLOAT32
        if "partials" in m:
            partials = codec_field(m["partials"])
            if partials is CodecName.FLOAT32:  # one encoding per schedule
                raise MalformedMessage("a schedule names its partials' codec only if not float32")
        density = None
        if "density" in m:
            density = number_field(m["density"], "schedule.density", positive=True)
        model_hash = None
        if "model_hash" in m:
            model_hash = bytes.fromhex(digest_field(m["model_hash"], "schedule.model_hash"))
        return cls(
            round=uint_field(m["round"], "schedule.round"),
            model_version=uint_field(m["model"], "schedule.model"),
            codec=codec_field(m["codec"]),
            deadline=number_field(m["deadline"], "schedule.deadline"),
            min_contributors=uint_field(m["min_contributors"], "schedule.min_contributors"),
            participants=participants,
            seed=uint_field(m["seed"], "schedule.seed"),
            train=TrainConfig.from_cbor(m["train"]),
            kernel=None if m["kernel"] is None else KernelRef.from_cbor(m["kernel"]),
            bounds=Bounds.from_cbor(m["bounds"]),
            policy=policy,
            secagg=secagg,
            dp=dp,
            partials=partials,
            density=density,
            model_hash=model_hash,
            downlink=None if "downlink" not in m else codec_field(m["downlink"]),
        )

    def takes_part(self, device: str) -> bool:
        """Whether `device` is a participant of this round (every device when None)."""
        return self.participants is None or device in self.participants

    def privacy_conflict(self) -> str | None:
        """Why this schedule's privacy options cannot run together, or None."""
        return privacy_conflict(
            self.codec, self.policy, self.secagg, self.dp, partials=self.partials
        )


# Cohort aggregators that fold a sum, which is all a gateway sees under secure aggregation.
_SUMS = frozenset({"sum"})


def partials_conflict(partials: CodecName, dp: DpTerms | None) -> str | None:
    """Why gateways cannot send partials in `partials` under `dp` (a sentence), or None.

    Central noise is calibrated to what one device can move the fleet's sum by, its clip;
    a quantized partial can move by more, and carries a device's data into later rounds
    through the gateway's residual (tern.rounds.uplink)."""
    if dp is not None and dp.noise is Noise.CENTRAL and partials is not CodecName.FLOAT32:
        return (
            f"central noise is calibrated to what one device can move the sum by; a {partials} "
            "partial quantizes its cohort's sum (and carries it into later rounds), so it "
            "can move by more: use --partial-codec float32, or distributed noise"
        )
    return None


def privacy_conflict(
    codec: CodecName,
    policy: Policy,
    secagg: SecAggTerms | None,
    dp: DpTerms | None,
    *,
    partials: CodecName = CodecName.FLOAT32,
) -> str | None:
    """Why secure aggregation, differential privacy, the codecs and the policy cannot run
    together (a sentence, safe to log), or None when they can."""
    conflict = partials_conflict(partials, dp)
    if conflict is not None:
        return conflict
    if secagg is not None:
        if policy.cohort not in _SUMS:
            return (
                f"secure aggregation hides each device's update from its gateway, and the "
                f"cohort aggregator {policy.cohort!r} needs individual updates: use 'sum'"
            )
        if codec is not CodecName.TERNARY:
            return (
                f"secure aggregation masks trits under shared scales; the codec {codec} "
                "(sparse or float) cannot be masked in its ring: use 'ternary'"
            )
    elif dp is not None and dp.noise is Noise.DISTRIBUTED:
        return (
            "distributed noise needs secure aggregation: without it each gateway reads every "
            "device's update with only its share of the noise, and each device's own "
            "quantization keeps the shares from adding up to the noise the accountant "
            "counts; use secure aggregation, or central noise"
        )
    return None
