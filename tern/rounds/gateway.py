"""A gateway's round logic as a pure state machine.

Links: `up` (its parent's broker: the coordinator's model, schedule and kernels come in,
its partials, status and metrics go out) and `down` (its own broker: its devices and
child gateways). Events: `Received`, `Timer("stage")`, `Linked`. Actions: `Publish`,
`SetTimer`/`CancelTimer`, `SaveMarks`, `ModelTaken` (for its boards), `CohortClosed`
and `Note`. The process (gateway.service) carries them out on one loop.

Nothing is lost to a broker restart: after every reconnect the machine restores what
it keeps retained on that broker (downstream: model, schedule, kernels; upstream: its
status and last metrics). A device answers the schedule's new copy by sending its
contribution again; likewise, when the coordinator's schedule reaches the gateway again
before the deadline, it sends its partial for that round again. Identical bytes are
taken once.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from nacl.signing import SigningKey

from tern import __version__, topics
from tern.admit import Terms, peers_of
from tern.aggregators import aggregator_for
from tern.envelope import Kind
from tern.errors import TernError
from tern.feed import CoordinatorFeed
from tern.fleet import Fleet
from tern.freshness import Order, Stamp, Watermarks
from tern.messages import Failure, GlobalModel, RoundSchedule
from tern.reports import RoundMetrics, State, Status
from tern.rounds.collecting import CollectingRound, offer_to
from tern.rounds.device import SaveMarks
from tern.rounds.events import CancelTimer, Link, Linked, Note, Publish, Received, SetTimer, Timer
from tern.rounds.follow import ModelFollower
from tern.rounds.gateway_models import on_model, passed_down
from tern.rounds.gateway_parts import close_cohort, relay_kernel, send_up
from tern.rounds.gateway_secagg import join_parent, open_secagg, step_secagg
from tern.rounds.secagg_member import CohortMember
from tern.rounds.secagg_round import SecAggRound
from tern.rounds.stages import Stage
from tern.rounds.uplink import Uplink

__all__ = ["CohortClosed", "GatewayMachine", "ModelTaken"]

STAGE_TIMER = "stage"


@dataclass(frozen=True, slots=True)
class ModelTaken:
    """Action: a new global model was accepted (the gateway's boards derive theirs)."""

    run: int
    version: int
    model: GlobalModel


@dataclass(frozen=True, slots=True)
class CohortClosed:
    """Action: a round closed here; `partial` is what went upstream (b"" for nothing)."""

    metrics: RoundMetrics
    partial: bytes


class GatewayMachine:
    """Gateway `gateway_id` of `fleet` at `depth` (1 below the coordinator), signing with
    `key`; its rounds close `margin * depth` seconds before the coordinator's deadline.
    `refusals()` returns what its broker refused so far, `counted()` what the process
    refused itself, by full reason (both counted in its metrics)."""

    def __init__(
        self,
        gateway_id: str,
        fleet: Fleet,
        key: SigningKey,
        *,
        depth: int,
        margin: float,
        marks: Watermarks | None = None,
        refusals: Callable[[], Counter[str]] = Counter,
        counted: Callable[[], Counter[str]] = Counter,
        randomness: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.id = gateway_id
        self.randomness = randomness  # its secure aggregation secrets, as a member
        self.fleet = fleet
        self.key = key
        self.parent = fleet.gateways[gateway_id].parent
        self.depth = depth
        self.margin = margin
        self.feed = CoordinatorFeed(fleet, marks)
        self._refusals = refusals
        self._counted_by_process = counted  # refusals the process counts itself (view_...)
        self.follower = ModelFollower(self.feed, self.parent, Link.UP)  # the models it holds
        self._retained: dict[topics.Topic, bytes] = {}  # relayed down, restored on reconnect
        self._schedule_stamp: Stamp | None = None
        self._pending: tuple[int, RoundSchedule, bytes] | None = None
        self._last_opened: tuple[int, int, float] = (-1, -1, 0.0)
        self.round: CollectingRound | SecAggRound | None = None
        self.member: CohortMember | None = None  # its part in its parent's cohort
        self.inboxes: dict[str, bytes] = {}  # the last stage's messages to its members
        self._outside: Counter[str] = Counter()  # rejected while no round was open
        self._counted: Counter[str] = Counter()  # intake and broker refusals reported
        self._bytes_down = 0
        self._sent_up: tuple[tuple[int, int, float], topics.Topic, bytes] | None = None
        self.uplink = Uplink()  # its partials' error feedback
        self._metrics: bytes | None = None  # the last metrics, retained upstream

    # -- events -------------------------------------------------------------------------

    def handle(self, event: object, now: float) -> list[object]:
        if isinstance(event, Received):
            return self._on_message(event, now)
        if isinstance(event, Timer) and event.key == STAGE_TIMER:
            if isinstance(self.round, SecAggRound):
                return step_secagg(self, self.round, now)
            return self._close(now) if self.round is not None else []
        if isinstance(event, Linked):
            return self._restore(event.link, event.again)
        return []

    def _on_message(self, event: Received, now: float) -> list[object]:
        parsed = topics.parse_in(event.topic, self.fleet.fleet)
        kind = None if parsed is None else parsed.kind
        K = topics.TopicKind
        if event.link is Link.UP:
            if kind is K.GLOBAL_MODEL or kind is K.MODEL_DELTA:
                return on_model(self, event.payload, now, full=kind is K.GLOBAL_MODEL)
            if kind is K.ROUND_SCHEDULE:
                return self._on_schedule(event.payload, now)
            if kind is K.KERNEL and parsed is not None and parsed.digest is not None:
                return relay_kernel(self, parsed.digest, event.payload)
            if kind is K.INBOX and self.member is not None:
                return self.member.on_inbox(event.payload)
            return []
        return self._on_contribution(event, parsed, now)

    def _restore(self, link: Link, again: bool) -> list[object]:
        """A (re)connected link: put back what this gateway keeps retained on it."""
        if link is Link.DOWN:
            if not again:
                return []
            f = self.fleet.fleet
            kept: list[object] = [
                Publish(Link.DOWN, t, d, retain=True) for t, d in self._retained.items()
            ]
            inboxes = sorted(self.inboxes.items())  # the open stage's, for members that missed them
            return kept + [Publish(Link.DOWN, topics.inbox(f, m, self.id), d) for m, d in inboxes]
        out: list[object] = [self._status()]
        if self._metrics is not None:
            out.append(Publish(Link.UP, topics.metrics(self.fleet.fleet, self.id),
                               self._metrics, retain=True))  # fmt: skip
        return out

    def _status(self) -> Publish:
        status = Status(self.id, "gateway", State.ONLINE, __version__).to_json()
        return Publish(Link.UP, topics.status(self.fleet.fleet, self.id), status, retain=True)

    def _refused(self, what: str, exc: TernError) -> list[object]:
        return [Note(logging.WARNING, what, exc.reason, "gateway %s: refused a %s (%s): %s",
                     (self.id, what, exc.reason, str(exc)))]  # fmt: skip

    def _relay(self, topic: topics.Topic, data: bytes) -> Publish:
        self._retained[topic] = data
        self._bytes_down += len(data)
        return Publish(Link.DOWN, topic, data, retain=True)

    # -- upstream: model, schedule, kernels -----------------------------------------------

    def _on_schedule(self, data: bytes, now: float) -> list[object]:
        try:
            taken = self.feed.take_schedule(data)
        except TernError as exc:
            return self._refused("schedule", exc)
        stamp = self.feed.marks.schedule
        s = taken.value
        if taken.order is Order.SAME and stamp == self._schedule_stamp:
            # The coordinator published it again (it reconnected): resend this round's
            # partial, in case the broker lost it.
            sent = self._sent_up
            key = (taken.envelope.run, s.round, s.deadline)
            if self.member is not None and self.member.stamp == key and now < s.deadline:
                return self.member.resend()
            if sent is not None and sent[0] == key and now < s.deadline:
                return [Publish(Link.UP, sent[1], sent[2])]
            return []
        self._schedule_stamp = stamp
        out: list[object] = [SaveMarks(self.feed.marks)]
        self._pending = (taken.envelope.run, s, data)  # relayed once its model is here
        out += passed_down(self, self.follower.on_schedule(taken.envelope.run, s), None)
        return out + self._maybe_open(now)

    def _maybe_open(self, now: float) -> list[object]:
        """Open the pending schedule's round once its model is here."""
        if self._pending is None:
            return []
        run, s, data = self._pending
        if (run, s.round, s.deadline) <= self._last_opened:
            return []
        model = self.follower.model(Stamp(run, s.model_version))
        if model is None:
            return []  # the schedule overtook its model: open when the model arrives
        self._pending = None
        self._last_opened = (run, s.round, s.deadline)
        # Below, the schedule goes out only now: a device answering at once finds the round open.
        out: list[object] = [self._relay(topics.round_schedule(self.fleet.fleet), data)]
        if self.round is not None:
            out += self._close(now)  # superseded by a newer round
        peers = peers_of(self.fleet, self.id, s)
        close_at = s.deadline - self.margin * self.depth
        if not peers:
            return [*out, Note(logging.INFO, "", "no_participant",
                               "gateway %s: no participant below for round %d",
                               (self.id, s.round))]  # fmt: skip
        if now >= close_at:
            return [*out, Note(logging.WARNING, "", "late",
                               "gateway %s: round %d closed before it reached us",
                               (self.id, s.round))]  # fmt: skip
        if s.secagg is not None:
            return (
                out
                + open_secagg(self, run, s, model, peers, now)
                + join_parent(self, run, s, model.spec)
            )
        try:
            aggregator = aggregator_for(s.policy.cohort)
        except TernError as exc:
            return out + self._refuse_policy(run, s, sum(p.devices for p in peers.values()), exc)
        self.round = CollectingRound(
            run=run,
            schedule=s,
            terms=Terms.of(self.fleet.fleet, run, s, model.spec),
            peers=peers,
            stages=[Stage("collect", close_at, 1)],
            opened_at=now,
            aggregator=aggregator,
        )
        self.round.extra_rejected, self._outside = self._outside, Counter()
        out.append(SetTimer(STAGE_TIMER, close_at))
        out.append(Note(logging.DEBUG, "", "open", "gateway %s: round %d open, expecting %s",
                        (self.id, s.round, ", ".join(sorted(self.round.stands_for)))))  # fmt: skip
        return out

    def _refuse_policy(
        self, run: int, s: RoundSchedule, devices: int, exc: TernError
    ) -> list[object]:
        """A policy this gateway cannot run: the parent learns why, for every device below."""
        self.feed.rejected[f"schedule_{exc.reason}"] += 1
        sent, _ = send_up(self, run, s, Kind.FAILURE, Failure({exc.reason: devices}).to_body())
        return [*self._refused("schedule", exc), *sent]

    # -- downstream: contributions --------------------------------------------------------

    def _on_contribution(
        self, event: Received, parsed: topics.Topic | None, now: float
    ) -> list[object]:
        out = offer_to(self.round, self._outside, event, f"gateway {self.id}", parsed)
        if isinstance(self.round, SecAggRound):
            return out + (step_secagg(self, self.round, now) if self.round.complete else [])
        if self.round is not None and self.round.complete:
            out += self._close(now)
        return out

    def _close(self, now: float) -> list[object]:
        """Fold, send the partial and the metrics."""
        rnd, self.round = self.round, None
        if rnd is None:
            return []
        f, s = self.fleet.fleet, rnd.schedule
        out: list[object] = [CancelTimer(STAGE_TIMER)]
        self.inboxes = {}
        sent, data, count, failed, bytes_in = close_cohort(self, rnd)
        metrics = RoundMetrics(
            component=self.id,
            round=s.round,
            model_version=s.model_version,
            contributors=count,
            dropped=rnd.dropped,
            rejected=dict(rnd.rejected + self._new_refusals()),
            failed=failed,
            bytes_up=bytes_in,  # received from below (topics.md "Metrics")
            bytes_down=self._bytes_down,
            round_seconds=max(now - rnd.opened_at, 0.0),
        )
        self._bytes_down, self._metrics = 0, metrics.to_json()
        metrics_up = Publish(Link.UP, topics.metrics(f, self.id), self._metrics, retain=True)
        return [*out, *sent, metrics_up, CohortClosed(metrics, data)]  # the process logs it

    def _new_refusals(self) -> Counter[str]:
        """Refusals since the last metrics: the coordinator's messages refused
        (``model_<reason>``, ...) and what its broker refused, as ``access_<reason>``."""
        broker = Counter({f"access_{why}": n for why, n in self._refusals().items()})
        refused = self.feed.rejected + broker + self._counted_by_process()
        new = refused - self._counted
        self._counted = refused
        return new
