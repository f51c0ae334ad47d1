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

from tern.errors import MalformedMessage, TernError
from tern.jsontext import parse_json
from tern.topics import validate_id

__all__ = [
    "MAX_ERROR_CHARS",
    "MAX_STATUS_BYTES",
    "MAX_TELEMETRY_BYTES",
    "MAX_VIEW_BYTES",
    "MAX_VIEW_MEMBERS",
    "Activity",
    "FleetView",
    "MemberView",
    "Reading",
    "Role",
    "RoundMetrics",
    "State",
    "Status",
    "Telemetry",
    "ViewState",
]

MAX_STATUS_BYTES = 4096  # an id, a role, a version and a detail of at most 500 characters, escaped
MAX_TELEMETRY_BYTES = 1024  # six short fields
MAX_ERROR_CHARS = 200  # a status's last_error
MAX_VIEW_BYTES = 64 * 1024  # a gateway's view of what is below it
MAX_VIEW_MEMBERS = 256  # members listed in one view (the rest are counted in `omitted`)
_MAX_UINT = 2**53  # integers a JavaScript dashboard reads exactly


class State(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class Activity(StrEnum):
    """What a device is doing now (`Status.activity`)."""

    IDLE = "idle"
    TRAINING = "training"
    SENDING = "sending"


class ViewState(StrEnum):
    """A member's presence in a gateway's view: `unknown` until it has said anything."""

    ONLINE = "online"
    OFFLINE = "offline"
    UNKNOWN = "unknown"


class Role(StrEnum):
    """What a member of a gateway's view is."""

    DEVICE = "device"
    BOARD = "board"
    GATEWAY = "gateway"


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _MAX_UINT


STATUS_ROLES = frozenset({"coordinator", "gateway", "device", "board", "broker"})
MAX_VERSION_CHARS = 64
MAX_DETAIL_CHARS = 500
MAX_TALLY_REASONS = 256  # distinct refusal or failure reasons in one metrics payload
MAX_REASON_CHARS = 64


def _text(x: object, limit: int, what: str) -> str:
    if not isinstance(x, str) or len(x) > limit:
        raise MalformedMessage(f"{what} must be text of at most {limit} characters")
    return x


def _is_tally(x: object) -> bool:
    """{reason: count}: short text reasons, unsigned counts, a bounded number of them."""
    return (
        isinstance(x, dict)
        and len(x) <= MAX_TALLY_REASONS
        and all(isinstance(k, str) and 0 < len(k) <= MAX_REASON_CHARS for k in x)
        and all(_is_uint(c) for c in x.values())
    )


def _is_exact_int(x: object) -> bool:
    """An integer a JavaScript dashboard reads exactly (|x| <= 2**53), not a bool."""
    return isinstance(x, int) and not isinstance(x, bool) and abs(x) <= _MAX_UINT


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _error_text(x: object, what: str) -> str:
    if not isinstance(x, str) or len(x) > MAX_ERROR_CHARS:
        raise MalformedMessage(f"{what}: last_error must be text of at most {MAX_ERROR_CHARS}")
    return x


def _fields(value: Mapping[str, Any], required: set[str], optional: set[str], what: str) -> None:
    missing, extra = required - set(value), set(value) - required - optional
    if missing or extra:
        raise MalformedMessage(f"{what}: missing {sorted(missing)}, unknown {sorted(extra)}")


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class Status:
    """A component's presence; the ``offline`` form is also its MQTT last will.

    A device adds what it is doing (`activity`), the last round it sent something for
    (`last_round`) and why its last round failed (`last_error`, "" once one succeeds);
    each key is absent when unknown, so older payloads stay valid."""

    id: str
    role: str  # coordinator | gateway | device | board | broker
    state: State
    version: str
    detail: str = ""
    activity: Activity | None = None
    last_round: int | None = None
    last_error: str | None = None

    def to_json(self) -> bytes:
        return _dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_json(cls, data: bytes) -> Status:
        v = parse_json(data, "status", MAX_STATUS_BYTES)
        optional = {"detail", "activity", "last_round", "last_error"}
        _fields(v, {"id", "role", "state", "version"}, optional, "status")
        if "last_round" in v and not _is_uint(v["last_round"]):
            raise MalformedMessage("status: last_round must be an unsigned integer")
        if not isinstance(v["role"], str) or v["role"] not in STATUS_ROLES:
            raise MalformedMessage(f"status: role must be one of {sorted(STATUS_ROLES)}")
        try:
            return cls(
                validate_id(v["id"], "id"),
                v["role"],
                State(v["state"]),
                _text(v["version"], MAX_VERSION_CHARS, "status: version"),
                _text(v.get("detail", ""), MAX_DETAIL_CHARS, "status: detail"),
                None if "activity" not in v else Activity(v["activity"]),
                v.get("last_round"),
                None if "last_error" not in v else _error_text(v["last_error"], "status"),
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
    # Differential privacy: epsilon spent so far at the fleet's delta (coordinator only).
    epsilon: float | None = None

    def to_json(self) -> bytes:
        v = asdict(self)
        if self.epsilon is None:
            del v["epsilon"]  # a fleet without DP publishes what it did before
        return _dumps(v)

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

        counts = ("round", "model_version", "contributors", "dropped", "bytes_up", "bytes_down")
        accuracy, loss, epsilon = v.get("accuracy"), v.get("loss"), v.get("epsilon")
        if (
            not (epsilon is None or (_is_number(epsilon) and epsilon >= 0))
            or not isinstance(v["component"], str)
            or not all(_is_uint(v.get(k, 0)) for k in counts)
            or not (_is_tally(v.get("rejected", {})) and _is_tally(v.get("failed", {})))
            or not (accuracy is None or (_is_number(accuracy) and 0 <= accuracy <= 1))
            or not (loss is None or (_is_number(loss) and loss >= 0))
            or not (_is_number(v.get("round_seconds", 0.0)) and v.get("round_seconds", 0.0) >= 0)
        ):
            raise MalformedMessage("metrics: a field has the wrong type or range (see topics.md)")
        try:
            validate_id(v["component"], "component")
        except TernError as exc:
            raise MalformedMessage(f"metrics: {exc}") from exc
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
        r = Reading.checked(v, "telemetry")
        return cls(
            validate_id(v["device"], "device"),
            r.model_version,
            r.seq,
            r.label,
            r.confidence,
            r.latency_us,
        )


@dataclass(frozen=True, slots=True)
class Reading:
    """A board's last prediction, as a gateway's view summarises its telemetry."""

    label: int
    confidence: float
    latency_us: int
    model_version: int
    seq: int

    @classmethod
    def of(cls, t: Telemetry) -> Reading:
        return cls(t.label, t.confidence, t.latency_us, t.model_version, t.seq)

    @classmethod
    def checked(cls, v: Mapping[str, Any], what: str) -> Reading:
        """The reading in `v` (telemetry, or a view's summary of it), its fields checked:
        exact integers, a confidence in [0, 1]. `v`'s keys are the caller's to check."""
        ints = ("model_version", "seq", "label", "latency_us")
        if not all(_is_exact_int(v[k]) for k in ints):
            raise MalformedMessage(f"{what}: {', '.join(ints)} must be integers")
        c = v["confidence"]
        if not _is_number(c) or not 0 <= c <= 1:
            raise MalformedMessage(f"{what}: confidence must be a number in [0, 1]")
        return cls(v["label"], float(c), v["latency_us"], v["model_version"], v["seq"])


@dataclass(frozen=True, slots=True)
class MemberView:
    """One member (device, board or child gateway) as its gateway last heard of it."""

    role: Role
    state: ViewState = ViewState.UNKNOWN
    activity: Activity | None = None
    last_round: int | None = None
    last_error: str | None = None
    telemetry: Reading | None = None

    def to_dict(self, *, errors: bool = True, readings: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"role": str(self.role), "state": str(self.state)}
        if self.activity is not None:
            out["activity"] = str(self.activity)
        if self.last_round is not None:
            out["last_round"] = self.last_round
        if self.last_error is not None and errors:
            out["last_error"] = self.last_error
        if self.telemetry is not None and readings:
            out["telemetry"] = asdict(self.telemetry)
        return out

    @classmethod
    def from_dict(cls, v: object) -> MemberView:
        if not isinstance(v, dict):
            raise MalformedMessage("view: a member must be an object")
        optional = {"activity", "last_round", "last_error", "telemetry"}
        _fields(v, {"role", "state"}, optional, "view member")
        if "last_round" in v and not _is_uint(v["last_round"]):
            raise MalformedMessage("view: last_round must be an unsigned integer")
        reading = None
        if "telemetry" in v:
            t = v["telemetry"]
            if not isinstance(t, dict):
                raise MalformedMessage("view: telemetry must be an object")
            _fields(t, set(Reading.__dataclass_fields__), set(), "view telemetry")
            reading = Reading.checked(t, "view telemetry")
        try:
            return cls(
                Role(v["role"]),
                ViewState(v["state"]),
                None if "activity" not in v else Activity(v["activity"]),
                v.get("last_round"),
                None if "last_error" not in v else _error_text(v["last_error"], "view"),
                reading,
            )
        except ValueError as exc:
            raise MalformedMessage(f"view: {exc}") from exc


@dataclass(frozen=True, slots=True)
class FleetView:
    """A gateway's view of its own devices, boards and child gateways (topics.md "Fleet
    view"): retained on its parent's broker, relayed up unchanged to the top broker."""

    gateway: str
    parent: str
    at: float  # the gateway's clock, epoch seconds
    round: int | None  # the last round that closed at the gateway
    members: dict[str, MemberView] = field(default_factory=dict)
    omitted: int = 0  # members past MAX_VIEW_MEMBERS, not listed

    def to_json(self) -> bytes:
        """The view; when it would pass MAX_VIEW_BYTES, without errors, then readings."""
        listed = sorted(self.members)[:MAX_VIEW_MEMBERS]
        omitted = self.omitted + len(self.members) - len(listed)
        data = b""
        for errors, readings in ((True, True), (False, True), (False, False)):
            doc: dict[str, Any] = {
                "gateway": self.gateway,
                "parent": self.parent,
                "at": round(self.at, 3),
                "round": self.round,
                "members": {
                    m: self.members[m].to_dict(errors=errors, readings=readings) for m in listed
                },
            }
            if omitted:
                doc["omitted"] = omitted
            data = _dumps(doc)
            if len(data) <= MAX_VIEW_BYTES:
                break
        return data

    @classmethod
    def from_json(cls, data: bytes) -> FleetView:
        v = parse_json(data, "view", MAX_VIEW_BYTES)
        _fields(v, {"gateway", "parent", "at", "round", "members"}, {"omitted"}, "view")
        at, rnd, members = v["at"], v["round"], v["members"]
        if not isinstance(at, int | float) or isinstance(at, bool) or not 0 <= at < 1e11:
            raise MalformedMessage("view: at must be epoch seconds")
        if not (rnd is None or _is_uint(rnd)) or not _is_uint(v.get("omitted", 0)):
            raise MalformedMessage("view: round and omitted must be unsigned integers")
        if not isinstance(members, dict) or len(members) > MAX_VIEW_MEMBERS:
            raise MalformedMessage(f"view: members must be an object of <= {MAX_VIEW_MEMBERS}")
        return cls(
            validate_id(v["gateway"], "gateway"),
            validate_id(v["parent"], "parent"),
            float(at),
            rnd,
            {validate_id(m, "member"): MemberView.from_dict(e) for m, e in members.items()},
            v.get("omitted", 0),
        )
