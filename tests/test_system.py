"""The whole system at once: a real Coordinator, real Gateways with their own brokers and
real DeviceAgents, over real MQTT on loopback. Each test re-derives in-process what the
fleet must have computed (the same training, seeds, codecs and fold order) and compares
model bytes."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from broker.embedded import EmbeddedBroker
from coordinator import Coordinator, CoordinatorConfig
from coordinator.store import StateStore
from coordinator.strategy import FedAvg
from device.agent import local_update
from kernels.reference import mlp_spec
from kernels.wasm import ABI_VERSION, WasmTrainer, packaged_kernel
from tern import topics
from tern.aggregate import Partial, fold_sorted
from tern.codecs import CodecName, Float32Codec
from tern.envelope import Kind, open_envelope
from tern.fleet import COORDINATOR, Fleet
from tern.messages import (
    GlobalModel,
    KernelFile,
    RoundSchedule,
    TrainConfig,
    encode_update,
    seal_kernel,
)
from tern.reports import RoundMetrics
from tern.spec import ModelSpec
from tests.fleet_fixtures import (
    FleetKit,
    FleetRig,
    build_fleet,
    device_data,
    simple_layout,
    write_fleet,
)
from tests.helpers import wait_until
from tests.mqtt_fixtures import AmqttBroker, Inbox, MakeTransport, RunningBroker, free_port

LAYERS = (8, 6, 3)
SPEC = mlp_spec(LAYERS)
TRAIN = TrainConfig(epochs=1, batch_size=8, lr=0.1)
SHIPPED = WasmTrainer()  # the packaged kernel, which a coordinator publishes by default
SEED = 7
WAIT = 20.0
REPO = Path(__file__).resolve().parents[1]


class SlowTrainer:
    """The shipped Wasm kernel after a pause: keeps a round open long enough to break
    something, and trains as a device with the default kernel does."""

    name = "slow-wasm"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def train(self, spec: ModelSpec, weights: Any, x: Any, y: Any, config: Any, rng: Any) -> Any:
        time.sleep(self.seconds)
        return SHIPPED.train(spec, weights, x, y, config, rng)


# -- the in-process reference ---------------------------------------------------------------


def schedule_for(round: int, version: int, codec: CodecName = CodecName.TERNARY) -> RoundSchedule:
    """What local training reads from the coordinator's schedule (seed, train, codec)."""
    return RoundSchedule(
        round=round,
        model_version=version,
        codec=codec,
        deadline=1.0,
        min_contributors=1,
        participants=None,
        seed=SEED,
        train=TRAIN,
    )


def device_partial(
    device: str, weights: np.ndarray, schedule: RoundSchedule, residual: np.ndarray | None = None
) -> tuple[Partial, np.ndarray]:
    """One device's update as its gateway decodes it, and the residual it keeps."""
    x, y = device_data(device)
    model = GlobalModel(SPEC, weights)
    # devices train in the Wasm kernel the coordinator publishes: the packaged one here
    update, new_residual = local_update(SHIPPED, model, x, y, schedule, device, residual)
    return update.check(SPEC).to_partial(), new_residual


def over_the_wire(p: Partial) -> Partial:
    """A gateway's partial as its parent decodes it: Float32Codec, no residual."""
    update, _ = encode_update(Float32Codec(), SPEC, p)
    return update.check(SPEC).to_partial()


def tree_partial(fleet: Fleet, gateway: str, leaves: dict[str, Partial]) -> Partial:
    """What `gateway` sends up: its devices and child gateways folded in ascending id."""
    parts = {d: leaves[d] for d in fleet.gateways[gateway].devices if d in leaves}
    for child in fleet.children(gateway):
        if any(d in leaves for d in fleet.devices_below(child)):
            parts[child] = tree_partial(fleet, child, leaves)
    return over_the_wire(fold_sorted(parts.items(), SPEC.size))


def server_step(weights: np.ndarray, top: dict[str, Partial]) -> np.ndarray:
    """The coordinator's fold of its gateways' partials and plain FedAvg (lr 1, no momentum)."""
    fedavg = FedAvg(1.0, 0.0)
    state = fedavg.init_state(SPEC.size)
    new, _ = fedavg.apply(weights, state, fold_sorted(top.items(), SPEC.size))
    return new


def reference_model(fleet: Fleet, weights: np.ndarray, leaves: dict[str, Partial]) -> np.ndarray:
    top = {
        g: tree_partial(fleet, g, leaves)
        for g in fleet.children(COORDINATOR)
        if any(d in leaves for d in fleet.devices_below(g))
    }
    return server_step(weights, top)


# -- the rig --------------------------------------------------------------------------------


class Rig(FleetRig):
    """Coordinator, gateways and devices of one fleet; everything stops at the end."""

    def __init__(self, kit: FleetKit, upstream_url: str, state: Path, stack: ExitStack) -> None:
        super().__init__(kit, upstream_url, stack)
        self.state = state

    def all(self) -> Rig:
        """Every gateway (parents first) and every device of the fleet."""
        for gw in sorted(self.kit.fleet.gateways, key=self.kit.fleet.height, reverse=True):
            self.gateway(gw)
        for dev in self.kit.fleet.devices:
            self.device(dev)
        return self

    def coordinator(self, **overrides: Any) -> Coordinator:
        settings: dict[str, Any] = {
            "broker_url": self.upstream_url,
            "state_dir": self.state,
            "layers": LAYERS,
            "codec": CodecName.TERNARY,
            "rounds": 1,
            "round_timeout": 5.0,
            "seed": SEED,
            "train": TRAIN,
            "login": self.kit.logins[COORDINATOR],
        }
        settings.update(overrides)
        coordinator = Coordinator(
            CoordinatorConfig(**settings), self.kit.fleet, self.kit.coordinator_key
        )
        self.stack.callback(coordinator.stop)
        return coordinator

    def model(self, version: int) -> np.ndarray:
        return StateStore(self.state).load_model(version, SPEC.size)[0]


# -- tests ----------------------------------------------------------------------------------


def test_two_gateways_of_three_devices_give_the_in_process_fold_bit_for_bit(
    any_broker: RunningBroker, stack: ExitStack, tmp_path: Path
) -> None:
    kit = build_fleet(simple_layout(2, 3))
    rig = Rig(kit, any_broker.url, tmp_path / "state", stack).all()
    coordinator = rig.coordinator(rounds=2)
    base = rig.model(0)

    coordinator.start()
    first = coordinator.wait_for_round(1, WAIT)
    second = coordinator.wait_for_round(2, WAIT)

    sent = {d: device_partial(d, base, schedule_for(1, 0)) for d in kit.fleet.devices}
    want_v1 = reference_model(kit.fleet, base, {d: p for d, (p, _) in sent.items()})
    # round 2 trains on v1, and every device carries its error-feedback residual over
    leaves = {d: device_partial(d, want_v1, schedule_for(2, 1), r)[0] for d, (_, r) in sent.items()}
    want_v2 = reference_model(kit.fleet, want_v1, leaves)
    assert first.ok and (first.contributors, first.dropped, first.rejected) == (6, 0, {})
    assert first.accepted == ("gw-1", "gw-2")
    assert rig.model(1).tobytes() == want_v1.tobytes()
    assert second.ok and (second.contributors, second.model_version) == (6, 2)
    assert rig.model(2).tobytes() == want_v2.tobytes()
    assert coordinator.weights.tobytes() == want_v2.tobytes()


def test_three_level_hierarchy_matches_the_flat_fold(
    amqtt_broker: AmqttBroker, stack: ExitStack, tmp_path: Path
) -> None:
    """coordinator > gw-1 > gw-1-2, two devices on each gateway.

    Float addition is not associative: gw-1 folds (dev-1-01, dev-1-02, gw-1-2's partial),
    which is ((a + b) + (c + d)), while a flat fold of the same four updates is
    (((a + b) + c) + d). So the hierarchical model equals the flat one only within
    float32 rounding, and it equals, bit for bit, the in-process fold of the same tree in
    the same order.
    """
    kit = build_fleet(simple_layout(1, 2, depth=2))
    rig = Rig(kit, amqtt_broker.url, tmp_path / "state", stack).all()
    coordinator = rig.coordinator()
    base = rig.model(0)

    coordinator.start()
    record = coordinator.wait_for_round(1, WAIT)

    leaves = {d: device_partial(d, base, schedule_for(1, 0))[0] for d in kit.fleet.devices}
    flat = server_step(base, {"gw-1": over_the_wire(fold_sorted(leaves.items(), SPEC.size))})
    tree = reference_model(kit.fleet, base, leaves)
    got = coordinator.weights
    assert record.ok and (record.contributors, record.dropped) == (4, 0)
    assert got.tobytes() == tree.tobytes()
    np.testing.assert_allclose(got, flat, rtol=1e-6, atol=1e-7)


def test_a_killed_gateway_is_dropped_and_its_devices_return_with_a_new_one(
    amqtt_broker: AmqttBroker, stack: ExitStack, tmp_path: Path
) -> None:
    kit = build_fleet(simple_layout(2, 2))
    rig = Rig(kit, amqtt_broker.url, tmp_path / "state", stack)
    rig.gateway("gw-1")
    port = free_port()  # outside the ephemeral range: its devices reconnect to it meanwhile
    doomed = rig.gateway("gw-2", listen_port=port)
    for dev in kit.fleet.gateways["gw-1"].devices:
        rig.device(dev)
    for dev in kit.fleet.gateways["gw-2"].devices:
        rig.device(dev, trainer=SlowTrainer(1.0))  # gw-2 cannot finish before it is killed
    # round 2 opens 5 s after round 1, after round 1's 3 s deadline and the restart below
    coordinator = rig.coordinator(rounds=2, round_timeout=3.0, interval=5.0)

    coordinator.start()
    wait_until(lambda: doomed.open_round == 1, WAIT)
    doomed.stop()
    first = coordinator.wait_for_round(1, WAIT)
    rig.gateway("gw-2", listen_port=port)
    second = coordinator.wait_for_round(2, WAIT)

    lost = sorted(kit.fleet.gateways["gw-2"].devices)
    assert 1 not in doomed.metrics and 1 not in doomed.partials
    assert first.ok and first.accepted == ("gw-1",)
    assert (first.contributors, first.dropped) == (2, len(lost))
    assert second.ok and second.accepted == ("gw-1", "gw-2")
    assert (second.contributors, second.dropped) == (4, 0)
    assert all(rig.devices[d].wait_for_round(2, WAIT).error == "" for d in lost)


def _coordinator_command(kit_dir: Path, broker_url: str, state: Path, **flags: object) -> list[str]:
    args = [
        sys.executable, "-m", "coordinator", "--broker", broker_url,
        "--fleet-file", str(kit_dir / "fleet.json"), "--key", str(kit_dir / "coordinator.key"),
        "--state-dir", str(state), "--layers", ",".join(map(str, LAYERS)), "--codec", "ternary",
        "--seed", str(SEED), "--epochs", str(TRAIN.epochs), "--batch-size", str(TRAIN.batch_size),
        "--lr", str(TRAIN.lr),
        # exact partials and full models: the tests check the reference fold bit for bit
        "--partial-codec", "float32", "--downlink", "full",
    ]  # fmt: skip
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


class Process:
    """A subprocess that is killed (and reaped) at the end of the test whatever happens."""

    def __init__(self, args: list[str], stack: ExitStack) -> None:
        self.popen = subprocess.Popen(
            args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        stack.callback(self.kill)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=WAIT)


def _model_of_round(inbox: Inbox, kit: FleetKit, round: int) -> GlobalModel:
    keys = {COORDINATOR: kit.fleet.coordinator_key}

    def open_model(data: bytes) -> Any:
        return open_envelope(data, keys, fleet=kit.fleet.fleet, kinds=(Kind.MODEL,))

    env = open_model(inbox.wait_for(lambda m: open_model(m.payload).round == round, WAIT).payload)
    return GlobalModel.from_body(env.body)


def test_command_killed_between_rounds_resumes_at_the_next_round_with_the_saved_model(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, stack: ExitStack, tmp_path: Path
) -> None:
    kit = build_fleet(simple_layout(1, 2))
    write_fleet(kit, tmp_path / "kit")
    state = tmp_path / "state"
    rig = Rig(kit, amqtt_broker.url, state, stack).all()
    models = Inbox()
    make_transport(amqtt_broker.url, "watcher").subscribe(
        topics.global_model(kit.fleet.fleet), models
    )
    # rounds close in well under a second; the interval leaves a gap to kill it in
    args = _coordinator_command(
        tmp_path / "kit", amqtt_broker.url, state, rounds=3, round_timeout=5, interval=2.5
    )

    first = Process(args, stack)
    wait_until(lambda: (state / "rounds" / "2.json").exists(), WAIT)
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(timeout=WAIT)
    assert StateStore(state).round_numbers() == [1, 2]
    saved = rig.model(2)
    models.messages.clear()
    second = Process(args, stack)
    resumed = _model_of_round(models, kit, 3)
    code = second.popen.wait(timeout=WAIT)

    record = StateStore(state).load_round(3)
    assert code == 0
    assert resumed.weights.tobytes() == saved.tobytes()
    assert record.ok and record.base_version == 2 and record.model_version == 3
    assert record.contributors == 2


def test_command_killed_mid_round_runs_the_open_round_again_to_completion(
    amqtt_broker: AmqttBroker, stack: ExitStack, tmp_path: Path
) -> None:
    """Killed while gw-1 still collects round 1: the restarted coordinator opens round 1
    again on v0 and closes it with gw-1's partial, the same bits as the in-process fold.

    The re-issued schedule has the same round and a later deadline, so the gateway and
    the devices take it as new and run round 1 again.
    """
    kit = build_fleet(simple_layout(1, 2))
    write_fleet(kit, tmp_path / "kit")
    state = tmp_path / "state"
    rig = Rig(kit, amqtt_broker.url, state, stack)
    gateway = rig.gateway("gw-1")
    for dev in kit.fleet.devices:
        rig.device(dev, trainer=SlowTrainer(2.5))  # round 1 stays open while it restarts
    args = _coordinator_command(
        tmp_path / "kit", amqtt_broker.url, state, rounds=1, round_timeout=5
    )

    first = Process(args, stack)
    wait_until(lambda: gateway.open_round == 1, WAIT)
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(timeout=WAIT)
    assert StateStore(state).round_numbers() == []
    base = rig.model(0)
    second = Process(args, stack)
    code = second.popen.wait(timeout=WAIT)

    record = StateStore(state).load_round(1)
    leaves = {d: device_partial(d, base, schedule_for(1, 0))[0] for d in kit.fleet.devices}
    assert code == 0
    assert record.ok and record.base_version == 0 and record.contributors == 2
    assert rig.model(1).tobytes() == reference_model(kit.fleet, base, leaves).tobytes()


def test_a_gateway_that_reported_before_the_kill_takes_part_in_the_rerun_round(
    amqtt_broker: AmqttBroker, stack: ExitStack, tmp_path: Path
) -> None:
    kit = build_fleet(simple_layout(2, 2))
    write_fleet(kit, tmp_path / "kit")
    state = tmp_path / "state"
    rig = Rig(kit, amqtt_broker.url, state, stack)
    fast = rig.gateway("gw-1")
    rig.gateway("gw-2")
    for dev in kit.fleet.gateways["gw-1"].devices:
        rig.device(dev)
    for dev in kit.fleet.gateways["gw-2"].devices:
        rig.device(dev, trainer=SlowTrainer(1.5))  # the coordinator waits for gw-2
    args = _coordinator_command(
        tmp_path / "kit", amqtt_broker.url, state, rounds=1, round_timeout=4
    )

    first = Process(args, stack)
    fast.wait_for_round(1, WAIT)  # gw-1's partial is out, the coordinator still waits
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(timeout=WAIT)
    assert StateStore(state).round_numbers() == []
    second = Process(args, stack)
    code = second.popen.wait(timeout=WAIT)

    record = StateStore(state).load_round(1)
    assert code == 0
    assert record.ok and record.contributors == 4


# -- training kernels over MQTT ------------------------------------------------------------

# The shipped kernel plus a custom section: a valid kernel that trains the same, under
# another SHA-256, so a switch shows in what each device reports it trained with.
VARIANT_KERNEL = packaged_kernel() + b"\x00\x09\x08tern-alt"


def test_publishing_a_new_kernel_switches_the_fleet_without_restarting_a_device(
    amqtt_broker: AmqttBroker, stack: ExitStack, tmp_path: Path
) -> None:
    kit = build_fleet(simple_layout(2, 2))
    rig = Rig(kit, amqtt_broker.url, tmp_path / "state", stack).all()
    coordinator = rig.coordinator(rounds=2, interval=3.0)  # time to switch between rounds
    shipped = coordinator.kernel.sha256

    coordinator.start()
    first = coordinator.wait_for_round(1, WAIT)
    switched = coordinator.publish_kernel(VARIANT_KERNEL)
    second = coordinator.wait_for_round(2, WAIT)

    assert switched.sha256 == hashlib.sha256(VARIANT_KERNEL).hexdigest() != shipped
    assert (first.kernel, second.kernel) == (shipped, switched.sha256)
    assert first.ok and second.ok and second.contributors == len(kit.fleet.devices)
    for dev, agent in rig.devices.items():
        used = (agent.wait_for_round(1, WAIT).kernel, agent.wait_for_round(2, WAIT).kernel)
        assert used == (shipped, switched.sha256), dev


def test_devices_that_cannot_train_are_reported_by_reason_in_the_coordinators_metrics(
    amqtt_broker: AmqttBroker, stack: ExitStack, tmp_path: Path, make_transport: MakeTransport
) -> None:
    kit = build_fleet(simple_layout(2, 2))
    rig = Rig(kit, amqtt_broker.url, tmp_path / "state", stack)
    rig.gateway("gw-1")
    rig.gateway("gw-2")
    for dev in kit.fleet.gateways["gw-1"].devices:
        rig.device(dev, trainer=SlowTrainer(0.0))  # pinned: trains whatever the schedule says
    for dev in kit.fleet.gateways["gw-2"].devices:
        rig.device(dev)  # the fleet's kernel, with a budget far too small below
    metrics = Inbox()
    make_transport(amqtt_broker.url, "dashboard").subscribe(
        topics.metrics(kit.fleet.fleet, COORDINATOR), metrics
    )
    coordinator = rig.coordinator(kernel_fuel=1_000, round_timeout=10.0)

    coordinator.start()
    record = coordinator.wait_for_round(1, WAIT)

    assert record.ok and record.contributors == 2 and record.dropped == 2
    assert record.failed == {"kernel_fuel": 2} and record.rejected == {}
    assert record.round_seconds < 10.0  # every participant settled: no wait for the deadline
    shown = RoundMetrics.from_json(metrics.wait_for(timeout=WAIT).payload)
    assert shown.failed == {"kernel_fuel": 2}
    gw2 = rig.gateways["gw-2"].wait_for_round(1, WAIT)
    assert (gw2.contributors, gw2.failed) == (0, {"kernel_fuel": 2})


def test_a_tampered_kernel_on_an_open_downstream_broker_is_refused_and_reported_upstream(
    amqtt_broker: AmqttBroker, stack: ExitStack, tmp_path: Path, make_transport: MakeTransport
) -> None:
    """Someone on the factory floor overwrites the relayed kernel on a downstream broker
    with no access policy: the devices refuse it, say why, and the coordinator counts them."""
    kit = build_fleet(simple_layout(1, 2))
    open_broker = stack.enter_context(EmbeddedBroker("127.0.0.1", 0))
    rig = Rig(kit, amqtt_broker.url, tmp_path / "state", stack)
    rig.gateway("gw-1", downstream_url=open_broker.url)
    for dev in kit.fleet.devices:
        rig.device(dev)
    coordinator = rig.coordinator(rounds=2, interval=3.0)
    digest = hashlib.sha256(VARIANT_KERNEL).hexdigest()
    relayed = Inbox()
    attacker = make_transport(open_broker.url, "attacker")
    attacker.subscribe(topics.kernel(kit.fleet.fleet, digest), relayed)

    coordinator.start()
    assert coordinator.wait_for_round(1, WAIT).ok
    coordinator.publish_kernel(VARIANT_KERNEL)
    relayed.wait_for(timeout=WAIT)  # the genuine kernel reached the gateway's broker
    forged = seal_kernel(KernelFile(ABI_VERSION, VARIANT_KERNEL), kit.fleet.fleet, kit.keys["gw-1"])
    attacker.publish(topics.kernel(kit.fleet.fleet, digest), forged, retain=True, wait=True)
    second = coordinator.wait_for_round(2, WAIT)

    assert not second.ok and second.contributors == 0
    assert second.failed == {"kernel_bad_signature": 2}
    assert all(
        a.wait_for_round(2, WAIT).reason == "kernel_bad_signature" for a in rig.devices.values()
    )


def test_the_gateway_broker_drops_a_device_s_forged_kernel_and_counts_it_in_the_metrics(
    amqtt_broker: AmqttBroker, stack: ExitStack, tmp_path: Path, make_transport: MakeTransport
) -> None:
    kit = build_fleet(simple_layout(1, 2))
    rig = Rig(kit, amqtt_broker.url, tmp_path / "state", stack).all()
    coordinator = rig.coordinator(rounds=2, interval=3.0)
    digest = hashlib.sha256(VARIANT_KERNEL).hexdigest()
    downstream = rig.gateways["gw-1"].downstream_url
    relayed = Inbox()
    # A compromised device: the attacker holds dev-1-01, its login and its client id.
    rig.devices["dev-1-01"].stop()
    client_id = sorted(kit.fleet.client_ids("dev-1-01"))[0]
    attacker = make_transport(downstream, client_id, login=kit.login("dev-1-01"))
    attacker.subscribe(topics.kernel(kit.fleet.fleet, digest), relayed)

    coordinator.start()
    assert coordinator.wait_for_round(1, WAIT).ok
    coordinator.publish_kernel(VARIANT_KERNEL)
    relayed.wait_for(timeout=WAIT)
    forged = seal_kernel(KernelFile(ABI_VERSION, VARIANT_KERNEL), kit.fleet.fleet, kit.keys["gw-1"])
    attacker.publish(topics.kernel(kit.fleet.fleet, digest), forged, retain=True, wait=True)
    second = coordinator.wait_for_round(2, WAIT)

    assert second.ok and second.contributors == 1 and second.failed == {}  # dev-1-02
    assert len(relayed.messages) == 1  # the forged copy never reached a subscriber
    gateway = rig.gateways["gw-1"]
    assert gateway.wait_for_round(2, WAIT).rejected == {"access_publish_denied": 1}
    assert gateway.access_refused == {"publish_denied": 1}
