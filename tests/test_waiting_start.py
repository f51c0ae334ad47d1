"""A component started before its broker waits for it, says so, and connects when it comes.

The fault: a device whose gateway (or a gateway whose upstream, or a coordinator whose
broker) was not up yet exited after 10 to 30 s, so starting in any order lost rounds.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from broker.embedded import EmbeddedBroker
from broker.errors import ConnectTimeout, TransportError
from broker.mosquitto import free_port
from broker.transport import MqttTransport, format_url
from tern import topics
from tern.reports import State, Status
from tests.fleet_fixtures import build_fleet, write_fleet
from tests.mqtt_fixtures import Inbox
from tests.process_helpers import Spawned, component_args, error_lines

HOST = "127.0.0.1"
COMPONENTS = ["device", "gateway", "coordinator"]
MEMBER = {"device": "dev-01", "gateway": "gw-1", "coordinator": "coordinator"}
WAIT = 30.0  # the CLIs back off up to 30 s between tries; a few tries fit in this


@pytest.fixture
def kit_dir(tmp_path: Path) -> Path:
    write_fleet(build_fleet({"gw-1": ("coordinator", ["dev-01"])}, "wait-fleet"), tmp_path / "kit")
    return tmp_path / "kit"


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def transport(url: str) -> MqttTransport:
    return MqttTransport(
        url, "dev-1", backoff_min=0.05, backoff_max=0.2, rng=np.random.default_rng(0)
    )


# -- the transport ---------------------------------------------------------------------------


def test_connect_without_a_deadline_waits_for_a_broker_that_comes_later(
    caplog: pytest.LogCaptureFixture, stack: ExitStack
) -> None:
    port = free_port(HOST)
    client = transport(format_url(HOST, port))
    stack.callback(client.close)
    connected = threading.Event()

    def connect() -> None:
        client.connect(None)
        connected.set()

    waiter = threading.Thread(target=connect, daemon=True)
    caplog.set_level(logging.INFO, logger="broker.transport")

    waiter.start()
    time.sleep(1.5)  # longer than any backoff here: it has tried, failed and tried again
    assert not connected.is_set()
    broker = EmbeddedBroker(HOST, port).start()
    stack.callback(broker.stop)

    assert connected.wait(10)
    assert client.connected
    waiting = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert waiting and f"waiting for mqtt://{HOST}:{port} (attempt 1, next try in" in waiting[0]


def test_waiting_is_logged_once_and_then_now_and_then(caplog: pytest.LogCaptureFixture) -> None:
    client = MqttTransport(
        format_url(HOST, free_port(HOST)), "dev-1", backoff_min=0.01, backoff_max=0.02
    )
    caplog.set_level(logging.DEBUG, logger="broker.transport")

    with pytest.raises(ConnectTimeout):
        client.connect(1.0)

    waits = [r for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waits) >= 10  # it kept trying, every 10 to 20 ms
    assert [r.levelno for r in waits if r.levelno >= logging.INFO] == [logging.INFO]


def test_close_from_another_thread_ends_a_wait_without_end() -> None:
    client = transport(format_url(HOST, free_port(HOST)))
    threading.Timer(0.5, client.close).start()
    started = time.monotonic()

    with pytest.raises(TransportError, match="closed while waiting"):
        client.connect(None)

    assert time.monotonic() - started < 3.0
    assert not client.connected


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_connect_refuses_a_timeout_that_is_not_seconds(timeout: float) -> None:
    with pytest.raises(TransportError, match="timeout"):
        transport("mqtt://127.0.0.1:1").connect(timeout)


# -- the commands ----------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_command_started_before_its_broker_waits_says_so_and_comes_online(
    component: str, kit_dir: Path, tmp_path: Path, stack: ExitStack
) -> None:
    port = free_port(HOST)
    url = format_url(HOST, port)
    process = Spawned(component_args(component, kit_dir, url, tmp_path), stack)

    process.wait_for_line(rf"waiting for {url} \(attempt 1, next try in [0-9.]+ s\)", WAIT)
    time.sleep(2.0)
    assert process.popen.poll() is None, process.lines
    broker = EmbeddedBroker(HOST, port).start()
    stack.callback(broker.stop)
    status = Inbox()
    watcher = stack.enter_context(MqttTransport(url, "watcher").connect(10))
    watcher.subscribe(topics.status("wait-fleet", MEMBER[component]), status)

    status.wait_for(lambda m: Status.from_json(m.payload).state is State.ONLINE, WAIT)
    process.popen.send_signal(signal.SIGTERM)

    assert process.popen.wait(timeout=WAIT) == 0
    assert "Traceback" not in process.stderr()


@pytest.mark.parametrize("component", COMPONENTS)
def test_command_waiting_for_its_broker_stops_at_once_on_sigterm(
    component: str, kit_dir: Path, tmp_path: Path, stack: ExitStack
) -> None:
    url = format_url(HOST, free_port(HOST))
    process = Spawned(component_args(component, kit_dir, url, tmp_path), stack)
    process.wait_for_line("waiting for", WAIT)

    process.popen.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code = process.popen.wait(timeout=WAIT)

    assert code == 0
    assert time.monotonic() - started < 5.0
    assert "Traceback" not in process.stderr()


@pytest.mark.parametrize("component", COMPONENTS)
def test_command_with_a_connect_timeout_gives_up_in_one_line(
    component: str, kit_dir: Path, tmp_path: Path, stack: ExitStack
) -> None:
    url = format_url(HOST, free_port(HOST))
    args = [*component_args(component, kit_dir, url, tmp_path), "--connect-timeout", "1"]
    process = Spawned(args, stack)

    code = process.popen.wait(timeout=WAIT)

    errors = [line for line in error_lines(process.stderr()) if line.startswith("tern ")]
    assert code == 1
    assert len(errors) == 1 and "within 1 s" in errors[0], process.lines
    assert "Traceback" not in process.stderr()
