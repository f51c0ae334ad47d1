"""Part a of bench.hostile: what refusing each attack class costs a gateway's receiver.

The receiver is the one a gateway runs: a `tern.collect.Collector` for contributions (a
fresh one per message, with the history the class needs: an update already accepted, the
attempt budget spent) and a `tern.feed.CoordinatorFeed` for models and schedules. Each
time is the median of `samples` messages, one message of each in turn, then the median of
`repeat` repeats, the garbage collector paused during each call; each class's ratio is
against accepting a valid message for the same receiver.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.hostile_classes import (
    ATTACKER,
    CHILD,
    FLEET,
    GATEWAY,
    RUN,
    AttackClass,
    Receiver,
    Scenario,
    flip_signature,
)
from bench.hostile_sparse import SparseRound
from tern import topics
from tern.admit import Terms, peers_of
from tern.aggregate import Accumulator
from tern.collect import MAX_ATTEMPTS, Collector
from tern.errors import TernError
from tern.feed import CoordinatorFeed
from tern.fleetview import ViewMachine
from tern.freshness import Stamp, Watermarks
from tern.reports import MAX_VIEW_MEMBERS
from tern.rounds.events import Link, Received

__all__ = ["measure_costs"]


def _timed(call: Callable[[], str]) -> tuple[int, str]:
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        reason = call()
        return time.perf_counter_ns() - t0, reason
    finally:
        gc.enable()


def _take(feed: CoordinatorFeed, kind: Receiver, data: bytes) -> str:
    try:
        if kind == "model":
            feed.take_model(data)
        else:
            feed.take_schedule(data)
    except TernError as exc:
        return exc.reason
    return ""


def _viewed(machine: ViewMachine, event: Received) -> str:
    """What the gateway's view does with `event`: "" when taken, else the reason."""
    machine.handle(event, 0.0)
    return "".join(machine.rejected).removeprefix("view_")


def measure_costs(scenario: Scenario, repeat: int, samples: int) -> dict[str, Any]:
    """Part a: µs per message for accepting each receiver's valid message and refusing each
    attack class, and the ratio; medians of `samples`, then of `repeat` repeats."""
    s = scenario
    terms = Terms.of(FLEET, RUN, s.schedule, s.spec)
    sparse = SparseRound(s)  # a round on the sparse codec: its own receiver and classes
    sparse_terms = Terms.of(FLEET, RUN, sparse.schedule, s.spec)
    peers = peers_of(s.fleet, GATEWAY, s.schedule)
    own = topics.update(FLEET, GATEWAY, ATTACKER).path
    marks = Watermarks(Stamp(RUN, s.round), Stamp(RUN, s.round, s.schedule.deadline))
    newer_schedule = s.make_schedule(s.round + 1, s.schedule.deadline + 60)
    valid = {
        "update": s.update(0),
        "model": s.model(s.round + 1),
        "schedule": s.schedule_message(newer_schedule),
        "status": s.status(0, detail="d" * 500, last_error="e" * 200),  # the largest valid
        "view": s.view(0, MAX_VIEW_MEMBERS),  # the largest valid view
        "sparse": sparse.update(0),
    }
    classes = s.classes() + sparse.classes()
    spent = [flip_signature(s.update(1000 + k)) for k in range(MAX_ATTEMPTS)]

    def collector(history: str, sparse_round: bool = False) -> Collector:
        c = Collector(terms=sparse_terms if sparse_round else terms, peers=peers)
        if history == "accepted":
            c.offer(valid["update"], own)
        elif history == "spent":
            for data in spent:
                c.offer(data, own)
        return c

    def offer_once(c: Collector, data: bytes, topic: str, retained: bool) -> Callable[[], str]:
        return lambda: c.offer(data, topic, retained=retained).reason

    def fold_too(c: Collector, offer: Callable[[], str]) -> Callable[[], str]:
        acc = Accumulator(s.spec.size)

        def accept() -> str:
            reason = offer()
            c.accepted[ATTACKER].add_to(acc)  # what close() will do with it
            return reason

        return accept

    def one(case: AttackClass | None, receiver: Receiver, data: bytes) -> tuple[int, str]:
        if receiver in ("update", "offer", "sparse"):
            sender = ATTACKER if case is None else case.topic
            topic = topics.update(FLEET, GATEWAY, sender).path
            c = collector("" if case is None else case.history, receiver == "sparse")
            offer = offer_once(c, data, topic, case is not None and case.retained)
            folds = case is None and receiver in ("update", "sparse")
            return _timed(fold_too(c, offer) if folds else offer)
        if receiver in ("status", "view"):
            sender = CHILD if receiver == "view" else ATTACKER if case is None else case.topic
            where = (topics.view if receiver == "view" else topics.status)(FLEET, sender)
            machine = ViewMachine(s.fleet, GATEWAY)
            event = Received(Link.DOWN, where.path, data)
            return _timed(lambda: _viewed(machine, event))
        feed = CoordinatorFeed(s.fleet, marks)
        return _timed(lambda: _take(feed, receiver, data))

    valid["offer"] = valid["update"]  # the same, accepted but not folded: shown, not a baseline
    accept: dict[str, list[float]] = {k: [] for k in valid}
    refuse: dict[str, list[float]] = {c.name: [] for c in classes}
    reasons: dict[str, str] = {}
    messages = {c.name: c.make(0) for c in classes}
    for _ in range(repeat):
        gc.collect()
        # one message of each in turn, so that a busy machine slows them all alike
        times: dict[str, list[int]] = {k: [] for k in [*accept, *refuse]}
        for _ in range(samples):
            for receiver, data in valid.items():
                ns, reason = one(None, receiver, data)
                if reason:
                    raise RuntimeError(f"a valid {receiver} was refused: {reason}")
                times[receiver].append(ns)
            for case in classes:
                ns, reasons[case.name] = one(case, case.receiver, messages[case.name])
                times[case.name].append(ns)
        for key, ns_list in times.items():
            (accept if key in accept else refuse)[key].append(statistics.median(ns_list) / 1e3)
    base = {k: statistics.median(v) for k, v in accept.items()}
    out: dict[str, Any] = {
        "accept_us": round(base["update"], 2),
        "accept_offer_us": round(base["offer"], 2),
        "accept_model_us": round(base["model"], 2),
        "accept_schedule_us": round(base["schedule"], 2),
        "accept_status_us": round(base["status"], 2),
        "accept_view_us": round(base["view"], 2),
        "accept_sparse_us": round(base["sparse"], 2),
        "update_bytes": len(valid["update"]),
        "model_bytes": len(valid["model"]),
        "classes": {},
    }
    for case in classes:
        us = statistics.median(refuse[case.name])
        out["classes"][case.name] = {
            "refuse_us": round(us, 2),
            "ratio": round(us / base[case.receiver], 3),
            "reason": reasons[case.name],
            "expected": case.reason,
            "baseline": case.receiver,
            "bytes": len(messages[case.name]),
        }
    return out
