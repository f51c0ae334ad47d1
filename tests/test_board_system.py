"""An ESP32 board in the whole system, over real MQTT on loopback.

A real Coordinator, a real Gateway (its own embedded broker, the board registered in its
boards file) and real DeviceAgents train; the gateway derives the board's int8 model from
each new global model; the board is the real firmware (firmware/esp32) running under
CPython with umqtt.simple from PyPI (firmware.sim). Its telemetry and status reach the
coordinator's broker through the gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from broker.embedded import EmbeddedBroker
from broker.errors import ConnectRefused
from broker.urls import parse_url
from coordinator import Coordinator, CoordinatorConfig
from device.agent import DeviceAgent
from device.trainer import NumpyTrainer
from firmware.config import board_config, replay_sensor
from firmware.errors import DepsUnavailable
from firmware.sim import SimulatedBoard
from gateway import Gateway, GatewayConfig
from gateway.boards import BoardEntry, Boards, new_board_entry, save_boards
from kernels.reference import mlp_spec
from tern import topics
from tern.codecs import CodecName
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER
from tern.mcu import infer, open_mcu, quantize, quantize_window, seal_mcu
from tern.messages import TrainConfig
from tern.reports import Status, Telemetry
from tests.fleet_fixtures import build_fleet, device_data, simple_layout
from tests.helpers import unavailable
from tests.mqtt_fixtures import AmqttBroker, Inbox, MakeTransport, listen

LAYERS = (8, 6, 3)
SPEC = mlp_spec(LAYERS)
TRAIN = TrainConfig(epochs=1, batch_size=8, lr=0.1)
BOARD = "esp-1"
WAIT = 20.0


class Plant:
    """Coordinator, one gateway with two devices and one registered board."""

    def __init__(
        self, broker: AmqttBroker, tmp: Path, stack: ExitStack, downstream_url: str | None = None
    ) -> None:
        self.kit = build_fleet(simple_layout(1, 2))
        self.fleet = self.kit.fleet.fleet
        self.tmp, self.stack = tmp, stack
        self.entry: BoardEntry = new_board_entry(BOARD)
        boards_file = tmp / "boards.json"
        save_boards(boards_file, Boards(self.fleet, "gw-1", {BOARD: self.entry}))
        config = GatewayConfig(
            "gw-1",
            broker.url,
            listen_port=0,
            margin=0.3,
            backoff_min=0.05,
            backoff_max=0.3,
            boards_file=str(boards_file),
            downstream_url=downstream_url,
            login=self.kit.logins["gw-1"],
        )
        self.gateway = Gateway(config, self.kit.fleet, self.kit.keys["gw-1"])
        stack.callback(self.gateway.stop)
        self.gateway.start()
        self.coordinator = Coordinator(
            CoordinatorConfig(
                broker_url=broker.url,
                state_dir=tmp / "state",
                layers=LAYERS,
                codec=CodecName.TERNARY,
                rounds=1,
                round_timeout=10.0,
                seed=7,
                train=TRAIN,
                login=self.kit.logins[COORDINATOR],
            ),
            self.kit.fleet,
            self.kit.coordinator_key,
        )
        stack.callback(self.coordinator.stop)
        rng = np.random.default_rng(3)
        self.windows = [quantize_window(rng.normal(0, 1, LAYERS[0]), 5) for _ in range(16)]
        self.windows_file = tmp / "windows.txt"
        self.windows_file.write_text("".join(",".join(map(str, w)) + "\n" for w in self.windows))

    def start_devices(self) -> None:
        for dev in self.kit.fleet.devices:
            x, y = device_data(dev)
            agent = DeviceAgent(
                dev,
                self.kit.fleet,
                self.kit.keys[dev],
                self.gateway.downstream_url,
                x,
                y,
                trainer=NumpyTrainer(),
                join_current_round=True,  # the round opened before the devices came up
                backoff_min=0.05,
                backoff_max=0.3,
                rng=np.random.default_rng(2),
                login=self.kit.logins[dev],
            )
            self.stack.callback(agent.stop)
            agent.start()

    def board(self, store: Path) -> SimulatedBoard:
        host, port, _ = parse_url(self.gateway.downstream_url)
        config = board_config(
            fleet=self.fleet,
            device=BOARD,
            key=self.entry.key,
            host=host,
            port=port,
            mqtt_user=self.entry.mqtt_user,
            mqtt_password=self.entry.mqtt_password,
            sensor=replay_sensor(),
            rate_hz=20,
        )
        try:
            sim = SimulatedBoard(config, self.windows_file, work_dir=store)
        except DepsUnavailable as exc:
            unavailable(f"umqtt.simple is not cached and PyPI is unreachable: {exc}")
        self.stack.callback(lambda: sim.stop() if sim.running else None)
        return sim.start()


@pytest.fixture
def plant(amqtt_broker: AmqttBroker, tmp_path: Path) -> Iterator[Plant]:
    with ExitStack() as stack:
        yield Plant(amqtt_broker, tmp_path, stack)


def _reports(inbox: Inbox) -> list[Telemetry]:
    return [Telemetry.from_json(m.payload) for m in inbox.messages]


def test_after_a_round_the_board_runs_the_new_model_and_its_telemetry_reaches_the_top(
    plant: Plant, amqtt_broker: AmqttBroker, make_transport: MakeTransport, tmp_path: Path
) -> None:
    telemetry = listen(make_transport, amqtt_broker.url, topics.telemetry(plant.fleet, BOARD), "t")
    board = plant.board(tmp_path / "board")
    plant.coordinator.start()
    assert board.wait_until(lambda b: b.model_version == 0, WAIT), board.stats
    first = telemetry.wait_for(lambda m: Telemetry.from_json(m.payload).model_version == 0, WAIT)
    assert Telemetry.from_json(first.payload).device == BOARD

    plant.start_devices()
    record = plant.coordinator.wait_for_round(1, WAIT)

    assert record.ok and record.model_version > record.base_version
    new = record.model_version
    assert board.wait_until(lambda b: b.model_version == new, WAIT), board.stats
    report = telemetry.wait_for(lambda m: Telemetry.from_json(m.payload).model_version == new, WAIT)
    assert Telemetry.from_json(report.payload).device == BOARD
    # the board's model is the gateway's int8 derivation of the round's global model
    expected = quantize(SPEC, plant.coordinator.weights, new, run=plant.coordinator.run)
    for window in plant.windows:
        label, logits, exp, _ = board.board.model.infer(window)
        reference = infer(expected, window)
        assert (label, tuple(logits), exp) == (reference.label, reference.logits, reference.exp)
    assert board.stats["accepted"] == 2  # the initial model, then the round's
    assert board.stats["rejected"] == {}


def test_a_tampered_model_is_refused_and_the_last_good_one_stays_even_after_a_reboot(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, tmp_path: Path, stack: ExitStack
) -> None:
    # Downstream, a broker with no access policy (as an external one may be): anyone on
    # the floor network can publish on the board's model topic, and only its key stands.
    open_broker = stack.enter_context(EmbeddedBroker("127.0.0.1", 0))
    plant = Plant(amqtt_broker, tmp_path, stack, downstream_url=open_broker.url)
    status = listen(make_transport, amqtt_broker.url, topics.status(plant.fleet, BOARD), "s")
    telemetry = listen(make_transport, amqtt_broker.url, topics.telemetry(plant.fleet, BOARD), "t")
    store = tmp_path / "board"
    board = plant.board(store)
    plant.coordinator.start()
    plant.start_devices()
    good = plant.coordinator.wait_for_round(1, WAIT).model_version
    assert board.wait_until(lambda b: b.model_version == good, WAIT), board.stats
    attacker = make_transport(open_broker.url, "someone-on-the-floor")
    forged_key = bytes(32)  # not the board's key
    zeros = np.zeros(SPEC.size, np.float32)
    forged = quantize(SPEC, zeros, good + 1, run=plant.coordinator.run).to_bytes()

    attacker.publish(
        topics.mcu_model(plant.fleet, BOARD),
        seal_mcu(forged, forged_key, plant.fleet, BOARD),
        retain=True,
        wait=True,
    )

    assert board.wait_until(lambda b: b.stats["rejected"].get("bad_mac") == 1, WAIT)
    assert board.model_version == good
    refused = status.wait_for(
        lambda m: Status.from_json(m.payload).detail == "model refused: bad_mac", WAIT
    )
    assert Status.from_json(refused.payload).state == "online"
    seen = len(telemetry.messages)
    assert board.wait_until(lambda b: len(telemetry.messages) >= seen + 3, WAIT)
    assert {r.model_version for r in _reports(telemetry)[seen:]} == {good}

    # a reboot: the forged message is still retained on the broker, the stored model wins
    board.stop(timeout=5)
    rebooted = plant.board(store)
    assert rebooted.wait_until(lambda b: b.stats["rejected"].get("bad_mac") == 1, WAIT)
    assert rebooted.model_version == good
    assert rebooted.wait_until(lambda b: b.stats["telemetry"] >= 2, WAIT)


def test_the_gateway_broker_keeps_strangers_off_the_board_topics(
    plant: Plant, amqtt_broker: AmqttBroker, make_transport: MakeTransport, tmp_path: Path
) -> None:
    telemetry = listen(make_transport, amqtt_broker.url, topics.telemetry(plant.fleet, BOARD), "t")
    board = plant.board(tmp_path / "board")
    plant.coordinator.start()
    plant.start_devices()
    good = plant.coordinator.wait_for_round(1, WAIT).model_version
    assert board.wait_until(lambda b: b.model_version == good, WAIT), board.stats
    down = plant.gateway.downstream_url
    # Logged in, but not as the board: the observer (a dashboard's login) may read, not post.
    stranger = make_transport(down, "someone-on-the-floor", login=plant.kit.login(OBSERVER))
    zeros = np.zeros(SPEC.size, np.float32)
    forged = quantize(SPEC, zeros, good + 1, run=plant.coordinator.run).to_bytes()
    fake = Telemetry(BOARD, good, 0, 0, 1.0, 1).to_json()

    stranger.publish(
        topics.mcu_model(plant.fleet, BOARD),
        seal_mcu(forged, bytes(32), plant.fleet, BOARD),
        retain=True,
        wait=True,
    )
    stranger.publish(topics.telemetry(plant.fleet, BOARD), fake, wait=True)
    with pytest.raises(ConnectRefused):  # its client id is the board's
        make_transport(down, BOARD, login=plant.kit.login(OBSERVER), backoff_max=0.05)
    with pytest.raises(ConnectRefused):  # no login at all
        make_transport(down, "anyone", backoff_max=0.05)
    with pytest.raises(ConnectRefused):
        make_transport(down, "guess", login=(plant.entry.mqtt_user, "not-the-password"))

    seen = len(telemetry.messages)
    assert board.wait_until(lambda b: len(telemetry.messages) >= seen + 3, WAIT)
    assert fake not in [m.payload for m in telemetry.messages]
    assert board.stats["rejected"] == {} and board.model_version == good
    refused = plant.gateway.access_refused
    assert refused == {
        "publish_denied": 2,
        "client_id_reserved": 1,
        "anonymous": 1,
        "bad_password": 1,
    }
    # the genuine model is still the retained one
    late = listen(
        make_transport,
        down,
        topics.mcu_model(plant.fleet, BOARD),
        "late",
        plant.kit.login(OBSERVER),
    )
    assert open_mcu(late.wait_for(timeout=WAIT).payload, plant.entry.key, plant.fleet, BOARD)
