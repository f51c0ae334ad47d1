"""What a round's differential privacy asks of its participants: signed in the schedule.

Field-by-field schema in topics.md ("schedule", `dp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from tern.errors import MalformedMessage
from tern.fields import body_map, number_field, real_field

__all__ = ["DpTerms", "Noise"]


class Noise(StrEnum):
    """Who adds the noise: the coordinator, to the fleet's sum (`central`), or every
    device, its share of discrete Gaussian noise before masking (`distributed`: each
    cohort's sum is then private against its own gateway; Kairouz et al. 2021)."""

    CENTRAL = "central"
    DISTRIBUTED = "distributed"


@dataclass(frozen=True, slots=True)
class DpTerms:
    """Differential privacy for one round.

    - `clip`: the L2 norm of what a device sends (its weighted contribution, residual
      and quantization included) is at most this;
    - `weight_cap`: samples at which a device's weight stops growing: a device weighs
      min(samples, cap) / cap of its clipped delta, and every device's update carries
      weight 1 (the mean divides by the number of contributors, a public figure);
    - `multiplier`: the noise's standard deviation on the whole sum is
      `multiplier * clip` (z, the noise multiplier);
    - `noise`: central or distributed.
    """

    clip: float
    multiplier: float
    noise: Noise = Noise.CENTRAL
    weight_cap: float = 1000.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise MalformedMessage("dp.clip must be finite and > 0")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 0):
            raise MalformedMessage("dp.multiplier must be finite and >= 0")
        if not (math.isfinite(self.weight_cap) and self.weight_cap >= 1):
            raise MalformedMessage("dp.weight_cap must be finite and at least 1 sample")
        if not isinstance(self.noise, Noise):
            raise MalformedMessage("dp.noise must be central or distributed")

    def share(self, samples: float) -> float:
        """The weight a device gives its delta: min(samples, cap) / cap, in (0, 1]."""
        return max(min(float(samples), self.weight_cap), 1.0) / self.weight_cap

    @property
    def sigma(self) -> float:
        """The noise's standard deviation on the whole sum of a cohort (distributed)
        or of the fleet (central)."""
        return self.multiplier * self.clip

    def to_cbor(self) -> dict[str, object]:
        return {
            "clip": float(self.clip),
            "multiplier": float(self.multiplier),
            "noise": str(self.noise),
            "weight_cap": float(self.weight_cap),
        }

    @classmethod
    def from_cbor(cls, value: object) -> DpTerms:
        m = body_map(value, frozenset({"clip", "multiplier", "noise", "weight_cap"}), "schedule.dp")
        noise = m["noise"]
        if noise not in ("central", "distributed"):
            raise MalformedMessage("schedule.dp.noise must be 'central' or 'distributed'")
        multiplier = real_field(m["multiplier"], "schedule.dp.multiplier")
        if multiplier < 0:
            raise MalformedMessage("schedule.dp.multiplier must be >= 0")
        return cls(
            clip=number_field(m["clip"], "schedule.dp.clip", positive=True),
            multiplier=multiplier,
            noise=Noise(noise),
            weight_cap=number_field(m["weight_cap"], "schedule.dp.weight_cap", positive=True),
        )
