"""A compromised device against its gateway's broker, on the embedded amqtt broker and on
Mosquitto (parametrized): it cannot forge what others publish, read what others send, or
leave a last will on someone else's topic.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import SubscribeError
from tern import topics
from tern.logins import OBSERVER
from tests.mqtt_fixtures import Inbox, MakeTransport
from tests.rights_helpers import (
    BOARDS,
    KIT,
    WAIT,
    F,
    Serve,
    Served,
    everything,
    member,
    raw,
    serving,
)


@pytest.fixture(params=["amqtt", "mosquitto"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Serve]:
    """`serve(broker, boards=None)`: the `broker` (coordinator or a gateway id) of FLEET."""
    with serving(str(request.param), tmp_path) as start:
        yield start


KERNEL = topics.kernel(F, "ab" * 32)


# -- a compromised device --------------------------------------------------------------


def test_a_device_cannot_publish_the_model_schedule_kernel_or_another_device_s_update(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve("gw-1", BOARDS)
    gateway = member(make_transport, served, "gw-1", "tern-plant-7-gw-1-down")
    gateway.publish(topics.global_model(F), b"genuine model", retain=True, wait=True)
    observer, heard = Inbox(), Inbox()
    member(make_transport, served, OBSERVER, "dashboard").subscribe(everything(), observer)
    gateway.subscribe(topics.updates_to(F, "gw-1"), heard)
    rogue = member(make_transport, served, "dev-01")

    forged = [
        (topics.global_model(F), True),
        (topics.round_schedule(F), True),
        (KERNEL, True),
        (topics.update(F, "gw-1", "dev-02"), False),
        (topics.partial(F, "gw-1", "dev-01"), False),
        (topics.status(F, "dev-02"), True),
        (topics.mcu_model(F, "esp-1"), True),
        (topics.telemetry(F, "esp-1"), False),
    ]
    for topic, retain in forged:
        rogue.publish(topic, b"forged", retain=retain, wait=True)
    rogue.publish(topics.update(F, "gw-1", "dev-01"), b"its own update", wait=True)

    heard.wait_for(lambda m: m.payload == b"its own update", WAIT)
    observer.wait_for(lambda m: m.payload == b"its own update", WAIT)
    assert [m for m in [*heard.messages, *observer.messages] if m.payload == b"forged"] == []
    fresh = Inbox()
    member(make_transport, served, "dev-02").subscribe(topics.global_model(F), fresh)
    assert fresh.wait_for(timeout=WAIT).payload == b"genuine model"  # the retained one stands
    if served.kind == "amqtt":
        assert served.refused == {"publish_denied": len(forged)}


def test_a_device_cannot_read_everything_or_another_device_s_update(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve("gw-1", BOARDS)
    gateway, spy = Inbox(), Inbox()
    member(make_transport, served, "gw-1", "tern-plant-7-gw-1-down").subscribe(
        topics.updates_to(F, "gw-1"), gateway
    )
    rogue = member(make_transport, served, "dev-01")
    wide = [
        raw("#"),
        everything(),
        topics.updates_to(F, "gw-1"),
        topics.update(F, "gw-1", "dev-02"),
    ]

    refusals = 0
    for topic_filter in wide:
        try:
            rogue.subscribe(topic_filter, spy)
        except SubscribeError:
            refusals += 1
    member(make_transport, served, "dev-02").publish(
        topics.update(F, "gw-1", "dev-02"), b"private", wait=True
    )

    gateway.wait_for(lambda m: m.payload == b"private", WAIT)
    assert spy.messages == []
    # Mosquitto grants a SUBSCRIBE and filters each delivery; amqtt refuses it outright.
    assert refusals == (len(wide) if served.kind == "amqtt" else 0)
    if served.kind == "amqtt":
        assert served.refused == {"subscribe_denied": len(wide)}


def test_a_last_will_on_someone_else_s_topic_never_reaches_anyone(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve("gw-1", BOARDS)
    observer = Inbox()
    member(make_transport, served, OBSERVER, "dashboard").subscribe(everything(), observer)
    login = KIT.login("dev-01")

    rc = raw_connect(served, "tern-plant-7-dev-01", login, (topics.global_model(F).path, True))
    rc_own = raw_connect(
        served, "tern-plant-7-dev-01", login, (topics.status(F, "dev-01").path, True)
    )
    device = member(make_transport, served, "dev-02")
    device.publish(topics.status(F, "dev-02"), b"marker", retain=True, wait=True)

    observer.wait_for(lambda m: m.payload == b"will", WAIT)  # its own will went through
    observer.wait_for(lambda m: m.payload == b"marker", WAIT)
    assert [m.topic for m in observer.messages if m.payload == b"will"] == [
        topics.status(F, "dev-01").path
    ]
    assert rc_own == 0
    if served.kind == "amqtt":
        assert rc == 5 and served.refused == {"will_denied": 1}


# -- raw MQTT, for what paho does not let a test do (drop without DISCONNECT) -----------


def raw_connect(
    served: Served, client_id: str, login: tuple[str, str], will: tuple[str, bool]
) -> int:
    """CONNECT with a last will (payload b"will", QoS 1), read the CONNACK's return code,
    then drop the connection without DISCONNECT, so the broker publishes the will."""
    will_topic, will_retain = will

    def text(value: str | bytes) -> bytes:
        data = value.encode() if isinstance(value, str) else value
        return struct.pack("!H", len(data)) + data

    flags = 0x80 | 0x40 | 0x08 | 0x04 | 0x02 | (0x20 if will_retain else 0)
    body = text("MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
    body += text(client_id) + text(will_topic) + text(b"will") + text(login[0]) + text(login[1])
    assert len(body) < 128
    with socket.create_connection((served.host, served.port), timeout=WAIT) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                break
            connack += chunk
    return connack[3] if len(connack) == 4 else -1
