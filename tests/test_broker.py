"""The embedded amqtt broker: start, stop, config, and `python -m broker`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cli import add_arguments, limits_from_args
from broker.embedded import ANONYMOUS, DEFAULT_CONFIG, EmbeddedBroker, load_config, merge_config
from broker.errors import BrokerConfigError, BrokerError, BrokerStartError, ConnectRefused
from broker.fleet_access import max_packet_bytes
from broker.limits import BrokerLimits
from broker.transport import MqttTransport, format_url
from tern import topics
from tern.caps import model_caps
from tests.fleet_fixtures import build_fleet, write_fleet
from tests.mqtt_fixtures import Inbox

REPO = Path(__file__).resolve().parents[1]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_embedded_broker_on_port_0_reports_its_real_port() -> None:
    embedded = EmbeddedBroker("127.0.0.1", 0)

    with embedded:
        port = embedded.port
        assert port != 0 and accepts(port)
        assert embedded.url == f"mqtt://127.0.0.1:{port}"

    assert not accepts(port)
    assert not embedded.running


def test_embedded_broker_port_is_unknown_before_start() -> None:
    with pytest.raises(BrokerError, match="not started"):
        _ = EmbeddedBroker("127.0.0.1", 0).port


def test_embedded_broker_refuses_to_start_on_a_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]

        with pytest.raises(BrokerStartError) as caught:
            EmbeddedBroker("127.0.0.1", port).start(timeout=5)

    assert caught.value.port == port


def test_embedded_broker_restarts_on_the_same_port_as_a_new_instance() -> None:
    first = EmbeddedBroker("127.0.0.1", 0).start()
    port = first.port
    first.stop()

    with EmbeddedBroker("127.0.0.1", port) as second:
        assert second.port == port and accepts(port)
        with pytest.raises(BrokerError, match="starts once"):
            second.start()


def connect_raw(port: int, client_id: bytes) -> socket.socket:
    """A bare MQTT 3.1.1 client: CONNECT, read the CONNACK, then never hang up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    sock.sendall(bytes([0x10, len(body)]) + body)
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    return sock


def stop_in_background(embedded: EmbeddedBroker, timeout: float) -> threading.Thread:
    stopping = threading.Thread(target=embedded.stop, kwargs={"timeout": timeout})
    stopping.start()
    return stopping


@pytest.mark.parametrize("plugin", ["WaitForClientsOnShutdown", "NeverShutDown"])
def test_stop_frees_the_port_at_once_and_ends_in_time_when_amqtt_hangs(
    plugin: str, caplog: pytest.LogCaptureFixture
) -> None:
    """amqtt's shutdown can wait for a client that never hangs up; stop() must not."""
    config: dict[str, object] = {"plugins": {f"tests.broker_plugins.{plugin}": {}}}
    embedded = EmbeddedBroker("127.0.0.1", 0, config=config).start()
    port = embedded.port
    client = connect_raw(port, b"never-hangs-up")
    started = time.monotonic()

    stopping = stop_in_background(embedded, timeout=4.0)
    # the listener closes first: a new broker can take the port while the old one winds down
    successor = None
    while successor is None and stopping.is_alive():
        with contextlib.suppress(BrokerStartError):
            successor = EmbeddedBroker("127.0.0.1", port).start(timeout=5)
    stopping.join()
    elapsed = time.monotonic() - started

    assert successor is not None, "the port stayed taken until stop() returned"
    successor.stop()
    assert elapsed < 4.0 and not embedded.running
    assert client.recv(1) == b"", "the stuck client was not disconnected"
    client.close()
    assert "aborting 1 client(s)" in caplog.text
    assert ("cancelling it" in caplog.text) == (plugin == "NeverShutDown")


def test_config_file_is_merged_over_the_defaults(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(
        f"timeout_disconnect_delay: 2\nplugins:\n  - {ANONYMOUS}:\n      allow_anonymous: false\n"
    )

    embedded = EmbeddedBroker("127.0.0.1", 0, config=config)

    assert embedded.config["timeout_disconnect_delay"] == 2
    assert embedded.config["plugins"] == {ANONYMOUS: {"allow_anonymous": False}}
    assert embedded.config["listeners"]["default"] == {"type": "tcp", "bind": "127.0.0.1:0"}
    with embedded, pytest.raises(ConnectRefused):
        MqttTransport(embedded.url, "dev-1").connect(timeout=5)


def test_json_config_file_is_read(tmp_path: Path) -> None:
    config = tmp_path / "broker.json"
    config.write_text(json.dumps({"listeners": {"default": {"max_connections": 5}}}))

    assert load_config(config) == {"listeners": {"default": {"max_connections": 5}}}


@pytest.mark.parametrize(
    ("name", "text"), [("bad.json", "{"), ("bad.yaml", "a: [1"), ("list.yaml", "- 1\n")]
)
def test_unreadable_config_raises_a_config_error(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)

    with pytest.raises(BrokerConfigError, match=name):
        EmbeddedBroker(config=tmp_path / name)


def test_config_amqtt_rejects_fails_the_start() -> None:
    with pytest.raises(BrokerStartError, match="no_such_option"):
        EmbeddedBroker("127.0.0.1", 0, config={"no_such_option": 1}).start(timeout=5)


def test_merge_config_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"x": 1, "y": [1]}, "b": 1}

    merged = merge_config(base, {"a": {"y": [2], "z": 3}, "c": 4})

    assert merged == {"a": {"x": 1, "y": [2], "z": 3}, "b": 1, "c": 4}
    assert base == {"a": {"x": 1, "y": [1]}, "b": 1}


def test_merge_config_keeps_default_plugins_when_a_list_adds_one() -> None:
    merged = merge_config(DEFAULT_CONFIG, {"plugins": ["my.Plugin", {"other.Plugin": {"k": 1}}]})

    assert merged["plugins"] == {
        ANONYMOUS: {"allow_anonymous": True},
        "my.Plugin": {},
        "other.Plugin": {"k": 1},
    }


def test_default_config_has_no_sys_topics_or_packet_logging() -> None:
    assert list(DEFAULT_CONFIG["plugins"]) == [ANONYMOUS]


def _lines(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


@contextlib.contextmanager
def broker_process(*flags: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python -m broker --port 0 FLAGS`, and the URL its log line says it listens on
    (port 0: chosen by the OS); killed at the end if it is still running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "--host", "127.0.0.1", "--port", "0", *flags],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(process.stderr, lines), daemon=True).start()
    try:
        port = 0
        while not port:
            found = re.search(r"listening on mqtt://127\.0\.0\.1:(\d+)", lines.get(timeout=10))
            port = int(found.group(1)) if found else 0
        yield process, format_url("127.0.0.1", port)
    finally:
        process.kill()
        process.wait(timeout=5)


def test_python_m_broker_serves_until_sigterm_and_exits_0() -> None:
    with broker_process() as (process, url):
        inbox = Inbox()
        with MqttTransport(url, "dev-1").connect(timeout=5) as client:
            client.subscribe(topics.status_all("plant-7"), inbox)

        process.send_signal(signal.SIGTERM)

        assert process.wait(timeout=10) == 0


def test_python_m_broker_exits_1_when_its_port_is_taken() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]

        result = subprocess.run(
            [sys.executable, "-m", "broker", "--port", str(port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=20,
        )

    assert result.returncode == 1
    assert str(port) in result.stderr


def test_config_with_a_listener_the_limits_cannot_guard_is_refused() -> None:
    config = {"listeners": {"web": {"type": "external", "bind": "127.0.0.1:0"}}}

    with pytest.raises(BrokerConfigError, match="only tcp and ws"):
        EmbeddedBroker("127.0.0.1", 0, config=config)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_broker_flags_become_its_limits() -> None:
    args = parse(
        "--max-connections", "5", "--publish-rate", "2.5", "--max-packet-bytes", "65536",
        "--unlimited-user", "gw-1", "--unlimited-user", "gw-2",
    )  # fmt: skip

    limits = limits_from_args(args)

    assert limits == BrokerLimits(
        max_connections=5,
        publish_rate=2.5,
        max_packet_bytes=65536,
        unlimited_users=frozenset({"gw-1", "gw-2"}),
    )
    assert limits_from_args(parse()) == BrokerLimits()


def test_a_fleet_sizes_the_packets_for_its_models_and_exempts_its_gateways_from_the_rate() -> None:
    kit = build_fleet({"gw-1": ("coordinator", ["dev-01"]), "gw-1a": ("gw-1", ["dev-02"])})
    fleet = dataclasses.replace(kit.fleet, max_params=16 << 20)

    derived = limits_from_args(parse("--unlimited-user", "ops"), fleet)
    given = limits_from_args(parse("--max-packet-bytes", "1000000"), fleet)

    assert derived.max_packet_bytes == max_packet_bytes(fleet)
    assert derived.max_packet_bytes > model_caps(16 << 20).max_bytes  # a model at the cap fits
    assert derived.max_retained_bytes >= 4 * derived.max_packet_bytes
    assert derived.max_queued_bytes >= 2 * derived.max_packet_bytes
    assert derived.unlimited_users == {"coordinator", "gw-1", "ops"}
    assert given.max_packet_bytes == 1000000


def test_python_m_broker_with_a_fleet_file_lets_only_the_fleet_in(tmp_path: Path) -> None:
    kit = build_fleet({"gw-1": ("coordinator", ["dev-01"])}, fleet_id="plant-7")
    fleet_file = write_fleet(kit, tmp_path)
    with broker_process("--fleet-file", str(fleet_file)) as (process, url):
        with pytest.raises(ConnectRefused):
            MqttTransport(url, "stranger", backoff_min=0.05, backoff_max=0.05).connect(timeout=5)
        member = MqttTransport(url, "coordinator", login=kit.login("coordinator"))
        with member.connect(timeout=5):
            member.publish(topics.global_model("plant-7"), b"model", retain=True, wait=True)

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
