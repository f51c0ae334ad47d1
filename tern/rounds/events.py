"""What a round machine takes in (events) and gives out (actions): plain values.

A machine (tern.rounds.coordinator, .gateway, .device) never does I/O. Its process
feeds it events (a message arrived on a link, a timer fired, a link came up or went
down, a training job finished) with the time on an injected clock, and carries out
the actions it returns, in order (broker.loop.Loop). A log of events replays a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from tern.topics import Topic

__all__ = [
    "Action",
    "CancelTimer",
    "Event",
    "Link",
    "Linked",
    "Note",
    "Publish",
    "Received",
    "SetTimer",
    "Subscribe",
    "Timer",
    "Unlinked",
    "Unsubscribe",
]


class Link(StrEnum):
    """A machine's connections: `up` towards the coordinator, `down` to its subtree."""

    UP = "up"
    DOWN = "down"


# -- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    """A message arrived on `link`; `retained` as the broker flagged it."""

    link: Link
    topic: str  # as it arrived: parsing it is the machine's job (it may be hostile)
    payload: bytes
    retained: bool = False


@dataclass(frozen=True, slots=True)
class Timer:
    """The timer `key` (set by a SetTimer) is due."""

    key: str


@dataclass(frozen=True, slots=True)
class Linked:
    """`link` is connected, and its subscriptions are in place (first time or again)."""

    link: Link
    again: bool = False  # a reconnect: the broker may have lost everything retained


@dataclass(frozen=True, slots=True)
class Unlinked:
    link: Link


# A component's own events (a finished training job, a kernel switch) are its own
# frozen dataclasses, so an event or an action is any value a machine recognises.
Event = object


# -- actions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    link: Link
    topic: Topic
    payload: bytes
    retain: bool = False
    qos: int = 1


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Subscribe on `link` to `topic` (its messages arrive as `Received`), until an
    `Unsubscribe`: what a component asks of its broker only now and then (the full
    model, when it cannot follow the deltas)."""

    link: Link
    topic: Topic


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    link: Link
    topic: Topic


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Fire Timer(key) at `at` (the machine's clock); replaces a timer of the same key."""

    key: str
    at: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    key: str


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth a log line. The loop writes at most one a minute per (`key`,
    `reason`), so a flood of bad messages cannot flood the log; an empty `key` is never
    held back (a round opening or closing)."""

    level: int
    key: str
    reason: str
    text: str
    args: tuple[object, ...] = field(default=())


# Components add their own actions (persist a model, train, a round closed).
Action = object
