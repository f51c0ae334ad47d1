"""What a round's secure aggregation asks of a cohort: signed in the schedule.

Field-by-field schema in topics.md ("schedule", `secagg`). The coordinator chooses
them; every gateway and device of the round follows them, so a cohort agrees on its
graph, its threshold, its ring and its stage times without talking about them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tern.errors import MalformedMessage
from tern.fields import body_map, number_field, uint_field
from tern.spec import MAX_TENSORS

__all__ = ["MAX_DEGREE", "MAX_WEIGHT_LEVELS", "SecAggTerms"]

MAX_WEIGHT_LEVELS = 255  # a device's weight is an integer 1..weight_levels
MAX_DEGREE = 4096  # neighbours of one member in the masking graph


@dataclass(frozen=True, slots=True)
class SecAggTerms:
    """Secure aggregation in every gateway cohort (Bonawitz et al. 2017; SecAgg+).

    - `threshold`: the fraction, in (0.5, 1], of a member's share holders (its
      neighbours and itself) whose shares rebuild its secrets; also each stage's
      minimum of survivors. Above one half, so a gateway that tells some members a
      device survived and others that it dropped cannot rebuild both of its secrets.
    - `degree`: neighbours of each member in the masking graph; 0 chooses it from the
      cohort's size (tern.secagg.graph: everyone in a small cohort).
    - `weight_levels`, `weight_cap`: a device's weight is an integer in
      1..weight_levels, its sample count over `weight_cap` scaled to the levels.
    - `scales`: one per tensor of the model's spec: a trit of that tensor is worth this.
    - `keys_s`, `shares_s`: how long the key and share stages stay open after the round
      opens at a gateway; `unmask_s`: how long before the cohort closes its masked
      inputs are due, leaving that long for unmasking.
    """

    scales: tuple[float, ...]
    threshold: float = 0.6
    degree: int = 0
    weight_levels: int = 8
    weight_cap: float = 1000.0
    keys_s: float = 1.0
    shares_s: float = 1.0
    unmask_s: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.scales, tuple) or not 1 <= len(self.scales) <= MAX_TENSORS:
            raise MalformedMessage(f"secagg.scales must hold 1 to {MAX_TENSORS} numbers")
        for s in self.scales:
            if not (isinstance(s, float) and math.isfinite(s) and s > 0):
                raise MalformedMessage("secagg.scales must be finite numbers > 0")
        if not (isinstance(self.threshold, float) and 0.5 < self.threshold <= 1.0):
            raise MalformedMessage("secagg.threshold must be in (0.5, 1]")
        if not 0 <= self.degree <= MAX_DEGREE:
            raise MalformedMessage(f"secagg.degree must be in [0, {MAX_DEGREE}]")
        if not 1 <= self.weight_levels <= MAX_WEIGHT_LEVELS:
            raise MalformedMessage(f"secagg.weight_levels must be in [1, {MAX_WEIGHT_LEVELS}]")
        for name in ("weight_cap", "keys_s", "shares_s", "unmask_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise MalformedMessage(f"secagg.{name} must be finite and > 0")
        if self.weight_cap < 1:
            raise MalformedMessage("secagg.weight_cap must be at least 1 sample")

    def level(self, samples: float) -> int:
        """A device's integer weight: its samples over the cap, on 1..weight_levels."""
        share = min(max(float(samples), 0.0), self.weight_cap) / self.weight_cap
        return max(1, min(self.weight_levels, round(share * self.weight_levels)))

    def to_cbor(self) -> dict[str, object]:
        return {
            "scales": [float(s) for s in self.scales],
            "threshold": float(self.threshold),
            "degree": self.degree,
            "weight_levels": self.weight_levels,
            "weight_cap": float(self.weight_cap),
            "keys_s": float(self.keys_s),
            "shares_s": float(self.shares_s),
            "unmask_s": float(self.unmask_s),
        }

    @classmethod
    def from_cbor(cls, value: object) -> SecAggTerms:
        keys = frozenset(
            {"scales", "threshold", "degree", "weight_levels", "weight_cap", "keys_s",
             "shares_s", "unmask_s"}
        )  # fmt: skip
        m = body_map(value, keys, "schedule.secagg")
        scales = m["scales"]
        if not isinstance(scales, list | tuple) or not 1 <= len(scales) <= MAX_TENSORS:
            raise MalformedMessage(f"schedule.secagg.scales must hold 1 to {MAX_TENSORS} numbers")
        return cls(
            scales=tuple(number_field(s, "schedule.secagg.scales", positive=True) for s in scales),
            threshold=number_field(m["threshold"], "schedule.secagg.threshold", positive=True),
            degree=uint_field(m["degree"], "schedule.secagg.degree"),
            weight_levels=uint_field(m["weight_levels"], "schedule.secagg.weight_levels", 1),
            weight_cap=number_field(m["weight_cap"], "schedule.secagg.weight_cap", positive=True),
            keys_s=number_field(m["keys_s"], "schedule.secagg.keys_s", positive=True),
            shares_s=number_field(m["shares_s"], "schedule.secagg.shares_s", positive=True),
            unmask_s=number_field(m["unmask_s"], "schedule.secagg.unmask_s", positive=True),
        )
