"""A gateway's partials on their way up: in the schedule's `partials` codec, with the
gateway's own error feedback.

A lossy partial (ternary, sparse, float16) drops part of the cohort's sum; like a
device, the gateway keeps what it dropped, per unit of weight, and adds it to its next
round's sum before it quantizes (`tern.messages.encode_update`), so nothing is lost for
good. The residual belongs to one run and one model spec (a new run or a new spec starts
from none); a round the coordinator opens again under the same number starts from the
residual before its first attempt, whose partial was never counted; a resend of the same
round is the same sealed bytes (the gateway keeps them) and encodes nothing. A float32
partial is the exact sum and carries no residual.

The decoded partial must pass its receiver's norm bound (`tern.admit`: ‖sum‖ / weight
at most the schedule's `max_norm`, or what distributed noise adds). A mean of bounded
updates is bounded, and the ternary rule never raises a norm (Cauchy-Schwarz), but the
carried residual can: when the decoded norm would pass the bound, the target is scaled
to just under it and encoded again (as `tern.privacy.clip` does for a device), what the
scaling cut stays in the residual, and the residual is capped at the bound.

Under central differential privacy the coordinator's noise is calibrated to what one
device can move the fleet's sum by, its clip; a quantized partial can move by more than
that and carries a device's data into later rounds through the residual, so central
noise needs exact (float32) partials (`partials_conflict`). Distributed noise is already
in the cohort's sum the gateway encodes: its partial is a function of released sums.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from tern.admit import Terms
from tern.aggregate import Partial
from tern.codecs import Codec, CodecName, Float32Codec, codec_for
from tern.messages import RoundSchedule, Update, encode_update
from tern.privacy.clip import cap_residual
from tern.schedule import partials_conflict
from tern.spec import ModelSpec

__all__ = ["Uplink", "bounded_encode", "partials_conflict"]

F32Array = npt.NDArray[np.float32]

_MARGIN = 1.0 - 1e-4  # aim just under the bound: the receiver checks the same decoded norm
_SHRINK = 0.99
_MAX_TRIES = 50  # 0.99^50 ~ 0.6 below the first aim: then zeros, whose norm is 0


def _mean_norm(update: Update, spec: ModelSpec, density: float | None) -> float:
    """‖sum‖ / weight of what the receiver decodes, computed as `tern.admit` does."""
    return math.sqrt(update.check(spec, density=density).sq_norm()) / update.weight


def bounded_encode(
    codec: Codec,
    spec: ModelSpec,
    partial: Partial,
    residual: F32Array | None,
    bound: float,
    density: float | None = None,
) -> tuple[Update, F32Array]:
    """`encode_update` with error feedback, its decoded mean-delta norm kept within
    `bound`: (the update, the residual to carry)."""
    update, new_residual = encode_update(codec, spec, partial, residual)
    aim = bound * _MARGIN
    norm = _mean_norm(update, spec, density)
    if norm <= aim:
        return update, new_residual
    weight = np.float32(partial.total_weight)
    target = partial.weighted_sum
    if residual is not None:
        target = target + residual * weight
    factor = aim / norm
    for _ in range(_MAX_TRIES):
        scaled = (target * np.float32(factor)).astype(np.float32)
        update, _ = encode_update(codec, spec, Partial(scaled, partial.total_weight, partial.count))
        if _mean_norm(update, spec, density) <= aim:
            break
        factor *= _SHRINK
    else:
        zero = Partial(np.zeros_like(target), partial.total_weight, partial.count)
        update, _ = encode_update(codec, spec, zero)
    sent = update.check(spec, density=density).to_partial().weighted_sum
    return update, cap_residual((target - sent) / weight, bound)


class Uplink:
    """The error feedback of one gateway's partials (held by `GatewayMachine`)."""

    def __init__(self) -> None:
        self._owner: tuple[int, ModelSpec] | None = None  # the run and spec it carries for
        self._residual: F32Array | None = None
        # The residual before the last round encoded, for that round run again.
        self._before: tuple[int, F32Array | None] = (-1, None)

    @property
    def residual(self) -> F32Array | None:
        return self._residual

    def encode(self, run: int, s: RoundSchedule, terms: Terms, result: Partial) -> Update:
        """The partial of round `s` (run `run`, on `terms.spec`) for a fold `result` of at
        least one contributor, in the schedule's `partials` codec."""
        spec = terms.spec
        if self._owner != (run, spec):  # a new run or a new model: old feedback means nothing
            self._owner, self._residual, self._before = (run, spec), None, (-1, None)
        rerun, before = self._before
        carried = before if rerun == s.round else self._residual
        self._before = (s.round, carried)
        if s.partials is CodecName.FLOAT32:
            self._residual = None  # the exact sum: nothing dropped
            update, _ = encode_update(Float32Codec(), spec, result)
            return update
        codec = codec_for(s.partials, density=s.density)
        bound = terms.norm_bound(result.count)
        update, self._residual = bounded_encode(codec, spec, result, carried, bound, s.density)
        return update
