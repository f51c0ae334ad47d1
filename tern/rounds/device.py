"""A Pi-class device's round logic as a pure state machine.

Events: the coordinator's model and schedule relayed by its gateway (`Received` on the
`down` link, its only link), the link coming up (`Linked`), and a training job done
(`Trained`). Actions: `Publish` (its update or failure, its status), `Train` (a job for
the process's worker: heavy, so never run inside the machine), `SaveMarks` (its
freshness high-water marks), `RoundDone` (what it did in a round) and `Note` (a log
line). The process (device.agent) carries them out.

Nothing is lost to a restart of its gateway or its gateway's broker: the device keeps
the sealed contribution of the round in progress, and sends the same bytes again each
time the round's schedule reaches it again before the deadline. A gateway republishes
its schedule after every reconnect to its broker, once it has subscribed again, so the
copy arrives when the gateway listens; a gateway takes identical bytes once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from tern import __version__, topics
from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.feed import CoordinatorFeed
from tern.fleet import Fleet
from tern.freshness import Order, Stamp, Watermarks
from tern.messages import Failure, GlobalModel, RoundSchedule, Update
from tern.reports import MAX_ERROR_CHARS, Activity, State, Status
from tern.rounds.cohorts import cohort_of
from tern.rounds.events import Link, Linked, Note, Publish, Received
from tern.rounds.follow import Adopted, ModelFollower
from tern.rounds.secagg_member import CohortMember

__all__ = [
    "DeviceMachine",
    "KernelRefused",
    "RoundDone",
    "RoundOutcome",
    "SaveMarks",
    "Train",
    "Trained",
]

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

_STATUS_EVERY = 60.0  # seconds between two status details about the same refusal


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    """What this device did in one round: sent an update, or why not (`error`)."""

    round: int
    model_version: int
    samples: int
    update_bytes: int = 0
    train_seconds: float = 0.0
    error: str = ""
    reason: str = ""  # the slug reported upstream in a failure message, when it failed
    kernel: str = ""  # SHA-256 of the Wasm kernel that trained, if one did


@dataclass(frozen=True, slots=True)
class Train:
    """Action: train `model` for `schedule`, starting from the error-feedback `residual`;
    `cohort`: how many devices share the device's cohort (their noise shares add up)."""

    run: int
    schedule: RoundSchedule
    model: GlobalModel
    residual: F32Array | None
    cohort: int = 1


@dataclass(frozen=True, slots=True)
class Trained:
    """Event: the job for (run, schedule) finished with an update (under secure
    aggregation: its integer contribution, `ints`), or failed (`reason`)."""

    run: int
    schedule: RoundSchedule
    update: Update | None = None
    ints: IntArray | None = None
    residual: F32Array | None = None
    seconds: float = 0.0
    kernel: str = ""
    reason: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class KernelRefused:
    """Event: a kernel from the gateway's broker was refused (counted, and reported)."""

    error: TernError


@dataclass(frozen=True, slots=True)
class SaveMarks:
    marks: Watermarks


@dataclass(frozen=True, slots=True)
class RoundDone:
    outcome: RoundOutcome


class DeviceMachine:
    """One device of `fleet` with `samples` local examples, signing with `key`.

    `join_current_round`: take part in a round already open when the device (re)starts,
    if its deadline is still ahead (default); False waits for the next schedule.
    """

    def __init__(
        self,
        device_id: str,
        fleet: Fleet,
        key: SigningKey,
        samples: int,
        *,
        marks: Watermarks | None = None,
        join_current_round: bool = True,
        randomness: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.id = device_id
        self.randomness = randomness  # its secure aggregation secrets
        self.member: CohortMember | None = None  # its part in its gateway's cohort
        self.fleet = fleet
        self.gateway = fleet.gateway_of(device_id)
        self.key = key
        self.samples = samples
        self.join_current_round = join_current_round
        self.feed = CoordinatorFeed(fleet, marks)
        self.follower = ModelFollower(self.feed, self.gateway, Link.DOWN)
        self.rejected: dict[str, int] = {}
        self.model: GlobalModel | None = None
        self.model_stamp: Stamp | None = None
        self._schedule: tuple[int, RoundSchedule] | None = None
        # (run, round, deadline) of the last schedule handled: a restarted coordinator
        # re-issues an open round under the same number with a later deadline, and that is new.
        self._last_round: tuple[int, int, float] = (-1, -1, 0.0)
        self._training = False
        self._residual: F32Array | None = None
        # The residual before the last round run, for running that round again.
        self._residual_before: tuple[int, F32Array | None] = (-1, None)
        self._sent: tuple[tuple[int, int, float], bytes] | None = None  # the open round's
        self._detail = ""
        self._activity = Activity.IDLE
        self._done_round: int | None = None  # the last round trained for (status)
        self._error: str | None = None  # why that round failed ("" once one succeeded)
        self._detail_at: dict[tuple[str, str], float] = {}

    # -- events -----------------------------------------------------------------------

    def handle(self, event: object, now: float) -> list[object]:
        if isinstance(event, Received):
            parsed = topics.parse_in(event.topic, self.fleet.fleet)
            kind = None if parsed is None else parsed.kind
            if kind is topics.TopicKind.GLOBAL_MODEL:
                return self._on_model(event.payload, now, full=True)
            if kind is topics.TopicKind.MODEL_DELTA:
                return self._on_model(event.payload, now, full=False)
            if kind is topics.TopicKind.ROUND_SCHEDULE:
                return self._on_schedule(event.payload, event.retained, now)
            if kind is topics.TopicKind.INBOX and self.member is not None:
                return self.member.on_inbox(event.payload)
            return []
        if isinstance(event, Trained):
            return self._on_trained(event, now)
        if isinstance(event, KernelRefused):
            return self._refused("kernel", event.error, now)
        if isinstance(event, Linked):
            return [self._status("")]
        return []

    def _refused(self, what: str, exc: TernError, now: float) -> list[object]:
        key = f"{what}_{exc.reason}"
        self.rejected[key] = self.rejected.get(key, 0) + 1
        note = Note(logging.WARNING, what, exc.reason, "%s: refused a %s (%s): %s",
                    (self.id, what, exc.reason, str(exc)))  # fmt: skip
        last = self._detail_at.get((what, exc.reason))
        if last is not None and now - last < _STATUS_EVERY:
            return [note]
        self._detail_at[(what, exc.reason)] = now  # what a dashboard sees, now and then
        return [note, self._status(f"refused a {what}: {exc.reason}")]

    def _on_model(self, data: bytes, now: float, *, full: bool) -> list[object]:
        """A full model or a delta (tern.rounds.follow): train once it gives the model the
        schedule names."""
        try:
            adopted = self.follower.on_full(data) if full else self.follower.on_delta(data)[1]
        except TernError as exc:
            return self._refused("model" if full else "delta", exc, now)
        return [*self._adopt(adopted), *self.follower.subscription(), *self._maybe_train(now)]

    def _adopt(self, adopted: list[Adopted]) -> list[object]:
        if not adopted:
            return []
        latest = self.follower.latest()
        assert latest is not None
        self.model_stamp, self.model = latest
        return [SaveMarks(self.feed.marks)]

    def _on_schedule(self, data: bytes, retained: bool, now: float) -> list[object]:
        try:
            taken = self.feed.take_schedule(data)
        except TernError as exc:
            return self._refused("schedule", exc, now)
        out: list[object] = []
        if taken.order is Order.NEWER:
            out.append(SaveMarks(self.feed.marks))
        run, schedule = taken.envelope.run, taken.value
        out += self._adopt(self.follower.on_schedule(run, schedule))
        out += self.follower.subscription()
        stamp = (run, schedule.round, schedule.deadline)
        if stamp <= self._last_round:
            # The schedule again: its gateway (re)subscribed. Resend what this device
            # sent for the round, in case it was lost with a broker or the gateway.
            if self.member is not None and self.member.stamp == stamp and now < schedule.deadline:
                return out + self.member.resend()
            if self._sent is not None and self._sent[0] == stamp and now < schedule.deadline:
                out.append(self._publish(self._sent[1]))
            return out
        if retained and not self.join_current_round:
            self._last_round = stamp  # joined mid-round: take part from the next schedule
            return [*out, self._skipped(schedule.round, "it was open before this device came")]
        self._schedule = (run, schedule)
        return out + self._maybe_train(now)

    def _maybe_train(self, now: float) -> list[object]:
        if self._schedule is None or self._training:
            return []
        run, s = self._schedule
        stamp = (run, s.round, s.deadline)
        if stamp <= self._last_round:
            return []
        if s.participants is not None and self.id not in s.participants:
            self._last_round = stamp
            return [self._skipped(s.round, "not sampled")]
        model = self.follower.model(Stamp(run, s.model_version))
        if model is None:
            return []  # wait for the model the schedule names
        self._last_round = stamp
        if now >= s.deadline:
            done = Trained(run, s, reason="late", error=f"round {s.round} is past its deadline")
            return self._on_failure(done, now)
        # A round run again (its first attempt was lost with a coordinator) starts from
        # the residual before that attempt: its contribution was never counted.
        rerun, before = self._residual_before
        carried = before if rerun == s.round else self._residual
        self._residual_before = (s.round, carried)
        self._training = True
        self._activity = Activity.TRAINING
        out = self._join_cohort(run, s)
        own = self.fleet.gateways[self.gateway].devices
        cohort = sum(1 for d in own if s.takes_part(d))
        return [*out, Train(run, s, model, carried, max(cohort, 1)),
                self._status(self._detail)]  # fmt: skip

    def _join_cohort(self, run: int, s: RoundSchedule) -> list[object]:
        """Under secure aggregation: advertise this device's keys to its gateway."""
        self.member = None
        if s.secagg is None or self.model is None:
            return []
        try:
            cohort = cohort_of(self.fleet, self.gateway, s, run, self.model.spec)
        except TernError as exc:
            return [self._skipped(s.round, f"no cohort: {exc}")]
        if cohort is None or self.id not in cohort.members:
            return []
        self.member = CohortMember(
            cohort, self.id, self.key, link=Link.DOWN,
            topic=topics.update(self.fleet.fleet, self.gateway, self.id),
            stamp=(run, s.round, s.deadline), randomness=self.randomness, refused=self.rejected,
        )  # fmt: skip
        return self.member.start()

    def _on_trained(self, done: Trained, now: float) -> list[object]:
        self._training = False
        if done.ints is not None:
            out = self._on_contribution(done, now)
        elif done.update is not None:
            out = self._on_update(done)
        else:
            out = self._on_failure(done, now)
        return out + self._maybe_train(now)  # a newer schedule may have come meanwhile

    def _on_contribution(self, done: Trained, now: float) -> list[object]:
        """Under secure aggregation: mask the contribution into the cohort."""
        assert done.ints is not None
        s = done.schedule
        member = self.member
        if member is None or member.stamp != (done.run, s.round, s.deadline):
            gone = replace(done, reason="secagg_no_cohort", error="its cohort is gone")
            return self._on_failure(gone, now)
        self._residual = done.residual
        out = member.contribute(done.ints)
        outcome = RoundOutcome(s.round, s.model_version, self.samples, member.masked_bytes,
                               done.seconds, kernel=done.kernel)  # fmt: skip
        self._activity, self._done_round, self._error = Activity.IDLE, s.round, ""
        return [*out, RoundDone(outcome), self._status("")]

    def _on_update(self, done: Trained) -> list[object]:
        assert done.update is not None
        s = done.schedule
        data = self._seal(Kind.UPDATE, done.run, s, done.update.to_body())
        self._sent = ((done.run, s.round, s.deadline), data)
        self._residual = done.residual
        outcome = RoundOutcome(
            s.round, s.model_version, self.samples, len(data), done.seconds, kernel=done.kernel
        )
        self._activity, self._done_round, self._error = Activity.IDLE, s.round, ""
        return [self._publish(data), RoundDone(outcome), self._status("")]

    def _on_failure(self, done: Trained, now: float) -> list[object]:
        s = done.schedule
        out: list[object] = []  # the process logs why, from RoundDone (broker.logs)
        if now < s.deadline:
            data = self._seal(Kind.FAILURE, done.run, s, Failure({done.reason: 1}).to_body())
            self._sent = ((done.run, s.round, s.deadline), data)
            out.append(self._publish(data))
        self._activity, self._done_round = Activity.IDLE, s.round
        self._error = f"{done.reason}: {done.error}"[:MAX_ERROR_CHARS]
        out.append(self._status(f"round {s.round}: {done.reason}: {done.error}"[:500]))
        outcome = RoundOutcome(
            s.round, s.model_version, self.samples, error=done.error, reason=done.reason
        )
        out.append(RoundDone(outcome))
        return out

    def _skipped(self, round: int, why: str) -> Note:
        return Note(logging.INFO, "", "skipped", "%s: round %d skipped: %s", (self.id, round, why))

    # -- messages ---------------------------------------------------------------------

    def _seal(self, kind: Kind, run: int, s: RoundSchedule, body: object) -> bytes:
        env = Envelope(kind, self.fleet.fleet, s.round, s.model_version, self.id, body, run=run)
        return seal(env, self.key)

    def _publish(self, data: bytes) -> Publish:
        return Publish(Link.DOWN, topics.update(self.fleet.fleet, self.gateway, self.id), data)

    def _status(self, detail: str) -> Publish:
        """Online, what it is doing, its last round and what went wrong last ("" once a
        round succeeds again)."""
        self._detail = detail
        status = Status(
            self.id, "device", State.ONLINE, __version__, detail,
            self._activity, self._done_round, self._error,
        )  # fmt: skip
        return Publish(
            Link.DOWN, topics.status(self.fleet.fleet, self.id), status.to_json(), retain=True
        )
