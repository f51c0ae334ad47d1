"""JSON payloads for people and dashboards: status, round metrics, telemetry.

These are plain UTF-8 JSON (not signed CBOR) so Grafana, Node-RED and a
microcontroller can read and write them without our libraries; nothing in them
changes a model. Schemas are in topics.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from tern.errors import MalformedMessage
from tern.jsontext import parse_json
from tern.topics import validate_id

__all__ = [
    "MAX_STATUS_BYTES",
    "MAX_TELEMETRY_BYTES",
    "RoundMetrics",
    "State",
    "Status",
    "Telemetry",
]

MAX_STATUS_BYTES = 4096  # an id, a role, a version and a detail of at most 500 characters, escaped
MAX_TELEMETRY_BYTES = 1024  # six short fields


class State(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


def _fields(value: Mapping[str, Any], required: set[str], optional: set[str], what: str) -> None:
    missing, extra = required - set(value), set(value) - required - optional
    if missing or extra:
        raise MalformedMessage(f"{what}: missing {sorted(missing)}, unknown {sorted(extra)}")


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class Status:
    """A component's presence; the ``offline`` form is also its MQTT last will."""

    id: str
    role: str  # coordinator | gateway | device | board | broker
    state: State
    version: str
    detail: str = ""

    def to_json(self) -> bytes:
        return _dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> Status:
        v = parse_json(data, "status", MAX_STATUS_BYTES)
        _fields(v, {"id", "role", "state", "version"}, {"detail"}, "status")
        try:
            return cls(
                validate_id(v["id"], "id"),
                str(v["role"]),
                State(v["state"]),
                str(v["version"]),
                str(v.get("detail", "")),
            )
        except ValueError as exc:
            raise MalformedMessage(f"status: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RoundMetrics:
    """One closed round, as its coordinator or gateway saw it."""

    component: str
    round: int
    model_version: int
    contributors: int
    dropped: int
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    bytes_up: int = 0
    bytes_down: int = 0
    accuracy: float | None = None
    loss: float | None = None
    round_seconds: float = 0.0
    failed: dict[str, int] = field(default_factory=dict)  # devices that reported why not

    def to_json(self) -> bytes:
        return _dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> RoundMetrics:
        v = parse_json(data, "metrics")
        names = set(cls.__dataclass_fields__)
        _fields(
            v,
            {"component", "round", "model_version", "contributors", "dropped"},
            names - {"component", "round", "model_version", "contributors", "dropped"},
            "metrics",
        )

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 0

        def is_num(x: object) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool)

        counts = ("round", "model_version", "contributors", "dropped", "bytes_up", "bytes_down")

        def is_tally(x: object) -> bool:
            return isinstance(x, dict) and all(is_int(c) for c in x.values())

        if (
            not isinstance(v["component"], str)
            or not all(is_int(v.get(k, 0)) for k in counts)
            or not (is_tally(v.get("rejected", {})) and is_tally(v.get("failed", {})))
            or not all(v.get(k) is None or is_num(v[k]) for k in ("accuracy", "loss"))
            or not is_num(v.get("round_seconds", 0.0))
        ):
            raise MalformedMessage("metrics: a field has the wrong type (see topics.md)")
        return cls(**v)


@dataclass(frozen=True, slots=True)
class Telemetry:
    """A microcontroller's prediction on one sensor window."""

    device: str
    model_version: int
    seq: int
    label: int
    confidence: float
    latency_us: int

    def to_json(self) -> bytes:
        return _dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> Telemetry:
        v = parse_json(data, "telemetry", MAX_TELEMETRY_BYTES)
        _fields(v, set(cls.__dataclass_fields__), set(), "telemetry")
        ints = ("model_version", "seq", "label", "latency_us")
        if not all(isinstance(v[k], int) and not isinstance(v[k], bool) for k in ints):
            raise MalformedMessage(f"telemetry: {', '.join(ints)} must be integers")
        if not isinstance(v["confidence"], int | float) or not 0 <= v["confidence"] <= 1:
            raise MalformedMessage("telemetry: confidence must be a number in [0, 1]")
        return cls(
            validate_id(v["device"], "device"),
            v["model_version"],
            v["seq"],
            v["label"],
            float(v["confidence"]),
            v["latency_us"],
        )
