"""MQTT over WebSockets on the embedded broker (`ws_port`, path /mqtt): what browsers
(MQTT.js) use. Real paho clients over WebSockets: a login publishes and subscribes, and
the access policy and the broker's limits hold exactly as on the TCP listener."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from broker.access import AccessControl
from broker.acl import AccessPolicy, Account, Rights
from broker.embedded import EmbeddedBroker
from broker.errors import BrokerError
from broker.limits import BrokerLimits
from broker.tls import server_tls
from tern import topics
from tern.cli import main
from tern.fleet import COORDINATOR
from tern.logins import hash_password

F = "plant-7"
WAIT = 5.0
BOARD = topics.telemetry(F, "esp-1")
OTHER = topics.telemetry(F, "esp-2")
LIMITS = BrokerLimits(max_packet_bytes=4096, max_queued_bytes=4096)


def policy() -> AccessPolicy:
    board = Rights(publish=(BOARD.path,))
    watcher = Rights(subscribe=(topics.telemetry_all(F).path,))
    return AccessPolicy(
        accounts={
            "board": Account(hash_password("pw"), board),
            "watcher": Account(hash_password("watch"), watcher),
        }
    )


class WsClient:
    """A paho client over WebSockets: the CONNACK's reason, what it receives."""

    def __init__(
        self, url: str, login: tuple[str, str], *, ca: str | None = None, client_id: str = ""
    ) -> None:
        parts = urlsplit(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, transport="websockets"
        )
        self.client.ws_set_options(path=parts.path)
        if ca is not None:
            self.client.tls_set(ca_certs=ca)
        self.client.username_pw_set(*login)
        self.answered, self.gone = threading.Event(), threading.Event()
        self.reason: str | None = None
        self.payloads: list[bytes] = []
        self.received = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        assert parts.hostname is not None and parts.port is not None
        self.client.connect(parts.hostname, parts.port, keepalive=10)
        self.client.loop_start()
        assert self.answered.wait(WAIT)

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        self.reason = str(reason)
        self.answered.set()

    def _on_disconnect(self, *_: object) -> None:
        self.gone.set()
        self.answered.set()

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with self.received:
            self.payloads.append(bytes(message.payload))
            self.received.notify_all()

    def subscribe(self, topic: topics.Topic) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe(topic.path, qos=1)
        assert done.wait(WAIT)

    def publish(self, topic: topics.Topic, payload: bytes) -> None:
        self.client.publish(topic.path, payload, qos=1)

    def wait_for(self, payload: bytes, timeout: float = WAIT) -> bool:
        with self.received:
            return self.received.wait_for(lambda: payload in self.payloads, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[WsClient]]:
    made: list[WsClient] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def guarded() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(
        "127.0.0.1", 0, access=AccessControl(policy()), limits=LIMITS, ws_port=0
    ) as broker:
        yield broker


def counted(broker: EmbeddedBroker, reason: str, expected: int = 1) -> int:
    """`broker.refused[reason]` once it reaches `expected` (or after a few seconds)."""
    deadline = time.monotonic() + WAIT
    while broker.refused[reason] < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return broker.refused[reason]


def test_a_login_publishes_and_subscribes_over_websockets(
    guarded: EmbeddedBroker, clients: list[WsClient]
) -> None:
    assert guarded.ws_url == f"ws://127.0.0.1:{urlsplit(guarded.ws_url).port}/mqtt"
    watcher = WsClient(guarded.ws_url, ("watcher", "watch"))
    board = WsClient(guarded.ws_url, ("board", "pw"))
    clients += [watcher, board]
    assert watcher.reason == board.reason == "Success"
    watcher.subscribe(topics.telemetry_all(F))

    board.publish(BOARD, b"over websockets")

    assert watcher.wait_for(b"over websockets")


def test_the_access_policy_holds_on_websockets(
    guarded: EmbeddedBroker, clients: list[WsClient]
) -> None:
    stranger = WsClient(guarded.ws_url, ("board", "guess"))
    watcher = WsClient(guarded.ws_url, ("watcher", "watch"))
    board = WsClient(guarded.ws_url, ("board", "pw"))
    clients += [stranger, watcher, board]
    watcher.subscribe(topics.telemetry_all(F))

    board.publish(OTHER, b"not its topic")
    board.publish(BOARD, b"its topic")

    assert stranger.reason == "Not authorized"
    assert watcher.wait_for(b"its topic")
    assert b"not its topic" not in watcher.payloads
    assert guarded.refused["bad_password"] == 1
    assert guarded.refused["publish_denied"] == 1


def test_a_packet_beyond_the_limit_ends_a_websockets_connection(
    guarded: EmbeddedBroker, clients: list[WsClient]
) -> None:
    board = WsClient(guarded.ws_url, ("board", "pw"))
    clients.append(board)

    board.publish(BOARD, bytes(LIMITS.max_packet_bytes))

    assert board.gone.wait(WAIT)
    assert counted(guarded, "packet_too_large") == 1


def test_the_connection_limit_counts_websockets_connections(clients: list[WsClient]) -> None:
    with EmbeddedBroker(
        "127.0.0.1", 0, limits=BrokerLimits(max_connections=1), ws_port=0
    ) as broker:
        clients.append(WsClient(broker.ws_url, ("anyone", "-")))
        second = WsClient(broker.ws_url, ("anyone", "-"))
        clients.append(second)

        assert second.reason is None and second.gone.is_set()
        assert counted(broker, "too_many_connections") == 1


def test_only_the_mqtt_path_and_binary_messages_are_served(guarded: EmbeddedBroker) -> None:
    elsewhere = guarded.ws_url.replace("/mqtt", "/admin")
    with pytest.raises(InvalidStatus, match="404"):
        ws_connect(elsewhere, subprotocols=["mqtt"], open_timeout=WAIT).close()  # type: ignore[list-item]

    with ws_connect(guarded.ws_url, subprotocols=["mqtt"], open_timeout=WAIT) as ws:  # type: ignore[list-item]
        ws.send("\x10 not binary")
        assert counted(guarded, "protocol_error", 2) == 2  # the path, then the text message


def test_a_bad_or_silent_websocket_handshake_is_cut_and_counted() -> None:
    limits = BrokerLimits(connect_timeout=0.3)
    with EmbeddedBroker("127.0.0.1", 0, limits=limits, ws_port=0) as broker:
        address = ("127.0.0.1", urlsplit(broker.ws_url).port or 0)
        with socket.create_connection(address, timeout=WAIT) as garbage:
            garbage.sendall(b"not http at all\r\n\r\n")
            assert garbage.recv(1) == b""  # cut (after websockets' 400 at most)
        with socket.create_connection(address, timeout=WAIT) as silent:
            assert silent.recv(1) == b""  # cut by the broker, not by our timeout

        assert counted(broker, "protocol_error") == 1
        assert counted(broker, "connect_timeout") == 1


def test_websockets_over_tls_with_the_fleet_ca(tmp_path: Path, clients: list[WsClient]) -> None:
    fleet_dir = tmp_path / "fleet"
    init = ["fleet", "init", "--fleet", F, "--gateway", "gw-1=dev-01", "--out", str(fleet_dir)]
    assert main(init) == 0
    tls = server_tls(fleet_dir, COORDINATOR)
    with EmbeddedBroker("127.0.0.1", 0, tls=tls, ws_port=0) as broker:
        assert broker.url.startswith("mqtts://") and broker.ws_url.startswith("wss://")

        client = WsClient(broker.ws_url, ("anyone", "-"), ca=str(fleet_dir / "ca.crt"))
        clients.append(client)

        assert client.reason == "Success"


def test_a_broker_without_websockets_has_no_ws_url() -> None:
    with EmbeddedBroker("127.0.0.1", 0) as broker, pytest.raises(BrokerError):
        _ = broker.ws_url
