"""Every MQTT topic of a fleet, built and parsed here and nowhere else.

A fleet's namespace is ``tern/<fleet>/...``; the full contract is in topics.md.
The same names are used on every broker of the hierarchy: a gateway republishes the
coordinator's model on its own broker under the same topic, so a device does not
need to know how deep in the tree it sits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from tern.errors import TopicError, brief

__all__ = [
    "ROOT",
    "Topic",
    "TopicKind",
    "chunk",
    "chunks_of",
    "everything",
    "global_model",
    "inbox",
    "kernel",
    "kernels",
    "mcu_model",
    "mcu_models",
    "metrics",
    "model_delta",
    "parse",
    "parse_in",
    "partial",
    "partials_to",
    "round_schedule",
    "status",
    "status_all",
    "telemetry",
    "telemetry_all",
    "update",
    "updates_to",
    "validate_digest",
    "validate_id",
    "view",
    "view_all",
]

ROOT = "tern"

# Ids become single topic levels: no '/', no MQTT wildcards, nothing a shell or a
# file name would trip over.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A kernel's topic level is the SHA-256 of its bytes, as 64 lowercase hex digits.
_DIGEST = re.compile(r"[0-9a-f]{64}")


class TopicKind(StrEnum):
    GLOBAL_MODEL = "model"
    MODEL_DELTA = "delta"
    ROUND_SCHEDULE = "schedule"
    UPDATE = "update"
    PARTIAL = "partial"
    MCU_MODEL = "mcu"
    TELEMETRY = "telemetry"
    METRICS = "metrics"
    STATUS = "status"
    KERNEL = "kernel"
    VIEW = "view"
    INBOX = "inbox"
    CHUNK = "chunk"


# kind -> names of the id levels after "tern/<fleet>/<kind>"
_LEVELS: dict[TopicKind, tuple[str, ...]] = {
    TopicKind.GLOBAL_MODEL: (),
    TopicKind.MODEL_DELTA: (),
    TopicKind.ROUND_SCHEDULE: (),
    TopicKind.UPDATE: ("receiver", "sender"),
    TopicKind.PARTIAL: ("receiver", "sender"),
    TopicKind.MCU_MODEL: ("receiver",),
    TopicKind.TELEMETRY: ("sender",),
    TopicKind.METRICS: ("sender",),
    TopicKind.STATUS: ("sender",),
    TopicKind.KERNEL: ("digest",),
    TopicKind.VIEW: ("sender",),
    TopicKind.INBOX: ("receiver", "sender"),
    TopicKind.CHUNK: ("sender", "digest"),
}

_LEVEL_NAMES = ("receiver", "sender", "digest")


def validate_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a valid fleet or component id, else raise TopicError."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise TopicError(
            f"{what} {brief(value, 64)} is not valid: 1-64 characters of letters, digits,"
            " '_', '.', '-', starting with a letter or digit"
        )
    return value


def validate_digest(value: str) -> str:
    """Return `value` if it is a SHA-256 in lowercase hex, else raise TopicError."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise TopicError(
            f"kernel digest {brief(value, 64)} is not 64 lowercase hex digits (SHA-256)"
        )
    return value


@dataclass(frozen=True, slots=True)
class Topic:
    """One concrete topic, or a subscription filter when an id is ``None`` (``+``)."""

    kind: TopicKind
    fleet: str
    receiver: str | None = None
    sender: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet")
        levels = _LEVELS[self.kind]
        for name in _LEVEL_NAMES:
            value = getattr(self, name)
            if name not in levels:
                if value is not None:
                    raise TopicError(f"a {self.kind} topic has no {name}")
            elif value is not None:
                if name == "digest":
                    validate_digest(value)
                else:
                    validate_id(value, name)

    @property
    def is_filter(self) -> bool:
        return any(getattr(self, name) is None for name in _LEVELS[self.kind])

    @property
    def path(self) -> str:
        """The MQTT topic string (with ``+`` for the ids left open)."""
        parts = [ROOT, self.fleet, str(self.kind)]
        parts += [getattr(self, name) or "+" for name in _LEVELS[self.kind]]
        return "/".join(parts)

    def matches(self, topic: str | Topic) -> bool:
        """True when the concrete `topic` falls under this topic (or filter)."""
        try:
            other = topic if isinstance(topic, Topic) else parse(topic)
        except TopicError:
            return False
        if (other.kind, other.fleet) != (self.kind, self.fleet):
            return False
        return all(
            getattr(self, name) is None or getattr(self, name) == getattr(other, name)
            for name in _LEVELS[self.kind]
        )

    def __str__(self) -> str:
        return self.path


def parse_in(topic: str, fleet: str) -> Topic | None:
    """`topic` parsed, when it is a tern topic of `fleet`; None for anything else (a
    receiver ignores what it did not subscribe to, whatever the broker delivers)."""
    try:
        parsed = parse(topic)
    except TopicError:
        return None
    return parsed if parsed.fleet == fleet else None


def parse(topic: str) -> Topic:
    """Parse a concrete topic string into a Topic; raise TopicError when it is not ours."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != ROOT:
        raise TopicError(f"{brief(topic, 200)} is not a tern topic (tern/<fleet>/<kind>/...)")
    try:
        kind = TopicKind(parts[2])
    except ValueError:
        raise TopicError(f"{brief(topic, 200)}: unknown topic kind") from None
    levels = _LEVELS[kind]
    if len(parts) != 3 + len(levels):
        raise TopicError(f"{brief(topic, 200)}: a {kind} topic has {3 + len(levels)} levels")
    ids = dict(zip(levels, parts[3:], strict=True))
    if "+" in ids.values() or "#" in ids.values():
        raise TopicError(f"{brief(topic, 200)} is a filter, not a concrete topic")
    return Topic(kind, parts[1], **ids)


def _concrete(topic: Topic) -> Topic:
    """Builders of concrete topics refuse a missing id instead of making a filter."""
    if topic.is_filter:
        raise TopicError(f"{topic.path} needs every id; use the *_all / *_to filters to subscribe")
    return topic


def global_model(fleet: str) -> Topic:
    return Topic(TopicKind.GLOBAL_MODEL, fleet)


def model_delta(fleet: str) -> Topic:
    """The change from the previous model version to the current one (tern.downlink)."""
    return Topic(TopicKind.MODEL_DELTA, fleet)


def round_schedule(fleet: str) -> Topic:
    return Topic(TopicKind.ROUND_SCHEDULE, fleet)


def update(fleet: str, gateway: str, device: str) -> Topic:
    """Where `device` publishes its update for `gateway`."""
    return _concrete(Topic(TopicKind.UPDATE, fleet, receiver=gateway, sender=device))


def updates_to(fleet: str, gateway: str) -> Topic:
    """Filter for every device update addressed to `gateway`."""
    return Topic(TopicKind.UPDATE, fleet, receiver=gateway)


def partial(fleet: str, parent: str, gateway: str) -> Topic:
    """Where `gateway` publishes its partial aggregate for `parent`."""
    return _concrete(Topic(TopicKind.PARTIAL, fleet, receiver=parent, sender=gateway))


def partials_to(fleet: str, parent: str) -> Topic:
    """Filter for every partial aggregate addressed to `parent`."""
    return Topic(TopicKind.PARTIAL, fleet, receiver=parent)


def inbox(fleet: str, member: str | None, server: str) -> Topic:
    """Where the gateway `server` sends `member` (a device or a child gateway of its
    cohort) the secure aggregation messages addressed to it (topics.md "Secure
    aggregation"); a filter when `member` is None."""
    topic = Topic(TopicKind.INBOX, fleet, receiver=member, sender=server)
    return topic if member is None else _concrete(topic)


def mcu_model(fleet: str, device: str) -> Topic:
    return _concrete(Topic(TopicKind.MCU_MODEL, fleet, receiver=device))


def mcu_models(fleet: str) -> Topic:
    """Filter for every board's model (what a gateway publishes on its own broker)."""
    return Topic(TopicKind.MCU_MODEL, fleet)


def everything(fleet: str) -> str:
    """The filter for every topic of `fleet`, ``tern/<fleet>/#`` (what the observer may
    read). A plain string: a `Topic` names one kind of topic."""
    validate_id(fleet, "fleet")
    return f"{ROOT}/{fleet}/#"


def telemetry(fleet: str, device: str) -> Topic:
    return _concrete(Topic(TopicKind.TELEMETRY, fleet, sender=device))


def telemetry_all(fleet: str) -> Topic:
    return Topic(TopicKind.TELEMETRY, fleet)


def metrics(fleet: str, component: str) -> Topic:
    return _concrete(Topic(TopicKind.METRICS, fleet, sender=component))


def status(fleet: str, component: str) -> Topic:
    return _concrete(Topic(TopicKind.STATUS, fleet, sender=component))


def status_all(fleet: str) -> Topic:
    return Topic(TopicKind.STATUS, fleet)


def kernel(fleet: str, digest: str) -> Topic:
    """Where the coordinator publishes (retained) the signed kernel whose SHA-256 is `digest`."""
    return _concrete(Topic(TopicKind.KERNEL, fleet, digest=digest))


def chunk(fleet: str, sender: str, digest: str) -> Topic:
    """Where `sender` keeps (retained) one chunk of a message too large for its broker,
    named by the chunk's SHA-256 (tern.chunks)."""
    return _concrete(Topic(TopicKind.CHUNK, fleet, sender=sender, digest=digest))


def chunks_of(fleet: str, sender: str | None) -> Topic:
    """Filter for every chunk `sender` keeps (every sender's when None)."""
    return Topic(TopicKind.CHUNK, fleet, sender=sender)


def kernels(fleet: str) -> Topic:
    """Filter for every kernel of `fleet` (gateways relay them all downstream)."""
    return Topic(TopicKind.KERNEL, fleet)


def view(fleet: str, gateway: str) -> Topic:
    """Where `gateway`'s view of what is below it is published (retained), on its parent's
    broker; every gateway relays its child gateways' views up, so all reach the top."""
    return _concrete(Topic(TopicKind.VIEW, fleet, sender=gateway))


def view_all(fleet: str) -> Topic:
    """Filter for every gateway's view (what a dashboard subscribes to on the top broker)."""
    return Topic(TopicKind.VIEW, fleet)
