"""The component commands over TLS, as real processes with the fleet's real certificates
(`tern fleet init`): `tern coordinator/gateway/device` reach an mqtts:// broker with the
fleet CA found beside the fleet file, a wrong CA ends `--connect-timeout` with one line
saying why, `tern gateway --tls` serves its devices over TLS, and `tern broker --tls`
serves the coordinator's certificate."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from broker.embedded import EmbeddedBroker
from broker.tls import server_tls
from broker.transport import MqttTransport, TlsClient
from coordinator.config import ConfigError, CoordinatorConfig
from gateway.config import GatewayConfig, GatewayError
from tern import pki
from tern.cli import main
from tern.fleet import COORDINATOR
from tern.logins import Login
from tests.process_helpers import Spawned, component_args, error_lines

F = "plant-7"
COMPONENTS = ["coordinator", "gateway", "device"]
WAIT = 30.0  # a process's start (imports) on a busy machine, not a measured figure


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fleet.json, keys and logins of coordinator, gw-1 and dev-01, and the fleet's PKI."""
    directory = tmp_path_factory.mktemp("fleet")
    init = ["fleet", "init", "--fleet", F, "--gateway", "gw-1=dev-01", "--out", str(directory)]
    assert main([*init, "--force"]) == 0
    return directory


@pytest.fixture(scope="module")
def top(fleet_dir: Path) -> Iterator[EmbeddedBroker]:
    """An open broker serving TLS with the coordinator's certificate."""
    with EmbeddedBroker("127.0.0.1", 0, tls=server_tls(fleet_dir, COORDINATOR)) as broker:
        yield broker


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_component_reaches_a_tls_broker_with_the_fleet_ca(
    component: str, fleet_dir: Path, top: EmbeddedBroker, tmp_path: Path, stack: ExitStack
) -> None:
    args = [*component_args(component, fleet_dir, top.url, tmp_path), "--connect-timeout", "20"]

    process = Spawned(args, stack)

    process.wait_for_line(re.escape(f"connected to {top.url}"), WAIT)


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_wrong_ca_ends_the_connect_timeout_in_one_line_saying_why(
    component: str, fleet_dir: Path, top: EmbeddedBroker, tmp_path: Path, stack: ExitStack
) -> None:
    stranger = tmp_path / "other-ca.crt"
    stranger.write_bytes(pki.new_ca(F).cert_pem)
    args = component_args(component, fleet_dir, top.url, tmp_path)
    args += ["--ca-file", str(stranger), "--connect-timeout", "1"]

    process = Spawned(args, stack)
    code = process.popen.wait(timeout=WAIT)

    errors = [line for line in error_lines(process.stderr()) if line.startswith("tern ")]
    assert code == 1
    assert len(errors) == 1, process.lines
    assert "within 1 s" in errors[0] and "certificate verify failed" in errors[0], errors[0]
    assert "Traceback" not in process.stderr()


def test_a_tls_url_without_the_fleet_ca_is_refused_in_one_line(
    top: EmbeddedBroker, fleet_dir: Path, tmp_path: Path, stack: ExitStack
) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "fleet.json").write_bytes((fleet_dir / "fleet.json").read_bytes())
    args = component_args("device", fleet_dir, top.url, tmp_path)
    args[args.index("--fleet-file") + 1] = str(lone / "fleet.json")  # no ca.crt beside it

    process = Spawned(args, stack)
    code = process.popen.wait(timeout=WAIT)

    assert code == 1
    assert error_lines(process.stderr())[-1].startswith("tern device:")
    assert "no CA file" in process.stderr()


def test_a_device_reaches_a_gateway_that_serves_tls(
    fleet_dir: Path, top: EmbeddedBroker, tmp_path: Path, stack: ExitStack
) -> None:
    gateway_args = component_args("gateway", fleet_dir, top.url, tmp_path)
    gateway = Spawned([*gateway_args, "--tls", "--ws-port", "0"], stack)
    line = gateway.wait_for_line(r"broker listening on mqtts://", WAIT)
    own = re.search(r"mqtts://\S+", line)
    assert own is not None

    device = Spawned(component_args("device", fleet_dir, own.group(0), tmp_path), stack)

    device.wait_for_line(re.escape(f"connected to {own.group(0)}"), WAIT)


def test_tern_broker_serves_tls_with_the_coordinators_certificate(
    fleet_dir: Path, stack: ExitStack
) -> None:
    fleet_file = str(fleet_dir / "fleet.json")
    args = ["-m", "broker", "--fleet-file", fleet_file, "--port", "0", "--tls", "--ws-port", "0"]
    broker = Spawned(args, stack)
    url = re.search(r"mqtts://\S+", broker.wait_for_line(r"broker listening on mqtts://", WAIT))
    assert url is not None
    broker.wait_for_line(r"WebSockets \(browsers\) on wss://127\.0\.0\.1:\d+/mqtt", WAIT)
    login = Login.from_json((fleet_dir / "coordinator.login").read_text())

    with MqttTransport(
        url.group(0),
        COORDINATOR,
        login=(login.username, login.password),
        tls=TlsClient(str(fleet_dir / "ca.crt")),
    ) as client:
        client.connect(WAIT)

        assert client.connected


def test_a_gateway_config_refuses_tls_settings_that_do_not_match_its_links(
    fleet_dir: Path,
) -> None:
    ca = TlsClient(str(fleet_dir / "ca.crt"))
    own = server_tls(fleet_dir, "gw-1")
    GatewayConfig("gw-1", "mqtts://top", upstream_tls=ca, listen_tls=own, downstream_tls=ca)

    with pytest.raises(GatewayError, match="speaks TLS"):
        GatewayConfig("gw-1", "mqtts://top")
    with pytest.raises(GatewayError, match="plaintext"):
        GatewayConfig("gw-1", "mqtt://top", upstream_tls=ca)
    with pytest.raises(GatewayError, match=r"\(its own broker\) speaks TLS"):
        GatewayConfig("gw-1", "mqtt://top", listen_tls=own)
    with pytest.raises(GatewayError, match="external downstream"):
        GatewayConfig("gw-1", "mqtt://top", downstream_url="mqtt://local", ws_port=0)


def test_a_coordinator_config_refuses_tls_settings_that_do_not_match_its_broker(
    fleet_dir: Path, tmp_path: Path
) -> None:
    ca = TlsClient(str(fleet_dir / "ca.crt"))
    CoordinatorConfig(broker_url="mqtts://top", state_dir=tmp_path, tls=ca)

    with pytest.raises(ConfigError, match="tls"):
        CoordinatorConfig(broker_url="mqtts://top", state_dir=tmp_path)
    with pytest.raises(ConfigError, match="tls"):
        CoordinatorConfig(broker_url="mqtt://top", state_dir=tmp_path, tls=ca)
