"""What a user gets wrong earns one line on stderr and an exit code, never a traceback.

Each test runs the real command (`python -m ...`) the way a new user did: a broker URL
without `mqtt://`, a port already taken, a URL where a HOST:PORT goes, a fleet file that
is not text, `tern inspect` piped into `head`, a SIGHUP to a coordinator without
--kernel, and the device's --slowdown.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from broker.transport import MqttTransport
from device.__main__ import build_parser as device_parser
from tern import topics
from tern.envelope import Envelope, Kind, seal
from tern.reports import State, Status
from tests.fleet_fixtures import build_fleet, write_fleet
from tests.mqtt_fixtures import AmqttBroker, Inbox
from tests.process_helpers import REPO, Spawned, component_args, error_lines, one_line, run

WAIT = 30.0
COMPONENTS = ["coordinator", "gateway", "device"]


@pytest.fixture
def kit_dir(tmp_path: Path) -> Path:
    write_fleet(build_fleet({"gw-1": ("coordinator", ["dev-01"])}, "clear-fleet"), tmp_path / "kit")
    return tmp_path / "kit"


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


URL_FLAG = {"coordinator": "--broker", "gateway": "--upstream", "device": "--gateway-url"}


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_broker_url_without_its_scheme_is_one_line(
    component: str, kit_dir: Path, tmp_path: Path
) -> None:
    args = component_args(component, kit_dir, "mqtt://127.0.0.1:1", tmp_path)

    result = run(with_flag(args, URL_FLAG[component], "localhost:1883"))

    assert result.returncode == 1
    assert "'localhost:1883' is not a broker URL (mqtt://host:port or" in one_line(result)


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_fleet_file_that_is_not_text_is_one_line(
    component: str, kit_dir: Path, tmp_path: Path
) -> None:
    binary = tmp_path / "fleet.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    args = component_args(component, kit_dir, "mqtt://127.0.0.1:1", tmp_path)

    result = run(with_flag(args, "--fleet-file", str(binary)))

    assert result.returncode == 1
    assert f"fleet file {binary}: not valid JSON" in one_line(result)


def test_the_broker_with_a_fleet_file_that_is_not_text_is_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "fleet.bin"
    binary.write_bytes(b"\x00\xff" * 100)

    result = run(["-m", "broker", "--port", "0", "--fleet-file", str(binary)])

    assert result.returncode == 1
    assert "not valid JSON" in one_line(result)


def test_mosquitto_config_with_a_fleet_file_that_is_not_text_is_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "fleet.bin"
    binary.write_bytes(b"\x00\xff" * 100)

    result = run(["-m", "tern", "mosquitto-config", "--fleet-file", str(binary), "--out", "x"])

    assert result.returncode == 2
    assert one_line(result).startswith(f"tern: fleet file {binary}: not valid JSON")


@pytest.mark.parametrize("command", [["-m", "broker"], ["-m", "tern", "broker"]])
def test_a_broker_on_a_port_in_use_is_one_line(command: list[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]

        result = run([*command, "--host", "127.0.0.1", "--port", str(port)])

    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: the address is in use" in one_line(result)


def test_a_gateway_listening_on_a_port_in_use_is_one_line(kit_dir: Path, tmp_path: Path) -> None:
    args = component_args("gateway", kit_dir, "mqtt://127.0.0.1:1", tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]

        result = run(with_flag(args, "--listen", f"127.0.0.1:{port}"))

    assert result.returncode == 1
    line = one_line(result)
    assert line == f"tern gateway: cannot listen on 127.0.0.1:{port}: " + (
        "the address is in use (another broker, or another run of this one?)"
    )


def test_a_url_given_to_listen_is_refused_as_a_usage_error(kit_dir: Path, tmp_path: Path) -> None:
    args = component_args("gateway", kit_dir, "mqtt://127.0.0.1:1", tmp_path)

    result = run(with_flag(args, "--listen", "mqtt://0.0.0.0:1884"))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = error_lines(result.stderr)[-1]
    assert last.startswith("tern gateway: error: argument --listen: 'mqtt://0.0.0.0:1884' is a URL")


def test_inspect_into_a_pipe_closed_early_ends_quietly(tmp_path: Path) -> None:
    message = tmp_path / "status.cbor"
    envelope = Envelope(Kind.UPDATE, "plant-7", 1, 0, "dev-1", {"note": "x" * 4000})
    message.write_bytes(seal(envelope, SigningKey(bytes(32))))
    process = subprocess.Popen(
        [sys.executable, "-m", "tern", "inspect", str(message)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()  # `| head -0`: the reader is gone before anything is written

    _, stderr = process.communicate(timeout=WAIT)

    assert process.returncode == 1
    assert stderr == ""


def test_inspect_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    result = run(["-m", "tern", "inspect", str(tmp_path / "nothing.cbor")])

    assert result.returncode == 1
    assert (
        one_line(result) == f"tern inspect: {tmp_path / 'nothing.cbor'}: No such file or directory"
    )


def test_sighup_to_a_coordinator_without_a_kernel_is_logged_and_ignored(
    kit_dir: Path, tmp_path: Path, stack: ExitStack
) -> None:
    broker = AmqttBroker()
    stack.callback(broker.stop)
    status = Inbox()
    watcher = stack.enter_context(MqttTransport(broker.url, "watcher").connect(10))
    watcher.subscribe(topics.status("clear-fleet", "coordinator"), status)
    coordinator = Spawned(component_args("coordinator", kit_dir, broker.url, tmp_path), stack)
    status.wait_for(lambda m: Status.from_json(m.payload).state is State.ONLINE, WAIT)

    coordinator.popen.send_signal(signal.SIGHUP)
    coordinator.wait_for_line("SIGHUP ignored: started without --kernel", WAIT)
    alive = coordinator.popen.poll() is None
    coordinator.popen.send_signal(signal.SIGTERM)

    assert alive
    assert coordinator.popen.wait(timeout=WAIT) == 0


# -- the device's --slowdown -------------------------------------------------------------------

DEVICE = [
    "--id",
    "d",
    "--fleet-file",
    "f",
    "--key",
    "k",
    "--gateway-url",
    "mqtt://g",
    "--data",
    "x",
]


def test_the_device_takes_a_slowdown_in_seconds() -> None:
    assert device_parser().parse_args([*DEVICE, "--slowdown", "2.5"]).slowdown == 2.5
    assert device_parser().parse_args(DEVICE).slowdown == 0.0


@pytest.mark.parametrize("command", [["-m", "device"], ["-m", "tern", "device"]])
def test_a_negative_slowdown_is_refused_in_one_error_line(command: list[str]) -> None:
    result = run([*command, *DEVICE, "--slowdown", "-1"])

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in error_lines(result.stderr) if "error" in line]
    assert errors == [
        "tern device: error: argument --slowdown: '-1' is not a number of seconds >= 0"
    ]
