"""The Pi-class device agent: the process around tern.rounds.device.DeviceMachine.

MQTT handlers only post what arrived to the agent's loop (broker.loop.Loop), which feeds
the machine and carries out its actions; training runs on a worker thread of its own,
so a long local epoch never stalls the loop or the network. The error-feedback residual
lives in the machine, as long as the agent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from broker.chunking import ChunkedTransport, fleet_bound
from broker.errors import TransportError
from broker.logs import log_device_round
from broker.loop import Loop
from broker.marks import MarkFile, MarksError
from broker.transport import Message, MqttTransport, TlsClient, Transport
from device.errors import DeviceError
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
from tern.errors import TernError
from tern.fleet import Fleet, client_id
from tern.logins import Login
from tern.messages import GlobalModel, RoundSchedule, Update, encode_update
from tern.privacy.clip import dp_update
from tern.reports import State, Status
from tern.rounds.device import (
    DeviceMachine,
    KernelRefused,
    RoundDone,
    RoundOutcome,
    SaveMarks,
    Train,
    Trained,
)
from tern.rounds.events import Link
from tern.secagg.ring import encode_contribution

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
I64Array = npt.NDArray[np.int64]

_KEEP_OUTCOMES = 256  # rounds whose outcome wait_for_round can still return


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


def training_rng(seed: int, round: int, device: str) -> np.random.Generator:
    """The generator a device trains with in round `round` of a run seeded `seed`
    (docs/rounds.md, Determinism): a new data order every round, the same on a rerun."""
    return np.random.default_rng([seed, round, zlib.crc32(device.encode())])


def local_update(
    trainer: Trainer,
    model: GlobalModel,
    x: F32Array,
    y: IntArray,
    schedule: RoundSchedule,
    device: str,
    residual: F32Array | None,
    *,
    cohort: int = 1,
    noise_rng: np.random.Generator | None = None,
) -> tuple[Update | I64Array, F32Array]:
    """Train on (x, y) and encode the weighted delta; returns (update, next residual).

    Under secure aggregation the update is the device's integer contribution
    (`tern.secagg.ring.encode_contribution`); under differential privacy without it, an
    update clipped (and, for distributed noise, noised) by `tern.privacy.clip.dp_update`.
    `cohort`: the devices of its gateway's cohort; `noise_rng`: the device's own secret
    generator for distributed noise (never derived from anything published)."""
    rng = training_rng(schedule.seed, schedule.round, device)
    new = trainer.train(model.spec, model.weights, x, y, schedule.train, rng)
    w = np.float32(x.shape[0])
    delta = (new - model.weights).astype(np.float32)
    if residual is not None and residual.shape != delta.shape:
        residual = None  # a new model shape: old error feedback means nothing
    samples = float(x.shape[0])
    if schedule.secagg is not None:
        return encode_contribution(
            model.spec, delta, samples, residual, schedule.secagg, schedule.dp, cohort, noise_rng
        )
    if schedule.dp is not None:
        codec = codec_for(schedule.codec)
        return dp_update(
            codec, model.spec, delta, samples, residual, schedule.dp, cohort, noise_rng
        )
    partial = Partial((delta * w).astype(np.float32), samples, 1)
    return encode_update(codec_for(schedule.codec), model.spec, partial, residual)


def trained(
    job: Train, result: tuple[Update | I64Array, F32Array], seconds: float, kernel: str
) -> Trained:
    """The event for a finished job: an update, or an integer contribution."""
    update, residual = result
    if isinstance(update, Update):
        return Trained(job.run, job.schedule, update, None, residual, seconds, kernel)
    return Trained(job.run, job.schedule, None, update, residual, seconds, kernel)


class DeviceAgent:
    """One device: its id in `fleet`, its secret `key`, its gateway's broker URL and data.

    By default it trains in the WebAssembly kernel each round's schedule names, fetched
    over MQTT and kept in `kernel_cache` (None: in memory only); a schedule that names
    none runs the kernel the device shipped with. An explicit `trainer` (the numpy
    reference, or a test's) is used for every round instead. `login`: its broker login
    (``<id>.login`` beside its key); `state_dir`: where its high-water marks survive
    restarts (None: in memory only); `slowdown`: a pause before each training (fault
    drills, stragglers). `join_current_round`: take part in a round already open when
    it starts, if its deadline is still ahead (default), or wait for the next one.
    `transport`: its connection to the gateway's broker (default: MQTT to gateway_url,
    over TLS with `tls` for an ``mqtts://`` one), always behind a ChunkedTransport
    (broker.chunking): it reassembles chunked messages, and sends a message whose packet
    exceeds `max_message_bytes` in chunks (None: every message whole).
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
        join_current_round: bool = True,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        rng: np.random.Generator | None = None,
        login: Login | None = None,
        state_dir: Path | None = None,
        slowdown: float = 0.0,
        transport: Transport | None = None,
        tls: TlsClient | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        if not slowdown >= 0:
            raise DeviceError(f"slowdown must be >= 0 seconds, got {slowdown}")
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
            shapes = f"{x.shape}, {y.shape}"
            raise DeviceError(f"data must be x (n, features) and y (n,), n > 0: {shapes}")
        try:
            known = bytes(fleet.key_of(device_id))
        except TernError as exc:
            raise DeviceError(str(exc)) from exc
        if bytes(key.verify_key) != known:
            raise DeviceError(f"the key does not match the fleet file's key for {device_id}")
        self.id = device_id
        self.fleet = fleet
        self.gateway = fleet.gateway_of(device_id)
        self.key = key
        self.x = np.asarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.int64)
        self.trainer = trainer
        self.slowdown = slowdown
        self.clock = clock
        self.kernels = KernelShelf(fleet, kernel_cache)
        self._shipped: WasmTrainer | None = None
        self._kernel_subs: set[str] = set()
        self._marks = MarkFile(state_dir)
        try:
            marks = self._marks.load()
        except MarksError as exc:
            raise DeviceError(str(exc)) from exc
        self.machine = DeviceMachine(
            device_id, fleet, key, int(self.x.shape[0]), marks=marks,
            join_current_round=join_current_round,
        )  # fmt: skip
        self._cond = threading.Condition()
        self.outcomes: dict[int, RoundOutcome] = {}
        self._jobs: queue.SimpleQueue[Train | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        if transport is None:
            offline = Status(self.id, "device", State.OFFLINE, __version__)
            transport = MqttTransport(
                gateway_url,
                client_id(fleet.fleet, device_id),
                will=(topics.status(fleet.fleet, device_id), offline.to_json()),
                login=None if login is None else (login.username, login.password),
                backoff_min=backoff_min,
                backoff_max=backoff_max,
                rng=rng,
                tls=tls,
            )
        try:
            self.transport = ChunkedTransport(
                transport, fleet=fleet.fleet, sender=device_id, max_message=max_message_bytes,
                limit=fleet_bound(fleet),
            )  # fmt: skip
        except TransportError as exc:
            raise DeviceError(str(exc)) from exc
        transport = self.transport
        self.loop = Loop(
            f"device-{device_id}",
            self.machine.handle,
            clock=clock,
            links={Link.DOWN: transport},
            executors={
                SaveMarks: lambda a: self._marks.save(a.marks),
                Train: self._jobs.put,
                RoundDone: self._done,
            },
            logger=log,
        )

    @property
    def rejected(self) -> dict[str, int]:
        """Messages from upstream refused, as ``model_<reason>``, ``schedule_<reason>``,
        ``kernel_<reason>``, and chunked ones as ``chunk_<reason>`` (broker.chunking)."""
        return {**self.machine.rejected, **self.transport.rejected()}

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float | None = 10.0) -> DeviceAgent:
        """Connect, subscribe to model and schedule, start the loop and the worker."""
        f = self.fleet.fleet
        # the full model until a schedule says deltas come, then only while it cannot
        # follow them (tern.rounds.follow unsubscribes and subscribes again)
        self.transport.subscribe(topics.global_model(f), self.loop.handler(Link.DOWN))
        self.transport.subscribe(topics.model_delta(f), self.loop.handler(Link.DOWN))
        self.transport.subscribe(topics.round_schedule(f), self.loop.handler(Link.DOWN))
        # its gateway's secure aggregation messages to it (only under secure aggregation)
        inbox = topics.inbox(f, self.id, self.gateway)
        self.transport.subscribe(inbox, self.loop.handler(Link.DOWN))
        self._worker = threading.Thread(target=self._work, name=f"device-{self.id}", daemon=True)
        self._worker.start()
        self.loop.start()
        try:
            self.transport.connect(timeout)
        except TransportError:
            self.stop()
            raise
        self.loop.linked(Link.DOWN)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop training, publish offline, disconnect. Safe to call twice."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._jobs.put(None)
        self.loop.stop(timeout)
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
        with self._cond:
            if not self._cond.wait_for(lambda: round in self.outcomes, timeout):
                raise TimeoutError(f"{self.id}: round {round} not handled within {timeout} s")
            return self.outcomes[round]

    def _done(self, done: RoundDone) -> None:
        log_device_round(log, self.id, done.outcome)
        with self._cond:
            self.outcomes[done.outcome.round] = done.outcome
            for old in sorted(self.outcomes)[:-_KEEP_OUTCOMES]:
                del self.outcomes[old]
            self._cond.notify_all()

    # -- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stopping.is_set():
                return
            self.loop.post(self.run_job(job))

    def run_job(self, job: Train) -> Trained:
        """Train for `job` (after the slowdown); a failure is data, never an exception."""
        s = job.schedule
        start = time.monotonic()
        try:
            if self.slowdown and self._stopping.wait(self.slowdown):
                raise DeviceError("stopping")
            trainer, kernel = self._trainer_for(s)
            result = local_update(
                trainer, job.model, self.x, self.y, s, self.id, job.residual,
                cohort=job.cohort, noise_rng=np.random.default_rng(),  # OS entropy: secret
            )  # fmt: skip
        except Exception as exc:  # a failed round is data, and the worker must live on
            return Trained(job.run, s, reason=failure_reason(exc), error=str(exc))
        return trained(job, result, time.monotonic() - start, kernel)

    # -- kernels ----------------------------------------------------------------------------

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
        # Wait for it no longer than leaves time to tell the gateway it never came.
        left = schedule.deadline - self.clock()
        return self.kernels.trainer(ref, left - max(1.0, 0.25 * left)), ref.sha256

    def _on_kernel(self, message: Message) -> None:
        try:
            digest = topics.parse(message.topic).digest
            assert digest is not None  # our filter is a kernel topic
            self.kernels.offer(digest, message.payload)
        except TernError as exc:
            self.loop.post(KernelRefused(exc))
