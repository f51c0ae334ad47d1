"""The Pi-class device agent: receive model and schedule, train locally, send an update.

MQTT handlers run on paho's thread and only record what arrived; training, encoding
and publishing happen on the agent's own worker thread, so a long local epoch never
stalls the network loop. The error-feedback residual lives as long as the agent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from broker.errors import TransportError
from broker.marks import MarkFile, MarksError
from broker.ratelog import LogLimiter
from broker.transport import Message, MqttTransport
from device.errors import DeviceError, LateRound
from device.kernels import KernelShelf
from device.trainer import Trainer
from kernels.wasm import (
    AbiMismatch,
    FuelExhausted,
    KernelError,
    KernelTrap,
    MemoryLimitExceeded,
    WasmTrainer,
)
from tern import __version__, topics
from tern.aggregate import Partial
from tern.codecs import codec_for
from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.feed import CoordinatorFeed
from tern.fleet import Fleet, client_id
from tern.freshness import Order, Stamp, model_stamp
from tern.logins import Login
from tern.messages import Failure, GlobalModel, RoundSchedule, Update, encode_update
from tern.reports import State, Status

__all__ = [
    "DeviceAgent",
    "DeviceError",
    "RoundOutcome",
    "failure_reason",
    "local_update",
    "training_rng",
]

log = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.integer]


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


# KernelError subclasses -> the reason a device reports for a round it could not train
_KERNEL_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (FuelExhausted, "kernel_fuel"),
    (MemoryLimitExceeded, "kernel_memory"),
    (AbiMismatch, "kernel_abi"),
    (KernelTrap, "kernel_trap"),
    (KernelError, "kernel_error"),
)


def failure_reason(exc: Exception) -> str:
    """The slug a device reports upstream for a round that failed with `exc`."""
    if isinstance(exc, DeviceError):
        return exc.reason
    for kind, reason in _KERNEL_REASONS:
        if isinstance(exc, kind):
            return reason
    return "train_error"


def training_rng(seed: int, device: str) -> np.random.Generator:
    """The generator a device trains with in a round (docs/rounds.md, Determinism)."""
    return np.random.default_rng([seed, zlib.crc32(device.encode())])


def local_update(
    trainer: Trainer,
    model: GlobalModel,
    x: F32Array,
    y: IntArray,
    schedule: RoundSchedule,
    device: str,
    residual: F32Array | None,
) -> tuple[Update, F32Array]:
    """Train on (x, y) and encode the weighted delta; returns (update, next residual)."""
    rng = training_rng(schedule.seed, device)
    new = trainer.train(model.spec, model.weights, x, y, schedule.train, rng)
    w = np.float32(x.shape[0])
    delta = (new - model.weights).astype(np.float32)
    partial = Partial((delta * w).astype(np.float32), float(x.shape[0]), 1)
    if residual is not None and residual.shape != delta.shape:
        residual = None  # a new model shape: old error feedback means nothing
    return encode_update(codec_for(schedule.codec), model.spec, partial, residual)


class DeviceAgent:
    """One device: its id in `fleet`, its secret `key`, its gateway's broker URL and data.

    By default it trains in the WebAssembly kernel each round's schedule names, fetched
    over MQTT and kept in `kernel_cache` (None: in memory only); a schedule that names
    none runs the kernel the device shipped with. An explicit `trainer` (the numpy
    reference, or a test's) is used for every round instead. `login`: its broker login
    (``<id>.login`` beside its key); `state_dir`: where its high-water marks survive
    restarts (None: in memory only).
    """

    def __init__(
        self,
        device_id: str,
        fleet: Fleet,
        key: SigningKey,
        gateway_url: str,
        x: F32Array,
        y: IntArray,
        *,
        trainer: Trainer | None = None,
        kernel_cache: Path | None = None,
        clock: Callable[[], float] = time.time,
        join_current_round: bool = False,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        rng: np.random.Generator | None = None,
        login: Login | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.id = device_id
        self.fleet = fleet
        self.gateway = fleet.gateway_of(device_id)
        self.key = key
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
            shapes = f"{x.shape}, {y.shape}"
            raise DeviceError(f"data must be x (n, features) and y (n,), n > 0: {shapes}")
        self.x = np.asarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.int64)
        self.trainer = trainer
        self.kernels = KernelShelf(fleet, kernel_cache)
        self._shipped: WasmTrainer | None = None
        self._kernel_subs: set[str] = set()
        self._detail = ""  # the status detail last published
        self.clock = clock
        # A device that comes back mid-round joins from the next schedule (docs/rounds.md):
        # a retained schedule is one it missed the start of.
        self.join_current_round = join_current_round
        self._lock = threading.Condition()
        self._marks = MarkFile(state_dir)
        try:
            self._feed = CoordinatorFeed(fleet, self._marks.load())
        except MarksError as exc:
            raise DeviceError(str(exc)) from exc
        self._logs = LogLimiter()
        self._model: GlobalModel | None = None
        self._model_stamp: Stamp | None = None  # (run, version) of the model held
        self._schedule: tuple[int, RoundSchedule] | None = None  # (run, schedule)
        self._residual: F32Array | None = None
        # (run, round, deadline) of the last schedule handled: a restarted coordinator
        # re-issues an open round under the same number with a later deadline, and that is new.
        self._last_round: tuple[int, int, float] = (-1, -1, 0.0)
        # The residual before the last round run, for running that round again.
        self._residual_before: tuple[int, F32Array | None] = (-1, None)
        self.outcomes: dict[int, RoundOutcome] = {}
        self.rejected: dict[str, int] = {}
        self._wake: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        offline = Status(self.id, "device", State.OFFLINE, __version__)
        self.transport = MqttTransport(
            gateway_url,
            client_id(fleet.fleet, device_id),
            will=(topics.status(fleet.fleet, device_id), offline.to_json()),
            login=None if login is None else (login.username, login.password),
            backoff_min=backoff_min,
            backoff_max=backoff_max,
            rng=rng,
        )

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> DeviceAgent:
        """Connect, subscribe to model and schedule, start the worker thread."""
        f = self.fleet.fleet
        self._worker = threading.Thread(target=self._work, name=f"device-{self.id}", daemon=True)
        self._worker.start()
        self.transport.subscribe(topics.global_model(f), self._on_model)
        self.transport.subscribe(topics.round_schedule(f), self._on_schedule)
        try:
            self.transport.connect(timeout)
            online = Status(self.id, "device", State.ONLINE, __version__)
            self.transport.publish(topics.status(f, self.id), online.to_json(), retain=True)
        except TransportError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop training, publish offline, disconnect. Safe to call twice."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.put(True)
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)
        offline = Status(self.id, "device", State.OFFLINE, __version__)
        try:
            if self.transport.connected:
                self.transport.publish(
                    topics.status(self.fleet.fleet, self.id),
                    offline.to_json(),
                    retain=True,
                    wait=True,
                    timeout=timeout,
                )
        except TransportError as exc:
            log.warning("%s: offline status not sent: %s", self.id, exc)
        self.transport.close(timeout)

    def __enter__(self) -> DeviceAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_round(self, round: int, timeout: float) -> RoundOutcome:
        """The outcome of `round` once this device has handled it; TimeoutError after `timeout`."""
        with self._lock:
            if not self._lock.wait_for(lambda: round in self.outcomes, timeout):
                raise TimeoutError(f"{self.id}: round {round} not handled within {timeout} s")
            return self.outcomes[round]

    # -- paho's thread: record and wake the worker ----------------------------------------

    def _reject(self, what: str, exc: TernError) -> None:
        """Count and log (at most once a minute per kind and reason) a refused message.
        `rejected` counts ``model_<reason>``, ``schedule_<reason>``, ``kernel_<reason>``."""
        with self._lock:
            key = f"{what}_{exc.reason}"
            self.rejected[key] = self.rejected.get(key, 0) + 1
        if self._logs.log(log, what, exc.reason, "%s: refused a %s (%s): %s",
                          self.id, what, exc.reason, exc):  # fmt: skip
            # what a dashboard sees of it, as often as the log line
            self._publish_status(f"refused a {what}: {exc.reason}")

    def _on_model(self, message: Message) -> None:
        with self._lock:
            try:
                taken = self._feed.take_model(message.payload)
            except TernError as exc:
                self._reject("model", exc)  # the lock is re-entrant
                return
            stamp = model_stamp(taken.envelope)
            if taken.order is Order.SAME and stamp == self._model_stamp:
                return  # the model held: a retained copy after a reconnect
            self._marks.save(self._feed.marks)
            self._model_stamp = stamp
            self._model = taken.value
        self._wake.put(True)

    def _on_kernel(self, message: Message) -> None:
        try:
            digest = topics.parse(message.topic).digest
            assert digest is not None  # our filter is a kernel topic
            self.kernels.offer(digest, message.payload)
        except TernError as exc:
            self._reject("kernel", exc)

    def _on_schedule(self, message: Message) -> None:
        with self._lock:
            try:
                taken = self._feed.take_schedule(message.payload)
            except TernError as exc:
                self._reject("schedule", exc)
                return
            if taken.order is Order.NEWER:
                self._marks.save(self._feed.marks)
            run, schedule = taken.envelope.run, taken.value
            if (run, schedule.round, schedule.deadline) <= self._last_round:
                return  # a retained copy after a reconnect, or an old round
            if message.retain and not self.join_current_round:
                # Joined mid-round: skip it, take part from the next schedule.
                self._last_round = (run, schedule.round, schedule.deadline)
                return
            self._schedule = (run, schedule)
        self._wake.put(True)

    # -- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                self._wake.get(timeout=0.5)
            except queue.Empty:
                continue
            if self._stopping.is_set():
                return
            job = self._take_job()
            if job is not None:
                self._run_round(*job)

    def _take_job(self) -> tuple[GlobalModel, int, RoundSchedule] | None:
        with self._lock:
            if self._schedule is None:
                return None
            (run, s), m = self._schedule, self._model
            if (run, s.round, s.deadline) <= self._last_round:
                return None
            if s.participants is not None and self.id not in s.participants:
                self._last_round = (run, s.round, s.deadline)
                return None
            if m is None or self._model_stamp != Stamp(run, s.model_version):
                return None  # wait for the model the schedule names
            self._last_round = (run, s.round, s.deadline)
            return m, run, s

    def _run_round(self, model: GlobalModel, run: int, schedule: RoundSchedule) -> None:
        n = int(self.x.shape[0])
        start = time.monotonic()
        try:
            if self.clock() >= schedule.deadline:
                raise LateRound(f"round {schedule.round} is past its deadline")
            # A round run again (its first attempt was lost with a coordinator) starts from
            # the residual before that attempt: its contribution was never counted.
            rerun, before = self._residual_before
            carried = before if rerun == schedule.round else self._residual
            self._residual_before = (schedule.round, carried)
            trainer, kernel = self._trainer_for(schedule)
            update, residual = local_update(
                trainer, model, self.x, self.y, schedule, self.id, carried
            )
            seconds = time.monotonic() - start
            data = self._send(Kind.UPDATE, run, schedule, update.to_body())
            outcome = RoundOutcome(
                schedule.round, schedule.model_version, n, len(data), seconds, kernel=kernel
            )
            self._residual = residual
            if self._detail:
                self._publish_status("")  # the last failure is over
        except Exception as exc:  # a failed round is data, and the worker must live on
            outcome = self._failed(run, schedule, exc)
        with self._lock:
            self.outcomes[schedule.round] = outcome
            self._lock.notify_all()

    # -- kernels and failures ---------------------------------------------------------------

    def _trainer_for(self, schedule: RoundSchedule) -> tuple[Trainer, str]:
        """The trainer for this round and the SHA-256 of its kernel ("" for none)."""
        if self.trainer is not None:
            return self.trainer, ""
        ref = schedule.kernel
        if ref is None:
            if self._shipped is None:
                self._shipped = WasmTrainer()
            return self._shipped, ""
        if ref.sha256 not in self._kernel_subs and self.kernels.cached(ref.sha256) is None:
            # the retained kernel arrives on subscribing; kept for reconnects and reuse
            self.transport.subscribe(topics.kernel(self.fleet.fleet, ref.sha256), self._on_kernel)
            self._kernel_subs.add(ref.sha256)
        return self.kernels.trainer(ref, schedule.deadline - self.clock()), ref.sha256

    def _failed(self, run: int, schedule: RoundSchedule, exc: Exception) -> RoundOutcome:
        """Report a round this device could not train: a failure upstream, a status detail."""
        reason = failure_reason(exc)
        log.warning("%s: round %d failed (%s): %s", self.id, schedule.round, reason, exc)
        n = int(self.x.shape[0])
        try:
            if self.clock() < schedule.deadline:
                self._send(Kind.FAILURE, run, schedule, Failure({reason: 1}).to_body())
            self._publish_status(f"round {schedule.round}: {reason}: {exc}"[:500])
        except TransportError as report_exc:
            log.warning(
                "%s: failure of round %d not reported: %s", self.id, schedule.round, report_exc
            )
        return RoundOutcome(
            schedule.round, schedule.model_version, n, error=str(exc), reason=reason
        )

    def _send(self, kind: Kind, run: int, schedule: RoundSchedule, body: object) -> bytes:
        """Seal `body` for the schedule's round and publish it to this device's gateway."""
        f = self.fleet.fleet
        env = Envelope(kind, f, schedule.round, schedule.model_version, self.id, body, run=run)
        data = seal(env, self.key)
        self.transport.publish(topics.update(f, self.gateway, self.id), data)
        return data

    def _publish_status(self, detail: str) -> None:
        """Online, with what went wrong last ("" once a round succeeds again)."""
        status = Status(self.id, "device", State.ONLINE, __version__, detail)
        try:
            self.transport.publish(
                topics.status(self.fleet.fleet, self.id), status.to_json(), retain=True
            )
            self._detail = detail
        except TransportError as exc:
            log.warning("%s: status not sent: %s", self.id, exc)
