"""The coordinator process: the I/O around tern.rounds.coordinator.CoordinatorMachine.

Its transport posts the gateways' partials to the coordinator's loop (broker.loop.Loop),
which feeds the machine and carries out its actions: publishing, its round timers,
writing the state directory (a model, then the round's record: the commit point) and
telling waiters a round closed. Nothing is locked while the machine folds, steps the
server strategy or evaluates, so the network thread is never held up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from broker.chunking import ChunkedTransport, fleet_bound
from broker.errors import BrokerError
from broker.logs import RunTally, log_round
from broker.loop import Loop
from broker.transport import MqttTransport
from coordinator.config import CoordinatorConfig, CoordinatorError, RoundTimeout
from coordinator.privacy import ledger_for
from coordinator.store import RoundRecord, StateStore
from kernels.reference import evaluate, init_weights, mlp_spec
from kernels.wasm import ABI_VERSION, KernelError, load_kernel, packaged_kernel
from tern import __version__, topics
from tern.downlink import DOWNLINK_BUFFER, downlink_strategy
from tern.fleet import COORDINATOR, Fleet
from tern.messages import Bounds, KernelFile, KernelRef
from tern.policy import Policy
from tern.reports import State, Status
from tern.rounds.coordinator import (
    Begin,
    CoordinatorMachine,
    Finished,
    RoundClosed,
    SaveModel,
    SaveRound,
    SwitchKernel,
)
from tern.rounds.events import Link
from tern.rounds.opening import RoundSettings, ServerModel
from tern.spec import ModelSpec
from tern.strategies import ServerState, Strategy, strategy_from

__all__ = ["Coordinator", "TestSet", "check_test_set"]

log = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]

_FINISHED = object()  # in the callbacks' queue: every round's callback has run
_KEEP_RECORDS = 1024  # closed rounds whose record wait_for_round returns from memory


@dataclass(frozen=True, slots=True)
class TestSet:
    """A held-out set the coordinator evaluates every new model on."""

    __test__ = False  # not a pytest class

    x: F32Array
    y: npt.NDArray[np.integer]


def check_test_set(x: npt.NDArray[Any], y: npt.NDArray[Any], layers: Sequence[int]) -> None:
    """CoordinatorError unless (x, y) fits the model of `layers`: as many features as its
    input layer, finite, labels that are classes of its output layer."""
    inputs, classes = layers[0], layers[-1]
    shape = f"(layers {','.join(map(str, layers))})"
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise CoordinatorError("x must be (n, features) and y (n,)")
    if x.shape[0] == 0:
        raise CoordinatorError("it holds no samples")
    if x.shape[1] != inputs:
        raise CoordinatorError(
            f"it has {x.shape[1]} features, but the model's input layer takes {inputs} {shape}"
        )
    if not (np.issubdtype(x.dtype, np.number) and np.isfinite(x).all()):
        raise CoordinatorError("x must hold finite numbers")
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and bool(np.all(np.mod(y, 1) == 0))
    )
    if not integral or y.min() < 0 or y.max() >= classes:
        raise CoordinatorError(
            f"labels must be integers in 0..{classes - 1}, one per class of the model's"
            f" output layer {shape}"
        )


def settings_of(config: CoordinatorConfig) -> RoundSettings:
    """The round settings a configuration asks for (its policy names its server step)."""
    strategy = config.strategy_spec()
    return RoundSettings(
        codec=config.codec,
        round_timeout=config.round_timeout,
        min_contributors=config.min_contributors,
        fraction=config.fraction,
        seed=config.seed,
        train=config.train,
        kernel_fuel=config.kernel_fuel,
        kernel_memory=config.kernel_memory,
        bounds=Bounds(config.max_weight, config.max_norm),
        policy=Policy(strategy=strategy),
        rounds=config.rounds,
        interval=config.interval,
        secagg=config.privacy.secagg_terms(config.round_timeout),
        dp=config.privacy.dp_terms(config.rounds),
        dp_epsilon=config.privacy.dp_epsilon,
        dp_delta=config.privacy.dp_delta,
        partials=config.partials,
        density=config.density,
        downlink=config.downlink,
    )


def strategy_of(settings: RoundSettings, spec: ModelSpec) -> Strategy:
    """The server step the settings name, its models sent down as deltas when they say so."""
    inner = strategy_from(settings.policy.strategy)
    return downlink_strategy(inner, settings.downlink, spec, settings.density)


def resume(
    store: StateStore, spec: ModelSpec, init_seed: int, strategy: Strategy
) -> tuple[ServerModel, int]:
    """The model to start from and the round to open first: the state directory's last,
    or the initial model (round 1) on an empty one. A state saved with full models only
    resumes with the downlink's residual at zero."""
    names = tuple(strategy.init_state(spec.size).buffers)
    snapshot = store.latest(spec.size, names, fresh=(DOWNLINK_BUFFER,))
    if snapshot is None:
        weights = init_weights(spec, np.random.default_rng(init_seed))
        return ServerModel(0, weights, strategy.init_state(spec.size)), 1
    log.info("resuming at round %d on model v%d", snapshot.last_round + 1,
             snapshot.model_version)  # fmt: skip
    state = ServerState(snapshot.model_version, snapshot.buffers)
    return ServerModel(snapshot.model_version, snapshot.weights, state), snapshot.last_round + 1


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
        if test_set is not None:
            check_test_set(test_set.x, test_set.y, config.layers)
        self.settings = settings_of(config)
        strategy = strategy_of(self.settings, self.spec)
        self.store = StateStore(config.state_dir, keep_models=config.keep_models)
        self._key = key
        self._clock = clock
        self._on_round = on_round
        self._cond = threading.Condition()
        self._finished = threading.Event()
        self._stopping = False
        self._records: dict[int, RoundRecord] = {}
        self._tally, self._started = RunTally(), time.monotonic()  # for the closing summary
        self._callbacks: queue.SimpleQueue[RoundRecord | object | None] = queue.SimpleQueue()
        self._caller: threading.Thread | None = None
        self.run = self.store.run(clock)
        model, next_round = resume(self.store, self.spec, config.init_seed, strategy)
        if next_round == 1:
            self.store.save_state(model.version, model.weights, model.state.buffers)
        x_y = None if test_set is None else (test_set.x, test_set.y)
        self.machine = CoordinatorMachine(
            fleet,
            key,
            run=self.run,
            spec=self.spec,
            settings=self.settings,
            strategy=strategy,
            model=model,
            next_round=next_round,
            kernel=self._checked_kernel(packaged_kernel() if kernel is None else kernel),
            client_id=config.client_id,
            evaluate=None if x_y is None else (lambda w: evaluate(self.spec, w, *x_y)),
            ledger=ledger_for(config.privacy, self.store),
        )
        login = config.login
        mqtt = MqttTransport(
            config.broker_url,
            config.client_id,
            will=(topics.status(fleet.fleet, config.client_id), self._status(State.OFFLINE)),
            login=None if login is None else (login.username, login.password),
            tls=config.tls,
        )
        # big messages in chunks (broker.chunking), kept under its member id
        self._transport = ChunkedTransport(
            mqtt, fleet=fleet.fleet, sender=COORDINATOR, max_message=config.max_message_bytes,
            limit=fleet_bound(fleet), max_pending=len(fleet.children(COORDINATOR)) + 8,
        )  # fmt: skip
        self.loop = Loop(
            "coordinator",
            self.machine.handle,
            clock=clock,
            links={Link.UP: self._transport},
            executors={
                SaveModel: self._save_model,
                SaveRound: lambda a: self.store.save_round(a.record),
                RoundClosed: self._closed,
                Finished: self._finish,
            },
            logger=log,
        )

    @property
    def strategy(self) -> Strategy:
        """The server step (tern.strategies); set it before `start()` to run another."""
        return self.machine.strategy

    @strategy.setter
    def strategy(self, strategy: Strategy) -> None:
        self.machine.strategy = strategy

    def _save_model(self, action: SaveModel) -> None:
        m = action.model
        self.store.save_state(m.version, m.weights, m.state.buffers)

    # -- public -------------------------------------------------------------------------

    @property
    def model_version(self) -> int:
        return self.machine.model.version

    @property
    def weights(self) -> F32Array:
        """A copy of the current global model."""
        return self.machine.model.weights.copy()

    @property
    def next_round(self) -> int:
        """The round that is open, or the next one to open."""
        rnd = self.machine.round
        return rnd.round if rnd is not None else self.machine.next_round

    @property
    def records(self) -> dict[int, RoundRecord]:
        """Rounds closed by this process (the latest ones), by number."""
        with self._cond:
            return dict(self._records)

    def start(self) -> Coordinator:
        """Connect, announce, and open the first round (unless `rounds` is already done)."""
        self._transport.subscribe(
            topics.partials_to(self.fleet.fleet, "coordinator"), self.loop.handler(Link.UP)
        )
        try:
            self._transport.connect(self.config.connect_timeout)
        except BrokerError as exc:
            raise CoordinatorError(f"cannot reach {self.config.broker_url}: {exc}") from exc
        self.loop.linked(Link.UP)
        self._started = time.monotonic()
        self.loop.post(Begin())
        self.loop.start()
        if self._on_round is not None:
            self._caller = threading.Thread(
                target=self._call_back, name="coordinator-callbacks", daemon=True
            )
            self._caller.start()
        return self

    @property
    def kernel(self) -> KernelRef:
        """The kernel (and its budget) the next schedule names."""
        return self.settings.kernel_ref(self.machine.kernel)

    def publish_kernel(self, wasm: bytes) -> KernelRef:
        """Publish `wasm` (signed, retained) and name it in every schedule from the next
        round on: the fleet switches to it without restarting a device. CoordinatorError
        if it is not a loadable kernel of this host's ABI."""
        kernel = self._checked_kernel(wasm)
        if self.loop.running:
            self.loop.post(SwitchKernel(kernel))
        else:
            self.machine.kernel = kernel
        return self.settings.kernel_ref(kernel)

    @staticmethod
    def _checked_kernel(wasm: bytes) -> KernelFile:
        try:
            load_kernel(wasm)  # compiles, and checks it is a tern kernel with no imports
        except KernelError as exc:
            raise CoordinatorError(f"not a kernel this fleet can run: {exc}") from exc
        return KernelFile(ABI_VERSION, wasm)

    def wait_for_round(self, round: int, timeout: float) -> RoundRecord:
        """The record of `round` once it closes here; RoundTimeout after `timeout` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: round in self._records, timeout):
                raise RoundTimeout(round, timeout)
            return self._records[round]

    def wait_finished(self, timeout: float | None = None) -> bool:
        """True once the last configured round has closed."""
        return self._finished.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, publish offline, disconnect. An open round is abandoned (not
        recorded), so a restarted coordinator runs it again."""
        if self._stopping:
            return
        self._stopping = True
        self.loop.stop(timeout)
        if self._tally.rounds:
            self._tally.log(log, time.monotonic() - self._started)
        if self.machine.round is not None:
            log.info("stopping with round %d open; it re-runs on restart", self.machine.round.round)
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
            self.store.close()
            self._callbacks.put(None)  # the callbacks of every closed round run first
            caller = self._caller
            if caller is not None and caller is not threading.current_thread():
                caller.join(timeout)
            self._finished.set()

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _status(self, state: State, detail: str = "") -> bytes:
        return Status(self.config.client_id, "coordinator", state, __version__, detail).to_json()

    def _closed(self, closed: RoundClosed) -> None:
        record = closed.record
        metrics = record.metrics(self.config.client_id)
        log_round(log, metrics, record.ok)
        self._tally.add(metrics, record.ok)
        with self._cond:
            self._records[record.round] = record
            for old in sorted(self._records)[:-_KEEP_RECORDS]:
                del self._records[old]
            self._cond.notify_all()
        if self._on_round is not None:
            self._callbacks.put(record)  # on a thread of their own: never the loop's

    def _finish(self, _: Finished) -> None:
        """The last round closed: finished once its callback has run, too."""
        if self._caller is None:
            self._finished.set()
        else:
            self._callbacks.put(_FINISHED)

    def _call_back(self) -> None:
        while (record := self._callbacks.get()) is not None:
            if record is _FINISHED:
                self._finished.set()
                continue
            assert self._on_round is not None and isinstance(record, RoundRecord)
            try:
                self._on_round(record)
            except Exception:
                log.exception("on_round callback failed for round %d", record.round)
