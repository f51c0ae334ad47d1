"""What a gateway or a device takes from its coordinator: models and schedules, each
newer than the last (tern.freshness), and what it refuses, counted by reason.

Pure: the component hands over the bytes that arrived, persists `marks` when
`take_*` says they moved, and acts on what was accepted. Every refusal is a TernError
with a reason; `rejected` counts them as ``model_<reason>`` and ``schedule_<reason>``
(``model_stale`` for a replayed or old-run model, ``schedule_bad_signature``, ...).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Generic, TypeVar

from tern.envelope import Envelope
from tern.errors import TernError, UnexpectedMessage
from tern.fleet import Fleet
from tern.freshness import Order, Watermarks, compare, model_stamp, schedule_stamp
from tern.messages import (
    GlobalModel,
    RoundSchedule,
    model_body,
    open_model_envelope,
    open_schedule_envelope,
    schedule_body,
)

__all__ = ["CoordinatorFeed", "Taken"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Taken(Generic[T]):
    """An accepted message: `order` is NEWER (the marks moved) or SAME (already held)."""

    order: Order
    envelope: Envelope
    value: T


class CoordinatorFeed:
    """The coordinator's models and schedules as one receiver of `fleet` accepts them."""

    def __init__(self, fleet: Fleet, marks: Watermarks | None = None) -> None:
        self.fleet = fleet
        self.marks = marks if marks is not None else Watermarks()
        self.rejected: Counter[str] = Counter()

    def take_model(self, data: bytes) -> Taken[GlobalModel]:
        """Open a model; UnexpectedMessage ``stale`` when it is older than the mark.

        The order is checked on the signed envelope, before the weights are decoded: a
        replayed model costs its receiver less than a new one."""
        try:
            env = open_model_envelope(data, self.fleet)
            order = compare(model_stamp(env), self.marks.model)
            if order is Order.OLDER:
                raise UnexpectedMessage(
                    f"model v{env.model_version} of run {env.run} is older than the last", "stale"
                )
            model = model_body(env, self.fleet)
        except TernError as exc:
            self.rejected[f"model_{exc.reason}"] += 1
            raise
        if order is Order.NEWER:
            self.marks = Watermarks(model_stamp(env), self.marks.schedule)
        return Taken(order, env, model)

    def take_schedule(self, data: bytes) -> Taken[RoundSchedule]:
        """Open a schedule; UnexpectedMessage ``stale`` when it is older than the mark."""
        try:
            env = open_schedule_envelope(data, self.fleet)
            mark = self.marks.schedule
            if mark is not None and (env.run, env.round) < (mark.run, mark.version):
                # older by its signed envelope alone: no need to decode its body
                raise UnexpectedMessage(
                    f"schedule of round {env.round} (run {env.run}) is older than the last",
                    "stale",
                )
            schedule = schedule_body(env)
            stamp = schedule_stamp(env, schedule)
            order = compare(stamp, self.marks.schedule)
            if order is Order.OLDER:
                raise UnexpectedMessage(
                    f"schedule of round {schedule.round} (run {env.run}) is older than the last",
                    "stale",
                )
        except TernError as exc:
            self.rejected[f"schedule_{exc.reason}"] += 1
            raise
        if order is Order.NEWER:
            self.marks = Watermarks(self.marks.model, stamp)
        return Taken(order, env, schedule)
