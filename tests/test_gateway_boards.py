"""A gateway serving ESP32 boards: sealed int8 models down, telemetry and status up.

Real brokers throughout: the test plays the coordinator upstream and the boards on the
gateway's own broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from broker.errors import ConnectRefused
from broker.transport import Message
from gateway import Gateway, GatewayConfig, GatewayError
from gateway.boards import BoardEntry, Boards, BoardsError, load_boards, save_boards
from kernels.reference import init_weights, mlp_spec
from tern import topics
from tern.envelope import Envelope, Kind, seal
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER
from tern.mcu import McuModel, open_mcu, quantize
from tern.messages import GlobalModel
from tern.reports import State, Status, Telemetry
from tern.spec import ModelSpec
from tests.boards_helpers import FLEET, KIT, entry, start_gateway
from tests.fleet_fixtures import write_fleet
from tests.helpers import first_line, wait_until
from tests.mqtt_fixtures import AmqttBroker, Inbox, MakeTransport, MosquittoBroker, listen

SPEC = mlp_spec([8, 6, 3])
WAIT = 10.0
QUIET = 0.5  # how long "nothing arrives" is watched for
REPO = Path(__file__).resolve().parents[1]
OBSERVER_LOGIN = KIT.login(OBSERVER)  # what a dashboard on a gateway's broker logs in with
RUN = 0  # the run this test's stand-in coordinator seals its models with


def weights(version: int) -> np.ndarray:
    return init_weights(SPEC, np.random.default_rng(version))


def publish_model(
    transport_url: str, make_transport: MakeTransport, version: int, spec: ModelSpec = SPEC
) -> None:
    """Seal and publish (retained) the global model `version`, as the coordinator does."""
    w = weights(version) if spec is SPEC else np.zeros(spec.size, dtype=np.float32)
    env = Envelope(Kind.MODEL, FLEET, version, version, COORDINATOR, GlobalModel(spec, w).to_body())
    coord = make_transport(transport_url, f"coord-{version}-{time.monotonic_ns()}")
    coord.publish(
        topics.global_model(FLEET), seal(env, KIT.coordinator_key), retain=True, wait=True
    )


def watch_mcu(make_transport: MakeTransport, url: str, board: str, client_id: str) -> Inbox:
    """What a dashboard logged in as the observer sees of `board`'s model topic."""
    return listen(make_transport, url, topics.mcu_model(FLEET, board), client_id, OBSERVER_LOGIN)


def board_model(inbox: Inbox, board: BoardEntry, device: str, version: int) -> McuModel:
    """The first sealed model for `device` of `version` that arrives in `inbox`."""

    def is_version(m: Message) -> bool:
        return open_mcu(m.payload, board.key, FLEET, device).model_version == version

    return open_mcu(inbox.wait_for(is_version, WAIT).payload, board.key, FLEET, device)


@pytest.fixture
def boards_file(tmp_path: Path) -> Path:
    path = tmp_path / "boards.json"
    save_boards(path, Boards(FLEET, "gw-1", {"esp-1": entry(1)}))
    return path


# -- models down -----------------------------------------------------------------------


def test_registered_board_gets_each_new_model_sealed_for_it(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, boards_file: Path, stack: ExitStack
) -> None:
    gateway = start_gateway(stack, amqtt_broker.url, boards_file)
    inbox = listen(
        make_transport,
        gateway.downstream_url,
        topics.mcu_model(FLEET, "esp-1"),
        "b1",
        OBSERVER_LOGIN,
    )

    publish_model(amqtt_broker.url, make_transport, 1)
    first = board_model(inbox, entry(1), "esp-1", 1)
    publish_model(amqtt_broker.url, make_transport, 2)
    second = board_model(inbox, entry(1), "esp-1", 2)

    assert first.to_bytes() == quantize(SPEC, weights(1), 1, run=RUN).to_bytes()
    assert second.to_bytes() == quantize(SPEC, weights(2), 2, run=RUN).to_bytes()
    assert all(m.retain is False for m in inbox.messages)  # live deliveries
    late = listen(
        make_transport,
        gateway.downstream_url,
        topics.mcu_model(FLEET, "esp-1"),
        "b2",
        OBSERVER_LOGIN,
    )
    retained = late.wait_for(timeout=WAIT)
    assert retained.retain and open_mcu(retained.payload, entry(1).key, FLEET, "esp-1") == second
    assert gateway.mcu_stats["models"] == 2


def test_unregistered_board_gets_nothing_and_its_telemetry_is_not_relayed(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, boards_file: Path, stack: ExitStack
) -> None:
    gateway = start_gateway(stack, amqtt_broker.url, boards_file)
    down = gateway.downstream_url
    stranger = watch_mcu(make_transport, down, "esp-9", "s")
    known = watch_mcu(make_transport, down, "esp-1", "k")
    upstream = listen(make_transport, amqtt_broker.url, topics.telemetry_all(FLEET), "up")

    publish_model(amqtt_broker.url, make_transport, 1)
    known.wait_for(timeout=WAIT)
    with pytest.raises(ConnectRefused):  # a board nobody registered has no login
        make_transport(down, "esp-9", login=("esp-9", "guess"), backoff_max=0.05)
    time.sleep(QUIET)

    assert stranger.messages == []
    assert upstream.messages == []
    assert gateway.access_refused == {"unknown_user": 1}


def test_a_board_added_by_reload_gets_the_current_model(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, boards_file: Path, stack: ExitStack
) -> None:
    gateway = start_gateway(stack, amqtt_broker.url, boards_file)
    added = listen(
        make_transport,
        gateway.downstream_url,
        topics.mcu_model(FLEET, "esp-2"),
        "b2",
        OBSERVER_LOGIN,
    )
    publish_model(amqtt_broker.url, make_transport, 3)
    wait_until(lambda: gateway.mcu_stats["models"] == 1)

    save_boards(boards_file, load_boards(boards_file).with_board("esp-2", entry(2)))
    boards = gateway.reload_boards()

    assert sorted(boards.boards) == ["esp-1", "esp-2"]
    model = board_model(added, entry(2), "esp-2", 3)
    assert model.to_bytes() == quantize(SPEC, weights(3), 3, run=RUN).to_bytes()


def test_a_reload_changes_which_boards_may_log_in(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, boards_file: Path, stack: ExitStack
) -> None:
    gateway = start_gateway(stack, amqtt_broker.url, boards_file)
    down = gateway.downstream_url

    def logs_in(board: str, e: BoardEntry) -> bool:
        try:
            make_transport(down, board, login=(e.mqtt_user, e.mqtt_password), backoff_max=0.05)
        except ConnectRefused:
            return False
        return True

    assert logs_in("esp-1", entry(1)) and not logs_in("esp-2", entry(2))

    save_boards(boards_file, Boards(FLEET, "gw-1", {"esp-2": entry(2)}))
    gateway.reload_boards()

    assert logs_in("esp-2", entry(2)) and not logs_in("esp-1", entry(1))
    assert gateway.access_refused == {"unknown_user": 2}


def test_a_bad_reload_keeps_the_boards_served_so_far(
    amqtt_broker: AmqttBroker, boards_file: Path, stack: ExitStack
) -> None:
    gateway = start_gateway(stack, amqtt_broker.url, boards_file)
    boards_file.write_text("{")

    with pytest.raises(BoardsError):
        gateway.reload_boards()

    save_boards(boards_file, Boards(FLEET, "gw-1", {"esp-3": entry(3)}))
    assert sorted(gateway.reload_boards().boards) == ["esp-3"]


def test_a_model_that_is_not_an_mlp_is_skipped_and_the_last_one_stays(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, boards_file: Path, stack: ExitStack
) -> None:
    gateway = start_gateway(stack, amqtt_broker.url, boards_file)
    publish_model(amqtt_broker.url, make_transport, 1)
    wait_until(lambda: gateway.mcu_stats["models"] == 1)

    publish_model(amqtt_broker.url, make_transport, 2, ModelSpec.of({"conv": (3, 3, 2)}))
    wait_until(lambda: gateway.mcu_stats["model_skipped"] == 1)

    late = listen(
        make_transport,
        gateway.downstream_url,
        topics.mcu_model(FLEET, "esp-1"),
        "l",
        OBSERVER_LOGIN,
    )
    kept = open_mcu(late.wait_for(timeout=WAIT).payload, entry(1).key, FLEET, "esp-1")
    assert kept.model_version == 1
    assert gateway.mcu_stats["models"] == 1


def test_boards_get_their_model_again_after_the_downstream_broker_restarts(
    amqtt_broker: AmqttBroker,
    mosquitto_broker: MosquittoBroker,
    make_transport: MakeTransport,
    boards_file: Path,
    stack: ExitStack,
) -> None:
    # Downstream on mosquitto, as in test_gateway: it restarts cleanly with clients attached.
    gateway = start_gateway(stack, amqtt_broker.url, boards_file, mosquitto_broker.url)
    publish_model(amqtt_broker.url, make_transport, 1)
    wait_until(lambda: gateway.mcu_stats["models"] == 1)

    mosquitto_broker.restart()  # a fresh broker: no retained messages
    wait_until(lambda: gateway.mcu_stats["models"] == 2)

    late = listen(make_transport, mosquitto_broker.url, topics.mcu_model(FLEET, "esp-1"), "l")
    again = open_mcu(late.wait_for(timeout=WAIT).payload, entry(1).key, FLEET, "esp-1")
    assert again.model_version == 1


# -- reports up ------------------------------------------------------------------------


def test_board_telemetry_and_status_are_relayed_upstream_and_malformed_ones_dropped(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, boards_file: Path, stack: ExitStack
) -> None:
    gateway = start_gateway(stack, amqtt_broker.url, boards_file)
    up_telemetry = listen(make_transport, amqtt_broker.url, topics.telemetry_all(FLEET), "t")
    up_status = listen(make_transport, amqtt_broker.url, topics.status(FLEET, "esp-1"), "s")
    login = (entry(1).mqtt_user, entry(1).mqtt_password)
    board = make_transport(gateway.downstream_url, "esp-1", login=login)
    good = Telemetry("esp-1", 1, 7, 3, 0.75, 5120).to_json()
    online = Status("esp-1", "board", State.ONLINE, "0.1.0").to_json()
    topic = topics.telemetry(FLEET, "esp-1")

    board.publish(topic, b"{not json", qos=0)
    board.publish(topic, Telemetry("esp-2", 1, 7, 3, 0.75, 5120).to_json(), qos=0)  # posing
    board.publish(topic, good, qos=0)
    board.publish(topics.status(FLEET, "esp-1"), b"{}", retain=True, wait=True)
    board.publish(topics.status(FLEET, "esp-1"), online, retain=True, wait=True)

    assert up_telemetry.wait_for(timeout=WAIT).payload == good
    assert up_status.wait_for(lambda m: m.payload == online, WAIT)
    wait_until(lambda: gateway.mcu_stats["status"] == 1)
    assert [m.payload for m in up_telemetry.messages] == [good]
    stats = gateway.mcu_stats
    assert (stats["telemetry"], stats["telemetry_malformed"], stats["status_malformed"]) == (
        1,
        2,
        1,
    )
    retained = listen(make_transport, amqtt_broker.url, topics.status(FLEET, "esp-1"), "late")
    assert retained.wait_for(timeout=WAIT).payload == online


# -- the command line ------------------------------------------------------------------


def test_gateway_command_serves_boards_and_rereads_them_on_sighup(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, tmp_path: Path, boards_file: Path
) -> None:
    fleet_file = write_fleet(KIT, tmp_path / "fleet")
    argv = [
        sys.executable,
        "-m",
        "gateway",
        "--id",
        "gw-1",
        "--fleet-file",
        str(fleet_file),
        "--key",
        str(tmp_path / "fleet" / "gw-1.key"),
        "--upstream",
        amqtt_broker.url,
        "--listen",
        "127.0.0.1:0",
        "--boards",
        str(boards_file),
        "--mcu-in-exp",
        "4",
        "--state-dir",
        str(tmp_path / "state"),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        line = first_line(proc, WAIT)
        assert b"serving on " in line, line
        down = line.decode().split("serving on ")[1].strip()
        publish_model(amqtt_broker.url, make_transport, 5)
        first = watch_mcu(make_transport, down, "esp-1", "b1")
        assert board_model(first, entry(1), "esp-1", 5).in_exp == 4

        save_boards(boards_file, load_boards(boards_file).with_board("esp-2", entry(2)))
        os.kill(proc.pid, signal.SIGHUP)
        added = watch_mcu(make_transport, down, "esp-2", "b2")

        assert board_model(added, entry(2), "esp-2", 5) == quantize(SPEC, weights(5), 5, 4, run=RUN)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_gateway_without_boards_file_has_none_to_reload(
    amqtt_broker: AmqttBroker, stack: ExitStack
) -> None:
    config = GatewayConfig("gw-1", amqtt_broker.url, listen_port=0, login=KIT.logins["gw-1"])
    gateway = Gateway(config, KIT.fleet, KIT.keys["gw-1"])
    stack.callback(gateway.stop)
    gateway.start()

    with pytest.raises(GatewayError, match="without a boards file"):
        gateway.reload_boards()
    assert gateway.mcu_stats == {}
