"""The coordinator's round logic as a pure state machine.

One link, `up` (the top broker). Events: `Received` (a gateway's partial or failure),
`Timer("open")`, `Timer("stage")`, `Linked`, `SwitchKernel`. Actions: `Publish`,
`SetTimer`/`CancelTimer`, `SaveModel` and `SaveRound` (the state directory; a round's
record is its commit point, written after its model), `RoundClosed`, `Finished` and
`Note`. The process (coordinator.service) carries them out, in order, on one loop.

The machine owns time through the `now` it is handed: rounds open back to back or on
an interval, each closes when every expected gateway has settled or at its deadline.
After every reconnect it restores what it keeps retained on the broker (kernel, model,
schedule, status, last metrics): a broker that restarted has lost them, and the new
schedule copy is what tells gateways to send their partials again.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from tern import __version__, topics
from tern.admit import Terms, peers_of
from tern.aggregators import aggregator_for
from tern.downlink import ModelDelta, model_hash
from tern.envelope import Envelope, Kind, seal
from tern.fleet import COORDINATOR, Fleet
from tern.messages import GlobalModel, KernelFile, seal_kernel
from tern.reports import State, Status
from tern.rounds.collecting import CollectingRound, offer_to
from tern.rounds.events import CancelTimer, Link, Linked, Note, Publish, Received, SetTimer, Timer
from tern.rounds.opening import RoundSettings, ServerModel, next_scales, schedule_for
from tern.rounds.publishing import next_model, seal_delta
from tern.rounds.record import RoundRecord
from tern.rounds.releasing import budget_spent, release
from tern.rounds.stages import Stage
from tern.spec import ModelSpec
from tern.strategies import Strategy

if TYPE_CHECKING:  # the ledger needs dp-accounting: the service builds it when DP is on
    from tern.privacy.ledger import PrivacyLedger

__all__ = [
    "Begin",
    "CoordinatorMachine",
    "Finished",
    "RoundClosed",
    "SaveModel",
    "SaveRound",
    "SwitchKernel",
]

F32Array = npt.NDArray[np.float32]
Evaluate = Callable[[F32Array], tuple[float, float]]  # weights -> (loss, accuracy)

OPEN_TIMER, STAGE_TIMER = "open", "stage"


@dataclass(frozen=True, slots=True)
class Begin:
    """Event: the process is connected; publish the kernel and open the first round."""


@dataclass(frozen=True, slots=True)
class SwitchKernel:
    """Event: name `kernel` in every schedule from the next round on, and publish it."""

    kernel: KernelFile


@dataclass(frozen=True, slots=True)
class SaveModel:
    model: ServerModel


@dataclass(frozen=True, slots=True)
class SaveRound:
    record: RoundRecord


@dataclass(frozen=True, slots=True)
class RoundClosed:
    record: RoundRecord


@dataclass(frozen=True, slots=True)
class Finished:
    """The last configured round has closed."""


class CoordinatorMachine:
    """The coordinator of `fleet` for run `run`, from `model` (resumed or initial) and the
    next round to run; `evaluate` scores every new model on a held-out set."""

    def __init__(
        self,
        fleet: Fleet,
        key: SigningKey,
        *,
        run: int,
        spec: ModelSpec,
        settings: RoundSettings,
        strategy: Strategy,
        model: ServerModel,
        next_round: int,
        kernel: KernelFile,
        client_id: str = COORDINATOR,
        evaluate: Evaluate | None = None,
        ledger: PrivacyLedger | None = None,
        noise_rng: np.random.Generator | None = None,
    ) -> None:
        self.fleet, self.key, self.run, self.spec = fleet, key, run, spec
        self.settings, self.strategy, self.evaluate = settings, strategy, evaluate
        self.client_id = client_id
        self.model = model
        self.next_round = next_round
        self.kernel = kernel
        self.round: CollectingRound | None = None
        self._expected_devices = 0
        self._bytes_down = 0
        self._last_open_at: float | None = None
        self._outside: Counter[str] = Counter()  # refused while no round was open
        self._retained: dict[topics.Topic, bytes] = {}
        self._delta: ModelDelta | None = None  # the delta that made the current model
        self._delta_version = -1  # the version whose delta is retained on the broker
        self.finished = False
        self.stopped = ""  # why it stopped opening rounds early (the privacy budget)
        # Differential privacy: what was spent (None without DP) and the generator of the
        # central noise (secret: the OS's entropy unless a test or benchmark seeds it).
        self.ledger = ledger
        self.noise_rng = noise_rng if noise_rng is not None else np.random.default_rng()
        sa = settings.secagg
        self.scales: tuple[float, ...] = ()
        if sa is not None:
            n = len(spec.tensors)
            self.scales = sa.scales if len(sa.scales) == n else (sa.scales[0],) * n

    # -- events -------------------------------------------------------------------------

    def start(self, now: float) -> list[object]:
        """Publish the kernel, then open the first round (or finish at once)."""
        return [self._publish_kernel(), *self._next(now)]

    def handle(self, event: object, now: float) -> list[object]:
        if isinstance(event, Received):
            return self._on_partial(event, now)
        if isinstance(event, Timer):
            if event.key == OPEN_TIMER:
                return self._open(now)
            if event.key == STAGE_TIMER:
                return self._close(now)
            return []
        if isinstance(event, Begin):
            return self.start(now)
        if isinstance(event, Linked):
            if not event.again:
                return [self._status()]
            # Reconnected: restore everything retained, in the order it was published.
            return [self._status(), *(Publish(Link.UP, t, d, retain=True)
                                      for t, d in self._retained.items())]  # fmt: skip
        if isinstance(event, SwitchKernel):
            self.kernel = event.kernel
            return [self._publish_kernel()]
        return []

    def _status(self) -> Publish:
        data = Status(self.client_id, "coordinator", State.ONLINE, __version__).to_json()
        return Publish(Link.UP, topics.status(self.fleet.fleet, self.client_id), data, retain=True)

    def _retain(self, topic: topics.Topic, data: bytes) -> Publish:
        self._retained.pop(topic, None)  # re-inserted last: restored in publishing order
        self._retained[topic] = data
        return Publish(Link.UP, topic, data, retain=True)

    def _publish_kernel(self) -> Publish:
        data = seal_kernel(self.kernel, self.fleet.fleet, self.key, run=self.run)
        kernels = [t for t in self._retained if t.kind is topics.TopicKind.KERNEL]
        for old in kernels[:-2]:
            del self._retained[old]
        return self._retain(topics.kernel(self.fleet.fleet, self.kernel.sha256), data)

    def _done(self, closed_round: int) -> bool:
        rounds = self.settings.rounds
        return rounds is not None and closed_round >= rounds

    def _next(self, now: float) -> list[object]:
        """After a round (or at start): finish, or open the next round now or later."""
        if self._done(self.next_round - 1):
            self.finished = True
            return [Finished()]
        spent = budget_spent(self.settings.dp, self.ledger)
        if spent:
            self.finished, self.stopped = True, spent
            status = Status(self.client_id, "coordinator", State.ONLINE, __version__, spent)
            topic = topics.status(self.fleet.fleet, self.client_id)
            return [Note(logging.WARNING, "", "privacy_budget", "%s", (spent,)),
                    Publish(Link.UP, topic, status.to_json(), retain=True), Finished()]  # fmt: skip
        interval = self.settings.interval
        if interval > 0 and self._last_open_at is not None:
            at = self._last_open_at + interval
            if at > now:
                return [SetTimer(OPEN_TIMER, at)]
        return self._open(now)

    # -- a round ------------------------------------------------------------------------

    def _publish_model(self, r: int) -> list[Publish]:
        """The current model as round `r` opens: its delta from the version before (when
        there is one), then the full model (for those who cannot follow)."""
        f, v = self.fleet.fleet, self.model.version
        body = GlobalModel(self.spec, self.model.weights).to_body()
        full = seal(Envelope(Kind.MODEL, f, r, v, COORDINATOR, body, run=self.run), self.key)
        out = [self._retain(topics.global_model(f), full)]
        delta, topic = self._delta, topics.model_delta(f)
        if delta is not None and self._delta_version != v:
            self._delta_version = v
            out.insert(0, self._retain(topic, seal_delta(delta, f, r, v, self.run, self.key)))
        return out

    def _open(self, now: float) -> list[object]:
        if self.round is not None or self.finished:
            return []
        r, v, f = self.next_round, self.model.version, self.fleet.fleet
        sa = self.settings.secagg
        this = None if sa is None else replace(sa, scales=self.scales)
        schedule = schedule_for(self.settings, self.fleet, r, v, now, self.kernel, this)
        schedule = replace(schedule, model_hash=model_hash(self.spec, self.model.weights))
        published = self._publish_model(r)
        env = Envelope(Kind.SCHEDULE, f, r, v, COORDINATOR, schedule.to_body(), run=self.run)
        sealed_schedule = seal(env, self.key)
        peers = peers_of(self.fleet, COORDINATOR, schedule)
        self.round = CollectingRound(
            run=self.run,
            schedule=schedule,
            terms=Terms.of(f, self.run, schedule, self.spec),
            peers=peers,
            stages=[Stage("collect", schedule.deadline, schedule.min_contributors)],
            opened_at=now,
            aggregator=aggregator_for(schedule.policy.top),
        )
        self.round.extra_rejected, self._outside = self._outside, Counter()
        chosen = self.fleet.devices if schedule.participants is None else schedule.participants
        self._expected_devices = len(set(chosen))
        self._bytes_down = sum(len(p.payload) for p in published) + len(sealed_schedule)
        self._last_open_at = now
        out: list[object] = [
            *published,
            self._retain(topics.round_schedule(f), sealed_schedule),
            Note(logging.DEBUG, "", "open", "round %d open on v%d, expecting %s",
                 (r, v, ", ".join(sorted(peers)) or "nobody")),
        ]  # fmt: skip
        if not peers:
            return out + self._close(now)
        return [*out, SetTimer(STAGE_TIMER, schedule.deadline)]

    def _on_partial(self, event: Received, now: float) -> list[object]:
        out = offer_to(self.round, self._outside, event, self.client_id)
        if self.round is not None and self.round.complete:
            out += self._close(now)
        return out

    def _close(self, now: float) -> list[object]:
        rnd, self.round = self.round, None
        if rnd is None:
            return []
        r, base = rnd.round, self.model.version
        partial = rnd.close()
        out: list[object] = [CancelTimer(STAGE_TIMER)]
        ok = rnd.stages.succeeded and partial.total_weight > 0
        multiplier = epsilon = None
        if ok:
            partial, multiplier = release(
                self.settings.dp, partial, self.fleet, rnd.schedule,
                rnd.collector.accepted, rnd.stands_for, self.noise_rng,
            )  # fmt: skip
            if multiplier is not None and self.ledger is not None:
                epsilon = self.ledger.record(multiplier)
            new, self._delta = next_model(self.model, self.strategy, partial)
            if new is None:  # a non-finite model is never saved or published
                rnd.extra_rejected["non_finite_model"] += 1
                out.append(Note(logging.ERROR, "", "non_finite",
                                "round %d: the new model is not finite; the round fails on v%d",
                                (r, base)))  # fmt: skip
                ok = False
            else:
                if self.scales:
                    step = new.weights - self.model.weights
                    self.scales = next_scales(
                        self.spec, step, self.scales, self.settings.scale_gain
                    )
                self.model = new
                out.append(SaveModel(new))
        loss = accuracy = None
        if self.evaluate is not None:
            loss, accuracy = self.evaluate(self.model.weights)
        collector = rnd.collector
        record = RoundRecord(
            round=r,
            ok=ok,
            base_version=base,
            model_version=self.model.version,
            contributors=partial.count,
            dropped=max(0, self._expected_devices - partial.count),
            rejected=dict(sorted(rnd.rejected.items())),
            failed=dict(sorted(collector.failed.items())),
            bytes_up=collector.bytes_in,
            bytes_down=self._bytes_down,
            accuracy=accuracy,
            loss=loss,
            round_seconds=round(max(0.0, now - rnd.opened_at), 3),
            participants=rnd.schedule.participants,
            expected=tuple(sorted(collector.expected)),
            accepted=tuple(sorted(collector.accepted)),
            kernel=rnd.schedule.kernel.sha256 if rnd.schedule.kernel else "",
            noise_multiplier=multiplier,
            epsilon=epsilon if epsilon is None or math.isfinite(epsilon) else None,
        )
        self.next_round = r + 1
        f = self.fleet.fleet
        metrics = record.metrics(self.client_id).to_json()
        out += [
            SaveRound(record),
            self._retain(topics.metrics(f, self.client_id), metrics),
        ]  # the process logs the round's line from RoundClosed (broker.logs)
        if ok and (self._done(r) or self.settings.interval > 0):
            # The next round does not open right away (or ever): publish the new model
            # now, so gateways derive their boards' models and dashboards see it.
            out += self._publish_model(r)
        # The next round opens before anyone is told this one closed: the fleet never
        # waits for what a listener does with the news. The last round is told first,
        # then finished.
        after = self._next(now)
        if self.finished:
            return [*out, RoundClosed(record), *after]
        return [*out, *after, RoundClosed(record)]
