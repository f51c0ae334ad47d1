"""Real MQTT brokers on free loopback ports, and helpers to wait for messages.

Loaded as a pytest plugin (``pytest_plugins = ["tests.mqtt_fixtures"]`` in conftest).
Fixtures: `amqtt_broker` (the embedded broker), `mosquitto_broker` (the mosquitto
binary with a generated config; skipped when it is not installed), `any_broker`
(both), and `make_transport` (connected MqttTransports, closed after the test). Each
broker yields an object with `.host`, `.port`, `.url` and `.restart()`. Never a fixed
port, never a public broker; every wait has a deadline.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest

from broker.embedded import EmbeddedBroker
from broker.transport import Message, MqttTransport, format_url

__all__ = [
    "AmqttBroker",
    "Inbox",
    "MosquittoBroker",
    "RunningBroker",
    "free_port",
    "wait_until_accepting",
]

HOST = "127.0.0.1"
START_TIMEOUT = 10.0


class RunningBroker(Protocol):
    """What the broker fixtures yield."""

    host: str
    port: int

    @property
    def url(self) -> str: ...

    def restart(self) -> None: ...


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (for programs that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_accepting(
    host: str, port: int, timeout: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Return once `host`:`port` accepts TCP connections; RuntimeError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if not alive():
                raise RuntimeError(f"the broker for {host}:{port} exited") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing accepts on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


class AmqttBroker:
    """The embedded broker; restart() brings up a fresh one on the same port."""

    def __init__(self) -> None:
        self._broker = EmbeddedBroker(HOST, 0).start(START_TIMEOUT)
        self.host, self.port = HOST, self._broker.port

    @property
    def url(self) -> str:
        return format_url(self.host, self.port)

    def restart(self) -> None:
        self._broker.stop()
        self._broker = EmbeddedBroker(self.host, self.port).start(START_TIMEOUT)

    def stop(self) -> None:
        self._broker.stop()


class MosquittoBroker:
    """A mosquitto process on a free port with its own config (anonymous, no persistence)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir, self.host = binary, workdir, HOST
        self.log = workdir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        # free_port() is free now, not necessarily once mosquitto binds it: retry.
        for attempt in range(3):
            self.port = free_port()
            try:
                self._spawn()
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    @property
    def url(self) -> str:
        return format_url(self.host, self.port)

    def _spawn(self) -> None:
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\npersistence false\nlog_dest stderr\n"
            # mosquitto's default (1000) silently drops QoS 1 messages queued for a slow
            # subscriber: a gateway taking a burst of device updates would lose some.
            "max_queued_messages 10000\n"
        )
        with self.log.open("ab") as log:
            process = subprocess.Popen(
                [self.binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        self._process = process
        try:
            wait_until_accepting(
                self.host, self.port, START_TIMEOUT, lambda: process.poll() is None
            )
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}; mosquitto log:\n{self.log.read_text()}") from exc

    def restart(self) -> None:
        self.stop()
        self._spawn()

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        self._process = None


def find_mosquitto() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


@pytest.fixture
def amqtt_broker() -> Iterator[AmqttBroker]:
    broker = AmqttBroker()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = MosquittoBroker(binary, tmp_path)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(params=["amqtt", "mosquitto"])
def any_broker(request: pytest.FixtureRequest) -> RunningBroker:
    broker: RunningBroker = request.getfixturevalue(f"{request.param}_broker")
    return broker


MakeTransport = Callable[..., MqttTransport]


@pytest.fixture
def make_transport() -> Iterator[MakeTransport]:
    """`make_transport(url, client_id, **kwargs)`: a connected MqttTransport, closed after.

    Backoff is short (tests restart brokers) and the jitter generator seeded.
    """
    made: list[MqttTransport] = []

    def make(url: str, client_id: str, **kwargs: Any) -> MqttTransport:
        kwargs.setdefault("backoff_min", 0.05)
        kwargs.setdefault("backoff_max", 0.5)
        kwargs.setdefault("rng", np.random.default_rng(len(made)))
        transport = MqttTransport(url, client_id, **kwargs)
        made.append(transport)
        return transport.connect(timeout=START_TIMEOUT)

    yield make
    for transport in made:
        transport.close()


class Inbox:
    """A message handler that keeps what it receives; wait_for() has a deadline."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def wait_for(
        self, predicate: Callable[[Message], bool] = lambda m: True, timeout: float = 5.0
    ) -> Message:
        """The first message (received so far or later) that satisfies `predicate`."""
        with self._changed:
            found: list[Message] = []

            def seen() -> bool:
                found[:] = [m for m in self.messages if predicate(m)]
                return bool(found)

            if not self._changed.wait_for(seen, timeout):
                raise AssertionError(f"no matching message within {timeout} s: {self.messages}")
            return found[0]
