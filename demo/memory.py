"""The demo's fleet on in-memory buses: every round machine, no broker, no threads.

Each broker of the fleet is a `broker.memory.MemoryBus`; the coordinator, gateways and
devices are their round machines (tern.rounds) driven by their loops (broker.loop) on a
virtual clock that jumps to the next timer when nothing else is left to do. Training
runs the same code as a device agent (`device.agent.local_update`), inline. The same
seed gives the same model bytes, fast and with no sleeps: round logic is tested here,
and faults (a broker restart, a gateway restart, a stale run) are played on purpose.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from broker.loop import Loop
from broker.memory import MemoryBus
from broker.transport import Message
from device.agent import failure_reason, local_update, trained
from device.trainer import Trainer
from gateway.view import subscribe_above
from kernels.reference import evaluate, init_weights, mlp_spec
from kernels.wasm import ABI_VERSION, WasmTrainer, packaged_kernel
from tern import topics
from tern.downlink import downlink_strategy
from tern.fleet import COORDINATOR, Fleet
from tern.freshness import Watermarks
from tern.members import Members
from tern.messages import KernelFile
from tern.reports import RoundMetrics
from tern.rounds.coordinator import (
    Begin,
    CoordinatorMachine,
    Finished,
    RoundClosed,
    SaveModel,
    SaveRound,
)
from tern.rounds.device import DeviceMachine, RoundDone, RoundOutcome, SaveMarks, Train, Trained
from tern.rounds.events import Link
from tern.rounds.gateway import CohortClosed, GatewayMachine, ModelTaken
from tern.rounds.opening import RoundSettings, ServerModel
from tern.rounds.record import RoundRecord
from tern.strategies import strategy_from

if TYPE_CHECKING:
    from tern.privacy.ledger import PrivacyLedger

__all__ = ["START", "MemoryFleet"]

F32Array = npt.NDArray[np.float32]
START = 1_767_225_600.0  # the virtual clock's first second (2026-01-01 UTC)


def _ignore(_: object) -> None:
    return None


@dataclass
class _Device:
    machine: DeviceMachine
    loop: Loop
    x: F32Array
    y: npt.NDArray[np.int64]
    trainer: Trainer
    outcomes: dict[int, RoundOutcome] = field(default_factory=dict)


def _ledger(settings: RoundSettings) -> PrivacyLedger | None:
    """A fresh accountant under differential privacy (needs dp-accounting), else None."""
    if settings.dp is None:
        return None
    from tern.privacy.ledger import PrivacyLedger

    return PrivacyLedger(settings.dp_delta, settings.dp_epsilon)


class MemoryFleet:
    """`members`' fleet with `data[device] = (x, y)`, its coordinator starting from
    `init_seed` with `settings`; `trainer` makes each device's trainer (default: the
    packaged Wasm kernel under the schedule's budget, as the demo's devices run it)."""

    def __init__(
        self,
        members: Members,
        data: dict[str, tuple[F32Array, npt.NDArray[np.int64]]],
        settings: RoundSettings,
        *,
        layers: Sequence[int],
        init_seed: int = 0,
        test_set: tuple[F32Array, npt.NDArray[np.integer]] | None = None,
        trainer: Callable[[], Trainer] | None = None,
        run: int = 1,
        margin: float = 0.5,
        save_model: Callable[[ServerModel], None] | None = None,
        save_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        """`save_model`/`save_round`: where the coordinator's state goes (a state store;
        default: nowhere, only the versions saved are listed in `saved_versions`)."""
        self._save_model, self._save_round = save_model, save_round
        self.now = START
        self.fleet: Fleet = members.fleet
        self.members = members
        self.spec = mlp_spec(tuple(layers))
        self.buses: dict[str, MemoryBus] = {COORDINATOR: MemoryBus()}
        for gw in self.fleet.gateways:
            self.buses[gw] = MemoryBus()
        self.records: dict[int, RoundRecord] = {}
        self.gateway_metrics: dict[str, dict[int, RoundMetrics]] = {
            g: {} for g in self.fleet.gateways
        }
        self.finished = False
        self.saved_versions: list[int] = []
        wasm = packaged_kernel()
        self.kernel = KernelFile(ABI_VERSION, wasm)
        if trainer is None:
            budget = {"fuel": settings.kernel_fuel, "memory_limit": settings.kernel_memory}
            shared = WasmTrainer(wasm, **budget)  # one compiled kernel for every device
            trainer = lambda: shared  # noqa: E731
        make_trainer = trainer
        self._initial = init_weights(self.spec, np.random.default_rng(init_seed))
        spec = self.spec
        self._evaluate = None if test_set is None else (lambda w: evaluate(spec, w, *test_set))
        self.coordinator = self._coordinator(members.keys[COORDINATOR], run, settings)
        self.loops: dict[str, Loop] = {}
        self.loops[COORDINATOR] = self._loop(COORDINATOR, self.coordinator.handle,
                                             self._coordinator_executors())  # fmt: skip
        self.margin = margin
        self.gateways: dict[str, GatewayMachine] = {}
        for gw in sorted(self.fleet.gateways):
            self._add_gateway(gw)
        self.devices: dict[str, _Device] = {}
        for d in sorted(data):
            x, y = data[d]
            self._add_device(d, x, y, make_trainer())

    # -- building -----------------------------------------------------------------------

    def _loop(self, name: str, machine: Callable[[object, float], list[object]],
              executors: dict[type, Callable[[Any], None]]) -> Loop:  # fmt: skip
        return Loop(name, machine, clock=lambda: self.now, executors=executors)

    def _coordinator(
        self, key: SigningKey, run: int, settings: RoundSettings
    ) -> CoordinatorMachine:
        """A coordinator of run `run` from the initial model (a fresh state directory)."""
        strategy = downlink_strategy(
            strategy_from(settings.policy.strategy),
            settings.downlink,
            self.spec,
        )
        model = ServerModel(0, self._initial, strategy.init_state(self.spec.size))
        return CoordinatorMachine(
            self.fleet, key, run=run, spec=self.spec, settings=settings, strategy=strategy,
            model=model, next_round=1, kernel=self.kernel, evaluate=self._evaluate,
            ledger=_ledger(settings), noise_rng=np.random.default_rng([settings.seed, 0xD9]),
        )  # fmt: skip

    def _coordinator_executors(self) -> dict[type, Callable[[Any], None]]:
        def saved(action: SaveModel) -> None:
            self.saved_versions.append(action.model.version)
            if self._save_model is not None:
                self._save_model(action.model)

        return {
            SaveModel: saved,
            SaveRound: _ignore
            if self._save_round is None
            else (lambda a: self._save_round(a.record)),
            RoundClosed: lambda a: self.records.__setitem__(a.record.round, a.record),
            Finished: lambda _: setattr(self, "finished", True),
        }

    def _add_gateway(self, gw: str, marks: Watermarks | None = None) -> None:
        depth, parent = 1, self.fleet.gateways[gw].parent
        while parent != COORDINATOR:
            depth, parent = depth + 1, self.fleet.gateways[parent].parent
        machine = GatewayMachine(gw, self.fleet, self.members.keys[gw], depth=depth,
                                 margin=self.margin, marks=marks)  # fmt: skip
        self.gateways[gw] = machine
        metrics = self.gateway_metrics[gw]
        self.loops[gw] = self._loop(gw, machine.handle, {
            SaveMarks: _ignore,
            ModelTaken: _ignore,
            CohortClosed: lambda a: metrics.__setitem__(a.metrics.round, a.metrics),
        })  # fmt: skip

    def _add_device(self, d: str, x: F32Array, y: npt.NDArray[np.int64], trainer: Trainer) -> None:
        machine = DeviceMachine(d, self.fleet, self.members.keys[d], int(x.shape[0]))
        outcomes: dict[int, RoundOutcome] = {}
        loop = self._loop(d, machine.handle, {
            SaveMarks: _ignore,
            Train: lambda job: loop.post(self._train(self.devices[d], job)),
            RoundDone: lambda a: outcomes.__setitem__(a.outcome.round, a.outcome),
        })  # fmt: skip
        self.devices[d] = _Device(machine, loop, x, y, trainer, outcomes)

    def _train(self, dev: _Device, job: Train) -> Trained:
        s = job.schedule
        noise = np.random.default_rng([s.seed, s.round, zlib.crc32(dev.machine.id.encode()), 0xD9])
        try:
            result = local_update(
                dev.trainer, job.model, dev.x, dev.y, s, dev.machine.id, job.residual,
                cohort=job.cohort, noise_rng=noise,  # seeded: the memory fleet is a replay
            )  # fmt: skip
        except Exception as exc:  # a failed round is data
            return Trained(job.run, s, reason=failure_reason(exc), error=str(exc))
        return trained(job, result, 0.0, s.kernel.sha256 if s.kernel else "")

    # -- connecting ---------------------------------------------------------------------

    def connect(self) -> MemoryFleet:
        """Every component connects and subscribes, devices and gateways first (the
        README's order), then the coordinator starts."""
        for gw in self.gateways:
            self._connect_gateway(gw)
        for d in self.devices:
            self._connect_device(d)
        self._connect_coordinator()
        return self

    def _connect_gateway(self, gw: str) -> None:
        f, machine, loop = self.fleet.fleet, self.gateways[gw], self.loops[gw]
        down = self.buses[gw].transport(f"{gw}-down")
        loop.links[Link.DOWN] = down
        down.subscribe(topics.updates_to(f, gw), loop.handler(Link.DOWN))
        down.subscribe(topics.partials_to(f, gw), loop.handler(Link.DOWN))
        down.connect()
        loop.linked(Link.DOWN)
        up = self.buses[machine.parent].transport(f"{gw}-up")
        loop.links[Link.UP] = up
        subscribe_above(up, self.fleet, gw, loop.handler(Link.UP))
        up.connect()
        loop.linked(Link.UP)

    def _connect_device(self, d: str) -> None:
        f, dev = self.fleet.fleet, self.devices[d]
        t = self.buses[dev.machine.gateway].transport(d)
        dev.loop.links[Link.DOWN] = t
        t.subscribe(topics.global_model(f), dev.loop.handler(Link.DOWN))
        t.subscribe(topics.model_delta(f), dev.loop.handler(Link.DOWN))
        t.subscribe(topics.round_schedule(f), dev.loop.handler(Link.DOWN))
        t.subscribe(topics.inbox(f, d, dev.machine.gateway), dev.loop.handler(Link.DOWN))
        t.connect()
        dev.loop.linked(Link.DOWN)

    def _connect_coordinator(self) -> None:
        top = self.buses[COORDINATOR].transport(COORDINATOR)
        loop = self.loops[COORDINATOR]
        loop.links[Link.UP] = top
        top.subscribe(topics.partials_to(self.fleet.fleet, COORDINATOR), loop.handler(Link.UP))
        top.connect()
        loop.linked(Link.UP)
        loop.post(Begin())

    # -- faults -------------------------------------------------------------------------

    def restart_gateway(self, gw: str) -> None:
        """Gateway `gw`'s process dies with its embedded broker and comes back: its round
        in progress is gone; its freshness marks (persisted) are not."""
        marks = self.gateways[gw].feed.marks
        for transport in self.loops[gw].links.values():
            transport.close()
        self.buses[gw].restart()
        self._add_gateway(gw, marks)
        self.buses[gw].up()  # its devices reconnect
        self._connect_gateway(gw)

    def new_coordinator(self, run: int, settings: RoundSettings | None = None) -> None:
        """A coordinator on a fresh state directory (run `run`) replaces the running one,
        while every gateway and device keeps running."""
        old = self.coordinator
        for transport in self.loops[COORDINATOR].links.values():
            transport.close()
        self.coordinator = self._coordinator(old.key, run, settings or old.settings)
        self.records.clear()
        self.finished = False
        self.loops[COORDINATOR] = self._loop(COORDINATOR, self.coordinator.handle,
                                             self._coordinator_executors())  # fmt: skip
        self._connect_coordinator()

    # -- running ------------------------------------------------------------------------

    def all_loops(self) -> list[Loop]:
        return [*self.loops.values(), *(d.loop for d in self.devices.values())]

    def settle(
        self,
        hold: Callable[[Message], bool] | None = None,
        until: Callable[[], bool] | None = None,
    ) -> None:
        """Deliver every message and handle every event due now, until all is quiet (or
        `until()` holds: rounds back to back never go quiet); messages `hold` picks stay
        in flight."""
        busy = True
        while busy and not (until is not None and until()):
            busy = False
            for bus in self.buses.values():
                busy |= bus.deliver(hold=hold) > 0
            for loop in self.all_loops():
                busy |= loop.run_pending() > 0

    def advance(self, until: Callable[[], bool] | None = None) -> bool:
        """Settle, then move the clock to the next timer; False when none is set."""
        self.settle(until=until)
        if until is not None and until():
            return True
        due = [t for loop in self.all_loops() if (t := loop.next_timer()) is not None]
        if not due:
            return False
        self.now = max(self.now, min(due))
        self.settle(until=until)
        return True

    def run_until(self, done: Callable[[], bool], *, max_steps: int = 100_000) -> None:
        """Advance until `done()`; RuntimeError if the fleet goes quiet or loops first."""
        for _ in range(max_steps):
            if done():
                return
            if not self.advance(done):
                if done():
                    return
                raise RuntimeError("the fleet went quiet before it was done")
        raise RuntimeError(f"not done after {max_steps} steps")

    def run_rounds(self, rounds: int) -> dict[int, RoundRecord]:
        self.run_until(lambda: self.finished or rounds in self.records)
        return self.records

    @property
    def weights(self) -> F32Array:
        return self.coordinator.model.weights
