"""The coordinator: opens rounds, collects the gateways' partials, folds, persists.

Threads: APScheduler's BackgroundScheduler runs round openings and deadlines;
MqttTransport's thread delivers partials. One lock guards the state; publishing
under it never waits for an acknowledgement (the transport thread may be waiting for
the same lock), and heavy work (fold, evaluate, persist) runs on scheduler threads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import SchedulerNotRunningError
from nacl.signing import SigningKey

from broker.errors import BrokerError
from broker.ratelog import LogLimiter
from broker.transport import Message, MqttTransport
from coordinator.config import CoordinatorConfig, CoordinatorError, RoundTimeout
from coordinator.store import RoundRecord, StateStore, StoreError
from coordinator.strategy import FedAvg, sample_participants
from kernels.reference import evaluate, init_weights, mlp_spec
from kernels.wasm import ABI_VERSION, KernelError, load_kernel, packaged_kernel
from tern import __version__, topics
from tern.admit import Terms, peers_of
from tern.collect import Collector
from tern.envelope import Envelope, Kind, seal
from tern.errors import TopicError
from tern.fleet import COORDINATOR, Fleet
from tern.messages import Bounds, GlobalModel, KernelFile, KernelRef, RoundSchedule, seal_kernel
from tern.reports import State, Status

__all__ = ["Coordinator", "TestSet"]

log = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class TestSet:
    """A held-out set the coordinator evaluates every new model on."""

    __test__ = False  # not a pytest class

    x: F32Array
    y: npt.NDArray[np.integer]


@dataclass(slots=True)
class _OpenRound:
    round: int
    schedule: RoundSchedule
    collector: Collector
    opened_at: float
    bytes_down: int
    expected_devices: int


class Coordinator:
    """One fleet's coordinator. `start()`, then `wait_for_round(n)` or `wait_finished()`,
    then `stop()`. `clock` (unix seconds) stamps deadlines and round times."""

    def __init__(
        self,
        config: CoordinatorConfig,
        fleet: Fleet,
        key: SigningKey,
        *,
        test_set: TestSet | None = None,
        kernel: bytes | None = None,
        clock: Callable[[], float] = time.time,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        """`kernel`: the WebAssembly training kernel devices run (default: the packaged
        kernels/mlp.wasm); `publish_kernel` switches to another while running."""
        if bytes(key.verify_key) != bytes(fleet.coordinator_key):
            raise CoordinatorError("the key does not match the fleet file's coordinator key")
        self.config = config
        self.fleet = fleet
        self.spec = mlp_spec(config.layers)
        self.strategy = FedAvg(config.server_lr, config.server_momentum)
        self.store = StateStore(config.state_dir)
        self._key = key
        self._test_set = test_set
        self._clock = clock
        self._on_round = on_round
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._finished = threading.Event()
        self._in_job = threading.local()
        self._stopping = False
        self._open: _OpenRound | None = None
        self._records: dict[int, RoundRecord] = {}
        self._last_open_at: float | None = None
        self._outside: Counter[str] = Counter()  # refused while no round was open
        self._logs = LogLimiter()
        self._kernel = self._checked_kernel(packaged_kernel() if kernel is None else kernel)
        self._kernel_published = False
        self.run = self.store.run(clock)

        snapshot = self.store.latest(self.spec.size)
        if snapshot is None:
            weights = init_weights(self.spec, np.random.default_rng(config.init_seed))
            momentum = np.zeros(self.spec.size, dtype=np.float32)
            self.store.save_model(0, weights, momentum)
            self._version, self._weights, self._momentum, self._next = 0, weights, momentum, 1
        else:
            self._version = snapshot.model_version
            self._weights, self._momentum = snapshot.weights, snapshot.momentum
            self._next = snapshot.last_round + 1
            log.info("resuming at round %d on model v%d", self._next, self._version)

        self._scheduler = BackgroundScheduler(timezone=UTC)
        status_topic = topics.status(fleet.fleet, config.client_id)
        login = config.login
        self._transport = MqttTransport(
            config.broker_url,
            config.client_id,
            will=(status_topic, self._status(State.OFFLINE, "connection lost")),
            login=None if login is None else (login.username, login.password),
        )

    # -- public -------------------------------------------------------------------------

    @property
    def model_version(self) -> int:
        with self._lock:
            return self._version

    @property
    def weights(self) -> F32Array:
        """A copy of the current global model."""
        with self._lock:
            return self._weights.copy()

    @property
    def next_round(self) -> int:
        """The round that is open, or the next one to open."""
        with self._lock:
            return self._open.round if self._open is not None else self._next

    @property
    def records(self) -> dict[int, RoundRecord]:
        """Rounds closed by this process, by number."""
        with self._lock:
            return dict(self._records)

    def start(self) -> Coordinator:
        """Connect, announce, and open the first round (unless `rounds` is already done)."""
        self._transport.subscribe(
            topics.partials_to(self.fleet.fleet, COORDINATOR), self._on_partial
        )
        try:
            self._transport.connect(self.config.connect_timeout)
        except BrokerError as exc:
            raise CoordinatorError(f"cannot reach {self.config.broker_url}: {exc}") from exc
        self._transport.publish(
            topics.status(self.fleet.fleet, self.config.client_id),
            self._status(State.ONLINE),
            retain=True,
        )
        self._scheduler.start()
        with self._lock:
            self._publish_kernel_locked()
            if self._done(self._next - 1):
                self._finished.set()
            else:
                self._schedule_open(self._clock())
        return self

    @property
    def kernel(self) -> KernelRef:
        """The kernel (and its budget) the next schedule names."""
        with self._lock:
            return self._kernel_ref(self._kernel)

    def publish_kernel(self, wasm: bytes) -> KernelRef:
        """Publish `wasm` (signed, retained) and name it in every schedule from the next
        round on: the fleet switches to it without restarting a device. CoordinatorError
        if it is not a loadable kernel of this host's ABI."""
        kernel = self._checked_kernel(wasm)
        with self._lock:
            self._kernel = kernel
            if self._transport.connected or self._kernel_published:
                self._publish_kernel_locked()
            return self._kernel_ref(kernel)

    @staticmethod
    def _checked_kernel(wasm: bytes) -> KernelFile:
        try:
            load_kernel(wasm)  # compiles, and checks it is a tern kernel with no imports
        except KernelError as exc:
            raise CoordinatorError(f"not a kernel this fleet can run: {exc}") from exc
        return KernelFile(ABI_VERSION, wasm)

    def _kernel_ref(self, kernel: KernelFile) -> KernelRef:
        cfg = self.config
        return KernelRef(kernel.sha256, kernel.abi, cfg.kernel_fuel, cfg.kernel_memory)

    def _publish_kernel_locked(self) -> None:
        data = seal_kernel(self._kernel, self.fleet.fleet, self._key, run=self.run)
        try:
            self._transport.publish(
                topics.kernel(self.fleet.fleet, self._kernel.sha256), data, retain=True
            )
            self._kernel_published = True
            log.info("kernel %s… published (%d bytes)", self._kernel.sha256[:12], len(data))
        except BrokerError as exc:
            log.warning("publishing kernel %s… failed: %s", self._kernel.sha256[:12], exc)

    def wait_for_round(self, round: int, timeout: float) -> RoundRecord:
        """The record of `round` once it closes here; RoundTimeout after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while round not in self._records:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RoundTimeout(round, timeout)
                self._changed.wait(remaining)
            return self._records[round]

    def wait_finished(self, timeout: float | None = None) -> bool:
        """True once the last configured round has closed."""
        return self._finished.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop scheduling, publish offline, disconnect. An open round is abandoned
        (not recorded), so a restarted coordinator runs it again."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        # from an on_round callback (a scheduler thread) waiting for jobs would wait for itself
        in_job = bool(getattr(self._in_job, "active", False))
        # Empty the job store first: it takes APScheduler's lock, so a job being
        # dispatched finishes dispatching, and shutdown() then has nothing in flight
        # (shutting down mid-dispatch makes APScheduler raise JobLookupError on its thread).
        self._scheduler.remove_all_jobs()
        with contextlib.suppress(SchedulerNotRunningError):
            self._scheduler.shutdown(wait=not in_job)
        with self._lock:
            if self._open is not None:
                log.info("stopping with round %d open; it re-runs on restart", self._open.round)
            self._open = None
        try:
            if self._transport.connected:
                self._transport.publish(
                    topics.status(self.fleet.fleet, self.config.client_id),
                    self._status(State.OFFLINE, "shutdown"),
                    retain=True,
                    wait=True,
                    timeout=timeout,
                )
        except BrokerError as exc:
            log.warning("could not publish the offline status: %s", exc)
        finally:
            self._transport.close(timeout)
            self._finished.set()

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- rounds -------------------------------------------------------------------------

    def _status(self, state: State, detail: str = "") -> bytes:
        return Status(self.config.client_id, "coordinator", state, __version__, detail).to_json()

    def _done(self, closed_round: int) -> bool:
        return self.config.rounds is not None and closed_round >= self.config.rounds

    def _add_job(self, func: Callable[..., None], when: datetime | None, *args: object) -> None:
        try:
            self._scheduler.add_job(func, "date", run_date=when, args=args, misfire_grace_time=None)
        except SchedulerNotRunningError:
            log.debug("scheduler stopped; %s not scheduled", func.__name__)

    def _schedule_open(self, now: float) -> None:
        delay = 0.0
        if self.config.interval > 0 and self._last_open_at is not None:
            delay = max(0.0, self._last_open_at + self.config.interval - now)
        when = datetime.now(UTC) + timedelta(seconds=delay) if delay else None
        self._add_job(self._open_round, when)

    def _open_round(self) -> None:
        with self._lock:
            if self._stopping or self._open is not None:
                return
            r, v = self._next, self._version
            now = self._clock()
            participants = sample_participants(
                self.fleet.devices,
                self.config.fraction,
                np.random.default_rng([self.config.seed, r]),
            )
            chosen = set(self.fleet.devices if participants is None else participants)
            schedule = RoundSchedule(
                round=r,
                model_version=v,
                codec=self.config.codec,
                deadline=now + self.config.round_timeout,
                min_contributors=self.config.min_contributors,
                participants=participants,
                seed=self.config.seed,
                train=self.config.train,
                kernel=self._kernel_ref(self._kernel),
                bounds=Bounds(self.config.max_weight, self.config.max_norm),
            )
            fleet = self.fleet.fleet
            sealed_model = self._sealed_model(r)
            sealed_schedule = seal(
                Envelope(Kind.SCHEDULE, fleet, r, v, COORDINATOR, schedule.to_body(), run=self.run),
                self._key,
            )
            collector = Collector(
                terms=Terms.of(fleet, self.run, schedule, self.spec),
                peers=peers_of(self.fleet, COORDINATOR, schedule),
            )
            expected = sorted(collector.expected)
            self._open = _OpenRound(
                r,
                schedule,
                collector,
                now,
                len(sealed_model) + len(sealed_schedule),
                len(chosen),
            )
            self._last_open_at = now
            try:
                self._transport.publish(topics.global_model(fleet), sealed_model, retain=True)
                self._transport.publish(topics.round_schedule(fleet), sealed_schedule, retain=True)
            except BrokerError as exc:  # queued QoS 1 rarely fails; the deadline still closes
                log.warning("round %d: publishing the model or schedule failed: %s", r, exc)
            log.info("round %d open on v%d, expecting %s", r, v, expected)
            if not expected:
                self._add_job(self._close_round, None, r)
            else:
                when = datetime.now(UTC) + timedelta(seconds=self.config.round_timeout)
                self._add_job(self._close_round, when, r)

    def _sealed_model(self, r: int) -> bytes:
        """The current model, signed, as of round `r` (caller holds the lock)."""
        body = GlobalModel(self.spec, self._weights).to_body()
        env = Envelope(
            Kind.MODEL, self.fleet.fleet, r, self._version, COORDINATOR, body, run=self.run
        )
        return seal(env, self._key)

    def _publish_model_locked(self, r: int) -> None:
        """Publish the current model, retained, as of round `r` (caller holds the lock)."""
        sealed = self._sealed_model(r)
        try:
            self._transport.publish(topics.global_model(self.fleet.fleet), sealed, retain=True)
        except BrokerError as exc:
            log.warning("round %d: publishing model v%d failed: %s", r, self._version, exc)

    def _on_partial(self, message: Message) -> None:
        try:
            sender = topics.parse(message.topic).sender
        except TopicError:
            return
        with self._lock:
            current = self._open
            if current is None or self._stopping:
                self._outside["no_open_round"] += 1
                self._logs.log(log, str(sender), "no_open_round",
                               "partial from %s with no round open: refused", sender)  # fmt: skip
                return
            offer = current.collector.offer(message.payload, message.topic, retained=message.retain)
            if offer.reason:
                self._logs.log(
                    log,
                    str(offer.sender),
                    offer.reason,
                    "round %d: rejected %s from %s: %s",
                    current.round,
                    offer.reason,
                    offer.sender,
                    offer.message,
                )
            if current.collector.complete:
                self._add_job(self._close_round, None, current.round)

    def _close_round(self, r: int) -> None:
        with self._lock:
            current = self._open
            if self._stopping or current is None or current.round != r:
                return  # already closed early, or a stale deadline job
            collector = current.collector
            partial = collector.close()
            ok = partial.count >= self.config.min_contributors and partial.total_weight > 0
            base = self._version
            if ok:
                weights, momentum = self.strategy.apply(self._weights, self._momentum, partial)
                try:
                    self.store.save_model(base + 1, weights, momentum)
                except StoreError as exc:  # a non-finite model is never saved or published
                    log.error("round %d: %s; the round fails on v%d", r, exc, base)
                    collector.rejected["non_finite_model"] += 1
                    ok = False
                else:
                    self._weights, self._momentum, self._version = weights, momentum, base + 1
            loss = accuracy = None
            if self._test_set is not None:
                loss, accuracy = evaluate(
                    self.spec, self._weights, self._test_set.x, self._test_set.y
                )
            record = RoundRecord(
                round=r,
                ok=ok,
                base_version=base,
                model_version=self._version,
                contributors=partial.count,
                dropped=max(0, current.expected_devices - partial.count),
                rejected=dict(sorted((collector.rejected + self._outside).items())),
                failed=dict(sorted(collector.failed.items())),
                bytes_up=collector.bytes_in,
                bytes_down=current.bytes_down,
                accuracy=accuracy,
                loss=loss,
                round_seconds=round(max(0.0, self._clock() - current.opened_at), 3),
                participants=current.schedule.participants,
                expected=tuple(sorted(collector.expected)),
                accepted=tuple(sorted(collector.accepted)),
                kernel=current.schedule.kernel.sha256 if current.schedule.kernel else "",
            )
            self.store.save_round(record)
            self._outside = Counter()
            self._open = None
            self._next = r + 1
            self._records[r] = record
            self._changed.notify_all()
            try:
                self._transport.publish(
                    topics.metrics(self.fleet.fleet, self.config.client_id),
                    record.metrics(self.config.client_id).to_json(),
                    retain=True,
                )
            except BrokerError as exc:
                log.warning("round %d: publishing metrics failed: %s", r, exc)
            log.info(
                "round %d %s: v%d, %d contributors, rejected %s",
                r,
                "closed" if ok else "failed",
                self._version,
                partial.count,
                record.rejected,
            )
            if ok and (self._done(r) or self.config.interval > 0):
                # The next round does not open right away (or ever): publish the new model
                # now, so gateways derive their boards' models and dashboards see it.
                self._publish_model_locked(r)
            if self._done(r):
                self._finished.set()
            else:
                self._schedule_open(self._clock())
        if self._on_round is not None:
            self._in_job.active = True
            try:
                self._on_round(record)
            except Exception:
                log.exception("on_round callback failed for round %d", r)
            finally:
                self._in_job.active = False
