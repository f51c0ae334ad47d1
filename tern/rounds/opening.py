"""What the coordinator needs to open a round: its settings, the server's model, the
participants' sample and the schedule. Pure values and functions (no clock: the time
comes in as `now`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tern.aggregate import Partial
from tern.codecs import CodecName
from tern.fleet import Fleet
from tern.messages import Bounds, KernelFile, KernelRef, RoundSchedule, TrainConfig
from tern.policy import Policy
from tern.privacy.terms import DpTerms
from tern.rounds.uplink import partials_conflict
from tern.secagg.terms import SecAggTerms
from tern.spec import ModelSpec
from tern.strategies import ServerState, Strategy

__all__ = [
    "DEFAULT_SCALE_GAIN",
    "RoundSettings",
    "ServerModel",
    "next_scales",
    "sample_participants",
    "schedule_for",
]

# Secure aggregation's shared scales follow the model's last step: a tensor's trit is
# worth DEFAULT_SCALE_GAIN times the mean |step| of that tensor in the round before.
# Measured on the demo's task (MLP 40-100-100-10, MNIST-1D, 20 devices, Dirichlet 0.5,
# 50 rounds, 8 weight levels): gains of 8, 12, 16 and 24 reach 63.9, 64.8, 64.7 and
# 64.7 % against 65.9 % for plain ternary with error feedback; fixed scales of 0.005 to
# 0.08 reach 38.9 to 64.4 %. The scales are computed from the released model only.
DEFAULT_SCALE_GAIN = 12.0

F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class RoundSettings:
    """How the coordinator runs its rounds (coordinator.config.CoordinatorConfig has the
    checks and the documentation of each)."""

    codec: CodecName
    round_timeout: float
    min_contributors: int
    fraction: float = 1.0
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    kernel_fuel: int = 0
    kernel_memory: int = 0
    bounds: Bounds = field(default_factory=Bounds)
    policy: Policy = field(default_factory=Policy)
    rounds: int | None = None
    interval: float = 0.0
    # Secure aggregation in every cohort (its scales are the first round's; later rounds
    # follow the model, `next_scales`) and differential privacy, with its budget.
    secagg: SecAggTerms | None = None
    dp: DpTerms | None = None
    dp_epsilon: float | None = None  # the budget: no round opens that would pass it
    dp_delta: float = 1e-5
    scale_gain: float = DEFAULT_SCALE_GAIN
    # The codec gateways send their partials in (float32: the exact sum, the library's
    # default; tern.rounds.uplink) and the share of entries a sparse codec keeps (given
    # exactly when the devices' codec or the partials' is sparse).
    partials: CodecName = CodecName.FLOAT32
    density: float | None = None
    # How models go down (tern.downlink): deltas in this codec, with the coordinator's
    # error feedback; None: full models only (the library's default: exact).
    downlink: CodecName | None = None

    def __post_init__(self) -> None:
        codecs = (self.codec, self.partials, self.downlink)
        if (CodecName.SPARSE in codecs) != (self.density is not None):
            raise ValueError("a density is given exactly when a codec is sparse")
        conflict = partials_conflict(self.partials, self.dp)
        if conflict is not None:
            raise ValueError(conflict)

    def kernel_ref(self, kernel: KernelFile) -> KernelRef:
        return KernelRef(kernel.sha256, kernel.abi, self.kernel_fuel, self.kernel_memory)


@dataclass(frozen=True, slots=True)
class ServerModel:
    """The global model at `version` and the server strategy's state that came with it."""

    version: int
    weights: F32Array
    state: ServerState

    def step(self, strategy: Strategy, partial: Partial) -> ServerModel | None:
        """The next version after a round that folded `partial`; None when it would not
        be finite (such a model is never saved or published)."""
        weights, state = strategy.apply(self.weights, self.state, partial)
        finite = bool(np.isfinite(weights).all()) and all(
            bool(np.isfinite(b).all()) for b in state.buffers.values()
        )
        return ServerModel(self.version + 1, weights, state) if finite else None


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


def next_scales(
    spec: ModelSpec, step: F32Array, scales: tuple[float, ...], gain: float
) -> tuple[float, ...]:
    """The shared scales after a round whose model moved by `step`: `gain` times each
    tensor's mean |step|, or the old scale where the tensor did not move."""
    out: list[float] = []
    for t, o, old in zip(spec.tensors, spec.offsets, scales, strict=True):
        moved = float(np.abs(step[o : o + t.size], dtype=np.float64).mean()) if t.size else 0.0
        new = gain * moved
        out.append(new if math.isfinite(new) and new > 0 else old)
    return tuple(out)


def schedule_for(
    settings: RoundSettings,
    fleet: Fleet,
    r: int,
    version: int,
    now: float,
    kernel: KernelFile,
    secagg: SecAggTerms | None = None,
) -> RoundSchedule:
    """Round `r`'s schedule on model `version`, opened at `now`; its sample is drawn from
    ``default_rng([seed, r])``, so a round run again asks the same devices. `secagg`:
    this round's secure aggregation terms (the settings' with this round's scales)."""
    participants = sample_participants(
        fleet.devices, settings.fraction, np.random.default_rng([settings.seed, r])
    )
    return RoundSchedule(
        round=r,
        model_version=version,
        codec=settings.codec,
        deadline=now + settings.round_timeout,
        min_contributors=settings.min_contributors,
        participants=participants,
        seed=settings.seed,
        train=settings.train,
        kernel=settings.kernel_ref(kernel),
        bounds=settings.bounds,
        policy=settings.policy,
        secagg=secagg if secagg is not None else settings.secagg,
        dp=settings.dp,
        partials=settings.partials,
        density=settings.density
        if CodecName.SPARSE in (settings.codec, settings.partials)
        else None,
        downlink=settings.downlink,
    )
