"""Freshness: is a signed model or schedule newer than the last one a receiver accepted?

Gateways, devices and boards keep a high-water mark per kind and ignore what is not
newer (topics.md "Freshness"). Models are ordered by (run, version), schedules by
(run, round, deadline): the run comes first, so a coordinator that starts a new run on
a fresh state directory (a higher run, versions from 0 again) is followed at once and
an old run's messages are never taken again; within a run the version (or the round)
orders, and a round that a restarted coordinator opens again under the same number
carries a later deadline. Every field is signed by the coordinator.

A message equal to the mark is the one already held (a retained copy after a
reconnect, a QoS 1 redelivery): not news, and not an attack either. One below the mark
is `stale`: a replay, or a leftover of an older run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum

from tern.envelope import Envelope
from tern.errors import MalformedMessage
from tern.jsontext import parse_json
from tern.messages import RoundSchedule

__all__ = ["Order", "Stamp", "Watermarks", "compare", "model_stamp", "schedule_stamp"]


class Order(StrEnum):
    NEWER = "newer"
    SAME = "same"
    OLDER = "older"


@dataclass(frozen=True, slots=True, order=True)
class Stamp:
    """Where a message stands: (run, version) for a model, (run, round, deadline) for a
    schedule (a model's deadline is 0)."""

    run: int
    version: int
    deadline: float = 0.0

    def to_json(self) -> list[float]:
        return [self.run, self.version, self.deadline]

    @classmethod
    def from_json(cls, value: object) -> Stamp:
        if not (isinstance(value, list) and len(value) == 3):
            raise MalformedMessage("a stamp is [run, version, deadline]")
        run, version, deadline = value
        ints = all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64 for v in value[:2]
        )
        number = isinstance(deadline, int | float) and not isinstance(deadline, bool)
        try:
            finite = number and math.isfinite(float(deadline))
        except OverflowError:  # an integer beyond any float
            finite = False
        if not (ints and finite):
            raise MalformedMessage("a stamp is two integers in [0, 2**64) and a finite number")
        return cls(run, version, float(deadline))


def model_stamp(env: Envelope) -> Stamp:
    return Stamp(env.run, env.model_version)


def schedule_stamp(env: Envelope, schedule: RoundSchedule) -> Stamp:
    return Stamp(env.run, schedule.round, schedule.deadline)


def compare(stamp: Stamp, mark: Stamp | None) -> Order:
    """How `stamp` stands against the high-water `mark` (None: nothing accepted yet)."""
    if mark is None or stamp > mark:
        return Order.NEWER
    return Order.SAME if stamp == mark else Order.OLDER


@dataclass(frozen=True, slots=True)
class Watermarks:
    """A receiver's high-water marks, as it keeps them across restarts."""

    model: Stamp | None = None
    schedule: Stamp | None = None

    def to_json(self) -> str:
        doc = {
            "model": None if self.model is None else self.model.to_json(),
            "schedule": None if self.schedule is None else self.schedule.to_json(),
        }
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Watermarks:
        doc = parse_json(text, "high-water marks")
        if set(doc) != {"model", "schedule"}:
            raise MalformedMessage("high-water marks are {model, schedule}")
        model, schedule = doc["model"], doc["schedule"]
        return cls(
            None if model is None else Stamp.from_json(model),
            None if schedule is None else Stamp.from_json(schedule),
        )
