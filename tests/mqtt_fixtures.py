"""Real MQTT brokers on free loopback ports, and helpers to wait for messages.

Loaded as a pytest plugin (``pytest_plugins = ["tests.mqtt_fixtures"]`` in conftest).
Fixtures: `amqtt_broker` (the embedded broker), `mosquitto_broker` (the mosquitto
binary with a generated config; skipped when it is not installed), `any_broker`
(both), and `make_transport` (connected MqttTransports, closed after the test). Each
broker yields an object with `.host`, `.port`, `.url` and `.restart()`. Never a fixed
port, never a public broker; every wait has a deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest

from broker.embedded import EmbeddedBroker
from broker.mosquitto import MosquittoProcess, find_mosquitto, free_port, wait_until_accepting
from broker.transport import Message, MqttTransport, format_url
from tern.topics import Topic
from tests.helpers import unavailable

__all__ = [
    "AmqttBroker",
    "Inbox",
    "MosquittoBroker",
    "RunningBroker",
    "free_port",
    "listen",
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


class AmqttBroker:
    """The embedded broker; restart() brings up a fresh one on the same port."""

    def __init__(self) -> None:
        # free_port, not port 0: restart() must get the same port back (see free_port).
        self.host, self.port = HOST, free_port(HOST)
        self._broker = EmbeddedBroker(self.host, self.port).start(START_TIMEOUT)

    @property
    def url(self) -> str:
        return format_url(self.host, self.port)

    def restart(self) -> None:
        self._broker.stop()
        self._broker = EmbeddedBroker(self.host, self.port).start(START_TIMEOUT)

    def stop(self) -> None:
        self._broker.stop()


class MosquittoBroker(MosquittoProcess):
    """A mosquitto process on a free port with its own config (broker.mosquitto)."""


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Whatever a test starts, stopped at its end (last started, first stopped)."""
    with ExitStack() as s:
        yield s


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
        unavailable("mosquitto is not installed (apt-get install mosquitto)")
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

    def clear(self) -> None:
        with self._changed:
            self.messages.clear()

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


def listen(
    make_transport: MakeTransport,
    url: str,
    topic: Topic,
    client_id: str,
    login: tuple[str, str] | None = None,
) -> Inbox:
    """An Inbox of everything published under `topic` on `url` from now on (`login`: for a
    fleet's broker, usually its observer's)."""
    inbox = Inbox()
    make_transport(url, client_id, login=login).subscribe(topic, inbox)
    return inbox
