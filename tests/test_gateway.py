"""Gateways against real brokers: the test plays the coordinator upstream, real devices below."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from device.agent import training_rng
from gateway import depth, expected_contributors
from kernels.wasm import WasmTrainer
from tern import topics
from tern.aggregate import Accumulator, Partial
from tern.codecs import CodecName, codec_for
from tern.envelope import Kind, open_envelope
from tern.fleet import COORDINATOR
from tern.messages import RoundSchedule, encode_update
from tern.reports import RoundMetrics, State, Status
from tests.fleet_fixtures import FleetRig, build_fleet, device_data, simple_layout, write_fleet
from tests.gateway_helpers import ONE, SEED, SPEC, TRAIN, WAIT, Coordinator, model_weights
from tests.helpers import first_line, wait_until
from tests.mqtt_fixtures import AmqttBroker, Inbox, MakeTransport, MosquittoBroker, RunningBroker

SHIPPED = WasmTrainer()  # what a device trains with when the schedule names no kernel
REPO = Path(__file__).resolve().parents[1]


def expected_update(
    device: str, version: int, codec: CodecName, residual: np.ndarray | None = None
) -> tuple[Partial, np.ndarray]:
    """Re-derive a device's update in-process: the same training, seeds and encoding."""
    x, y = device_data(device)
    w = model_weights(version)
    rng = training_rng(SEED, version, device)  # these tests open round r on model v = r
    delta = SHIPPED.train(SPEC, w, x, y, TRAIN, rng) - w  # devices train in Wasm by default
    n = x.shape[0]
    partial = Partial((delta * np.float32(n)).astype(np.float32), float(n), 1)
    update, new_residual = encode_update(codec_for(codec), SPEC, partial, residual)
    return update.check(SPEC).to_partial(), new_residual


def fold(parts: dict[str, Partial]) -> Partial:
    acc = Accumulator(SPEC.size)
    for sender in sorted(parts):
        acc.add(parts[sender])
    return acc.result()


def assert_same_bits(got: Partial, want: Partial) -> None:
    assert got.weighted_sum.tobytes() == want.weighted_sum.tobytes()
    assert (got.total_weight, got.count) == (want.total_weight, want.count)


def test_gateway_partial_is_the_fold_of_its_devices_updates(
    any_broker: RunningBroker, make_transport: MakeTransport, stack: ExitStack
) -> None:
    kit = build_fleet(ONE)
    coordinator = Coordinator(kit, make_transport(any_broker.url, "coord"))
    rig = FleetRig(kit, any_broker.url, stack)
    gateway = rig.gateway("gw-1")
    for dev in ONE["gw-1"][1]:
        rig.device(dev)

    coordinator.open_round(1, 1, seconds=5.0)
    metrics = gateway.wait_for_round(1, WAIT)
    got = coordinator.partial_from("gw-1", 1)

    want, residuals = {}, {}
    for dev in ONE["gw-1"][1]:
        want[dev], residuals[dev] = expected_update(dev, 1, CodecName.TERNARY)
    assert_same_bits(got, fold(want))
    assert (metrics.contributors, metrics.dropped, metrics.rejected) == (3, 0, {})
    published = RoundMetrics.from_json(coordinator.metrics.wait_for(timeout=WAIT).payload)
    assert published == metrics

    # Round 2: every device carries its error-feedback residual over.
    coordinator.partials.messages.clear()
    coordinator.open_round(2, 2, seconds=5.0)
    gateway.wait_for_round(2, WAIT)
    got = coordinator.partial_from("gw-1", 2)
    want = {d: expected_update(d, 2, CodecName.TERNARY, residuals[d])[0] for d in residuals}
    assert_same_bits(got, fold(want))


def test_gateway_folds_a_child_gateway_as_a_heavier_contributor(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, stack: ExitStack
) -> None:
    layout = simple_layout(1, 2, depth=2)  # gw-1 (dev-1-01, dev-1-02) > gw-1-2 (dev-1-2-..)
    kit = build_fleet(layout)
    coordinator = Coordinator(kit, make_transport(amqtt_broker.url, "coord"))
    rig = FleetRig(kit, amqtt_broker.url, stack)
    rig.gateway("gw-1")
    child = rig.gateway("gw-1-2")
    for dev in kit.fleet.devices:
        rig.device(dev)

    coordinator.open_round(1, 1, seconds=5.0, codec=CodecName.FLOAT16)
    parent_metrics = rig.gateways["gw-1"].wait_for_round(1, WAIT)
    got = coordinator.partial_from("gw-1", 1)

    child_part = fold({d: expected_update(d, 1, CodecName.FLOAT16)[0] for d in layout["gw-1-2"][1]})
    sealed = child.partials[1]
    assert (
        open_envelope(
            sealed,
            {"gw-1-2": kit.keys["gw-1-2"].verify_key},
            fleet=kit.fleet.fleet,
            kinds=(Kind.PARTIAL,),
        ).sender
        == "gw-1-2"
    )
    parts = {d: expected_update(d, 1, CodecName.FLOAT16)[0] for d in layout["gw-1"][1]}
    parts["gw-1-2"] = child_part
    assert_same_bits(got, fold(parts))
    assert got.count == 4
    assert (parent_metrics.contributors, parent_metrics.dropped) == (4, 0)
    assert depth(kit.fleet, "gw-1-2") == 2


def test_gateway_closes_at_its_deadline_without_a_killed_device(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, stack: ExitStack
) -> None:
    kit = build_fleet(ONE)
    coordinator = Coordinator(kit, make_transport(amqtt_broker.url, "coord"))
    rig = FleetRig(kit, amqtt_broker.url, stack)
    gateway = rig.gateway("gw-1")
    for dev in ONE["gw-1"][1]:
        rig.device(dev)
    rig.devices["dev-03"].stop()

    start = time.monotonic()
    coordinator.open_round(1, 1, seconds=1.5)
    metrics = gateway.wait_for_round(1, WAIT)
    elapsed = time.monotonic() - start

    assert (metrics.contributors, metrics.dropped) == (2, 1)
    assert 1.0 <= elapsed < 1.5 + 2.0  # closes at deadline - margin, not before
    got = coordinator.partial_from("gw-1", 1)
    want = {d: expected_update(d, 1, CodecName.TERNARY)[0] for d in ("dev-01", "dev-02")}
    assert_same_bits(got, fold(want))

    # The device comes back and takes part in the next round.
    rig.device("dev-03")
    coordinator.open_round(2, 2, seconds=5.0)
    metrics = gateway.wait_for_round(2, WAIT)
    assert (metrics.contributors, metrics.dropped) == (3, 0)


def test_device_rejoins_after_the_downstream_broker_restarts(
    amqtt_broker: AmqttBroker,
    mosquitto_broker: MosquittoBroker,
    make_transport: MakeTransport,
    stack: ExitStack,
) -> None:
    # Downstream on mosquitto: the gateway here uses an external broker, and stopping
    # amqtt with clients attached sometimes hung past 10 s here (a broker issue, reported).
    kit = build_fleet({"gw-1": (COORDINATOR, ["dev-01"])})
    coordinator = Coordinator(kit, make_transport(amqtt_broker.url, "coord"))
    downstream = mosquitto_broker
    rig = FleetRig(kit, amqtt_broker.url, stack)
    gateway = rig.gateway("gw-1", downstream_url=downstream.url)
    device = rig.device("dev-01")
    coordinator.open_round(1, 1, seconds=5.0)
    assert gateway.wait_for_round(1, WAIT).contributors == 1

    downstream.restart()
    assert gateway.downstream is not None
    down = gateway.downstream
    wait_until(lambda: down.stats.reconnects >= 1 and down.connected)
    wait_until(lambda: device.transport.stats.reconnects >= 1 and device.transport.connected)
    coordinator.open_round(2, 2, seconds=5.0)

    assert gateway.wait_for_round(2, WAIT).contributors == 1
    assert device.wait_for_round(2, WAIT).error == ""


def test_expected_contributors_counts_participants_below_each_child() -> None:
    kit = build_fleet(simple_layout(1, 2, depth=3))
    schedule = RoundSchedule(1, 1, CodecName.TERNARY, 0.0, 1, ("dev-1-01", "dev-1-3-02"))
    assert expected_contributors(kit.fleet, "gw-1", schedule) == {"dev-1-01": 1, "gw-1-2": 1}
    assert expected_contributors(kit.fleet, "gw-1-2", schedule) == {"gw-1-3": 1}
    everyone = RoundSchedule(1, 1, CodecName.TERNARY, 0.0, 1, None)
    assert expected_contributors(kit.fleet, "gw-1", everyone) == {
        "dev-1-01": 1,
        "dev-1-02": 1,
        "gw-1-2": 4,
    }
    assert [depth(kit.fleet, g) for g in ("gw-1", "gw-1-2", "gw-1-3")] == [1, 2, 3]


def test_gateway_command_serves_and_shuts_down_cleanly_on_sigterm(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, tmp_path: Path
) -> None:
    kit = build_fleet(ONE)
    fleet_file = write_fleet(kit, tmp_path)
    status = Inbox()
    watcher = make_transport(amqtt_broker.url, "watcher")
    watcher.subscribe(topics.status(kit.fleet.fleet, "gw-1"), status)
    argv = [
        sys.executable,
        "-m",
        "gateway",
        "--id",
        "gw-1",
        "--fleet-file",
        str(fleet_file),
        "--key",
        str(tmp_path / "gw-1.key"),
        "--upstream",
        amqtt_broker.url,
        "--listen",
        "127.0.0.1:0",
        "--margin",
        "0.2",
    ]
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}  # its default --state-dir
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, env=env
    )
    try:
        line = first_line(proc, WAIT)
        assert b"serving on mqtt://127.0.0.1:" in line, line
        status.wait_for(lambda m: Status.from_json(m.payload).state is State.ONLINE, WAIT)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        status.wait_for(lambda m: Status.from_json(m.payload).state is State.OFFLINE, WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_child_gateway_closes_before_its_parent_when_a_device_is_missing(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, stack: ExitStack
) -> None:
    layout = simple_layout(1, 2, depth=2)
    kit = build_fleet(layout)
    coordinator = Coordinator(kit, make_transport(amqtt_broker.url, "coord"))
    rig = FleetRig(kit, amqtt_broker.url, stack)
    parent = rig.gateway("gw-1")
    child = rig.gateway("gw-1-2")
    for dev in kit.fleet.devices:
        rig.device(dev)
    rig.devices["dev-1-2-02"].stop()

    # 3 s: both levels close at their deadlines minus margins; a shorter round left too
    # little time for three devices' updates on a loaded CI machine (seen once at load 6)
    coordinator.open_round(1, 1, seconds=3.0)
    child_metrics = child.wait_for_round(1, WAIT)
    parent_metrics = parent.wait_for_round(1, WAIT)

    assert (child_metrics.contributors, child_metrics.dropped) == (1, 1)
    assert (parent_metrics.contributors, parent_metrics.dropped) == (3, 1)
    assert coordinator.partial_from("gw-1", 1).count == 3
