"""The record of one closed round at the coordinator: what the store keeps and the
metrics report. A value; `from_json` raises ValueError on anything unexpected."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tern.reports import RoundMetrics

__all__ = ["RoundRecord"]


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One closed round. `model_version` is the version the round ended with."""

    round: int
    ok: bool
    base_version: int
    model_version: int
    contributors: int
    dropped: int
    rejected: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)  # devices' reported failures
    bytes_up: int = 0
    bytes_down: int = 0
    accuracy: float | None = None
    loss: float | None = None
    round_seconds: float = 0.0
    participants: tuple[str, ...] | None = None
    expected: tuple[str, ...] = ()
    accepted: tuple[str, ...] = ()
    kernel: str = ""  # SHA-256 of the training kernel the round's schedule named
    # Differential privacy: the noise multiplier of the noise the round's release had
    # (the survivors' shares only), and epsilon at the configured delta after it.
    noise_multiplier: float | None = None
    epsilon: float | None = None

    def metrics(self, component: str) -> RoundMetrics:
        return RoundMetrics(
            component=component,
            round=self.round,
            model_version=self.model_version,
            contributors=self.contributors,
            dropped=self.dropped,
            rejected=dict(self.rejected),
            failed=dict(self.failed),
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            accuracy=self.accuracy,
            loss=self.loss,
            round_seconds=self.round_seconds,
            epsilon=self.epsilon,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> RoundRecord:
        try:
            v: dict[str, Any] = json.loads(text)
            participants = v.pop("participants")
            return cls(
                **{k: v[k] for k in v if k not in ("expected", "accepted")},
                participants=None if participants is None else tuple(participants),
                expected=tuple(v["expected"]),
                accepted=tuple(v["accepted"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"round record is not valid: {exc!r}") from exc
