"""`tern health`, the containers' healthcheck: a broker that answers MQTT (refusing an
anonymous CONNECT counts), a component's established connection, a component's status.
Real brokers on free loopback ports, real sockets, the real kernel table."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.fleet_access import broker_policy
from broker.health import HealthError, check, established_to, main
from broker.mosquitto import free_port
from tern.fleet import COORDINATOR
from tern.logins import Login
from tests.fleet_fixtures import build_fleet, write_fleet


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, Path]]:
    """A broker with a fleet's rights: anonymous clients are refused."""
    kit = build_fleet({"gw-1": (COORDINATOR, ["dev-01"])}, "health-fleet")
    write_fleet(kit, tmp_path)
    broker = EmbeddedBroker(port=0, access=AccessControl(broker_policy(kit.fleet, COORDINATOR)))
    broker.start()
    yield broker, tmp_path
    broker.stop()


def test_a_broker_refusing_an_anonymous_connect_is_healthy(
    fleet_broker: tuple[EmbeddedBroker, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    broker, _ = fleet_broker

    assert main(["--broker", broker.url]) == 0
    assert "answers MQTT" in capsys.readouterr().out


def test_a_closed_port_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"mqtt://127.0.0.1:{free_port('127.0.0.1')}"

    assert main(["--broker", url, "--timeout", "1"]) == 1
    assert capsys.readouterr().err.startswith("tern health: ")


def test_a_refused_login_is_unhealthy(fleet_broker: tuple[EmbeddedBroker, Path]) -> None:
    broker, kit_dir = fleet_broker
    wrong = kit_dir / "wrong.login"
    wrong.write_text('{"username": "observer", "password": "not-the-password"}')

    with pytest.raises(HealthError, match="refused"):
        check(broker.url, login=Login.from_json(wrong.read_text()), timeout=2)


def test_an_accepted_login_without_a_retained_online_status_is_unhealthy(
    fleet_broker: tuple[EmbeddedBroker, Path],
) -> None:
    broker, kit_dir = fleet_broker
    args = ["--broker", broker.url, "--login", str(kit_dir / "observer.json")]

    assert main(args) == 0
    assert main([*args, "--fleet", "health-fleet", "--status", "gw-1", "--timeout", "1"]) == 1


def test_an_established_connection_to_the_port_is_seen_and_a_closed_one_is_not() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    before = established_to(port)
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()

    assert established_to(port) == before + 1
    assert main(["--connected", str(port), "-q"]) == 0
    client.close()
    accepted.close()
    server.close()
    assert established_to(port) == before


def test_no_connection_to_a_port_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port("127.0.0.1")

    assert main(["--connected", str(port)]) == 1
    assert f"no established connection to port {port}" in capsys.readouterr().err
