"""A simulated board: the real firmware and umqtt.simple under CPython, on a real broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from firmware.config import board_config, replay_sensor
from firmware.errors import DepsUnavailable
from firmware.sim import SimulatedBoard
from kernels.reference import mlp_spec
from tern import topics
from tern.mcu import quantize, quantize_window, seal_mcu
from tern.reports import Status, Telemetry
from tests.helpers import unavailable
from tests.mqtt_fixtures import AmqttBroker, MakeTransport, listen

FLEET, DEVICE = "plant-7", "esp-1"
KEY = bytes(range(32))
SIZES = (40, 16, 10)
RUN = 1_767_225_600_000  # a coordinator's run: ms since the epoch


def _sealed_model(version: int, rng: np.random.Generator, run: int = RUN) -> bytes:
    spec = mlp_spec(SIZES)
    weights = rng.normal(0, 0.3, spec.size).astype(np.float32)
    return seal_mcu(quantize(spec, weights, version, run=run).to_bytes(), KEY, FLEET, DEVICE)


@pytest.fixture
def board(amqtt_broker: AmqttBroker, tmp_path: Path) -> Iterator[SimulatedBoard]:
    rng = np.random.default_rng(0)
    windows = tmp_path / "windows.txt"
    rows = [quantize_window(rng.normal(0, 1, SIZES[0]), 5) for _ in range(8)]
    windows.write_text("".join(",".join(map(str, row)) + "\n" for row in rows))
    config = board_config(
        fleet=FLEET, device=DEVICE, key=KEY, host=amqtt_broker.host, port=amqtt_broker.port,
        mqtt_user=DEVICE, mqtt_password="pw", sensor=replay_sensor(), rate_hz=20,
    )  # fmt: skip
    try:
        sim = SimulatedBoard(config, windows, work_dir=tmp_path / "store", rng=rng)
    except DepsUnavailable as exc:
        unavailable(f"umqtt.simple is not cached and PyPI is unreachable: {exc}")
    yield sim
    if sim.running:
        sim.stop()


def test_a_simulated_board_loads_its_model_and_sends_telemetry(
    board: SimulatedBoard, amqtt_broker: AmqttBroker, make_transport: MakeTransport
) -> None:
    rng = np.random.default_rng(1)
    telemetry = listen(make_transport, amqtt_broker.url, topics.telemetry(FLEET, DEVICE), "t")
    status = listen(make_transport, amqtt_broker.url, topics.status(FLEET, DEVICE), "s")
    gateway = make_transport(amqtt_broker.url, "gw")
    gateway.publish(topics.mcu_model(FLEET, DEVICE), _sealed_model(3, rng), retain=True, wait=True)

    board.start()

    assert board.wait_until(lambda b: b.stats["telemetry"] >= 2, timeout=10), board.stats
    report = Telemetry.from_json(telemetry.wait_for(timeout=5).payload)
    assert (report.device, report.model_version) == (DEVICE, 3)
    assert 0 <= report.label < SIZES[-1] and report.latency_us >= 0
    assert Status.from_json(status.wait_for(timeout=5).payload).state == "online"
    board.stop(timeout=5)
    offline = status.wait_for(lambda m: Status.from_json(m.payload).state == "offline", 5)
    assert Status.from_json(offline.payload).detail == "shutdown"
    assert not board.running


def test_a_tampered_model_is_refused_and_the_last_good_one_stays(
    board: SimulatedBoard, amqtt_broker: AmqttBroker, make_transport: MakeTransport
) -> None:
    rng = np.random.default_rng(2)
    gateway = make_transport(amqtt_broker.url, "gw")
    model_topic = topics.mcu_model(FLEET, DEVICE)
    gateway.publish(model_topic, _sealed_model(3, rng), retain=True, wait=True)
    board.start()
    assert board.wait_until(lambda b: b.model_version == 3, timeout=10), board.stats
    tampered = bytearray(_sealed_model(4, rng))
    tampered[20] ^= 1

    gateway.publish(model_topic, bytes(tampered), retain=True, wait=True)

    assert board.wait_until(lambda b: b.stats["rejected"].get("bad_mac") == 1, timeout=10)
    assert board.model_version == 3
    assert board.wait_until(lambda b: b.stats["telemetry"] >= 1, timeout=10)
    board.stop(timeout=5)


def test_a_simulated_board_takes_a_new_run_and_refuses_the_old_one_replayed(
    board: SimulatedBoard, amqtt_broker: AmqttBroker, make_transport: MakeTransport
) -> None:
    rng = np.random.default_rng(3)
    gateway = make_transport(amqtt_broker.url, "gw")
    model_topic = topics.mcu_model(FLEET, DEVICE)
    old_run = _sealed_model(30, rng, RUN - 1)
    gateway.publish(model_topic, old_run, retain=True, wait=True)
    board.start()
    assert board.wait_until(lambda b: b.model_order == (RUN - 1, 30), timeout=10), board.stats

    gateway.publish(model_topic, _sealed_model(0, rng), retain=True, wait=True)
    assert board.wait_until(lambda b: b.model_order == (RUN, 0), timeout=10), board.stats
    gateway.publish(model_topic, old_run, retain=True, wait=True)  # a replay

    assert board.wait_until(lambda b: b.stats["rejected"].get("stale") == 1, timeout=10)
    assert board.model_order == (RUN, 0) and board.stats["accepted"] == 2
    board.stop(timeout=5)


def test_a_board_with_no_broker_backs_off_and_stops_on_time(tmp_path: Path) -> None:
    windows = tmp_path / "w.txt"
    windows.write_text(",".join(["0"] * SIZES[0]) + "\n")
    from tests.mqtt_fixtures import free_port

    config = board_config(
        fleet=FLEET, device=DEVICE, key=KEY, host="127.0.0.1", port=free_port("127.0.0.1"),
        mqtt_user=DEVICE, mqtt_password="pw", sensor=replay_sensor(),
    )  # fmt: skip
    try:
        sim = SimulatedBoard(config, windows, rng=np.random.default_rng(0)).start()
    except DepsUnavailable as exc:
        unavailable(f"umqtt.simple is not cached and PyPI is unreachable: {exc}")

    assert not sim.wait_until(lambda b: b.stats["accepted"] > 0, timeout=0.5)
    sim.stop(timeout=2)
    assert not sim.running
