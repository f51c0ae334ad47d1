"""The embedded broker against hostile clients: its limits (broker.limits) and its fixes
of amqtt (broker.embedded).

A real amqtt broker on a free port, in this process (so its memory is this process's
VmRSS); attackers are raw sockets writing MQTT byte by byte, normal clients are
MqttTransports. Each test shows the attack refused, the exact count in `refused`, and
the broker still serving a normal client afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.errors import ConnectRefused
from broker.fleet_access import broker_policy
from broker.limits import BrokerLimits
from tern import topics
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER
from tests.broker_plugins import RefuseUser
from tests.fleet_fixtures import build_fleet
from tests.helpers import wait_until
from tests.mqtt_fixtures import Inbox, MakeTransport
from tests.raw_mqtt import (
    FLEET,
    MIB,
    Raw,
    broker_starter,
    collect,
    connect_packet,
    frame,
    needs_proc,
    publish_packet,
    raw_opener,
    round_trip,
    rss,
    settled,
    subscribe_packet,
    text,
)

# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def serve(stack: ExitStack) -> Callable[..., EmbeddedBroker]:
    """`serve(limits=..., access=..., config=...)`: a started broker, stopped at the end."""
    return broker_starter(stack)


@pytest.fixture(autouse=True)
def _fresh_refuse_user() -> Iterator[None]:
    """RefuseUser counts in a class attribute: each test starts from none."""
    RefuseUser.asked.clear()
    yield
    RefuseUser.asked.clear()


@pytest.fixture
def raw(stack: ExitStack) -> Callable[[EmbeddedBroker], Raw]:
    return raw_opener(stack)


# -- amqtt, fixed ------------------------------------------------------------------------


def test_a_subscriber_gets_only_the_retained_messages_of_its_own_filters_once(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport
) -> None:
    broker = serve()
    publisher = make_transport(broker.url, "coordinator")
    for topic, payload in [
        (topics.global_model(FLEET), b"model"),
        (topics.round_schedule(FLEET), b"schedule"),
        (topics.status(FLEET, "dev-01"), b"online"),
    ]:
        publisher.publish(topic, payload, retain=True, wait=True)
    # another client's filters, matching every retained topic, live in the broker
    watcher = make_transport(broker.url, "watcher")
    for topic_filter in [topics.global_model(FLEET), topics.round_schedule(FLEET)]:
        watcher.subscribe(topic_filter, Inbox())
    watcher.subscribe(topics.status_all(FLEET), Inbox())
    inbox = Inbox()

    make_transport(broker.url, "dashboard").subscribe(topics.status(FLEET, "dev-01"), inbox)

    assert collect(inbox) == [(topics.status(FLEET, "dev-01").path, b"online", True)]
    assert broker.refused == {}


def test_a_refused_connect_reusing_a_connected_clients_id_leaves_it_subscribed(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport, raw: Callable[..., Raw]
) -> None:
    broker = serve(config={"plugins": {"tests.broker_plugins.RefuseUser": {"user": "intruder"}}})
    inbox = Inbox()
    gateway = make_transport(broker.url, "tern-plant-7-gw-1-down")
    gateway.subscribe(topics.updates_to(FLEET, "gw-1"), inbox)
    intruder = raw(broker)

    intruder.send(connect_packet(b"tern-plant-7-gw-1-down", user=b"intruder"))

    assert intruder.packet() == (0x20, b"\x00\x05")  # CONNACK: not authorised
    assert intruder.closed_within(2)
    make_transport(broker.url, "dev-01").publish(
        topics.update(FLEET, "gw-1", "dev-01"), b"update", wait=True
    )
    inbox.wait_for(lambda m: m.payload == b"update")
    assert gateway.connected
    assert RefuseUser.asked["intruder"] == 1  # authenticated once, not twice
    round_trip(broker, make_transport)


def test_a_stranger_with_the_coordinators_client_id_leaves_the_coordinator_hearing(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport
) -> None:
    """Issue 9: the coordinator never heard a partial again after such a CONNECT."""
    kit = build_fleet({"gw-1": ("coordinator", ["dev-01"])}, fleet_id=FLEET)
    broker = serve(access=AccessControl(broker_policy(kit.fleet, COORDINATOR)))
    partials = Inbox()
    coordinator = make_transport(broker.url, COORDINATOR, login=kit.login(COORDINATOR))
    coordinator.subscribe(topics.partials_to(FLEET, COORDINATOR), partials)

    with pytest.raises(ConnectRefused):  # a valid login, another member's client id
        make_transport(broker.url, COORDINATOR, login=kit.login(OBSERVER), backoff_min=0.05,
                       backoff_max=0.05)  # fmt: skip

    gateway = make_transport(broker.url, "tern-plant-7-gw-1-up", login=kit.login("gw-1"))
    gateway.publish(topics.partial(FLEET, COORDINATOR, "gw-1"), b"partial", wait=True)
    partials.wait_for(lambda m: m.payload == b"partial")
    assert coordinator.connected
    assert broker.refused == {"client_id_reserved": 1}


def test_a_client_that_reconnects_takes_over_its_id_and_the_old_will_is_not_sent(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport, raw: Callable[..., Raw]
) -> None:
    """MQTT-3.1.4-2: amqtt kept the old connection, session-less, to send its will later."""
    broker = serve()
    statuses = Inbox()
    make_transport(broker.url, "watcher").subscribe(topics.status_all(FLEET), statuses)
    will = (topics.status(FLEET, "dev-01").path.encode(), b"offline")
    old = raw(broker).login(b"tern-plant-7-dev-01", will=will)

    new = raw(broker).login(b"tern-plant-7-dev-01", will=will)

    assert old.closed_within(2)
    new.send(subscribe_packet(topics.global_model(FLEET).path.encode()))
    assert new.packet()[0] == 0x90  # SUBACK: the new connection is served
    assert collect(statuses) == []
    assert broker.refused == {}


def test_a_persistent_session_taken_over_keeps_serving_its_subscriptions(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport, raw: Callable[..., Raw]
) -> None:
    """amqtt's old loop, finishing late, marked the shared session disconnected under the
    new connection, and closed the new connection."""
    broker = serve()
    topic = topics.global_model(FLEET)
    old = raw(broker).login(b"dashboard", clean=False)
    old.send(subscribe_packet(topic.path.encode()))
    assert old.packet()[0] == 0x90

    new = raw(broker)
    new.send(connect_packet(b"dashboard", clean=False))

    assert new.packet() == (0x20, b"\x01\x00")  # CONNACK: session present
    assert old.closed_within(2)
    make_transport(broker.url, "coordinator").publish(topic, b"model", wait=True)
    first, body = new.packet()
    assert first & 0xF0 == 0x30 and body.endswith(b"model")
    assert broker.refused == {}


# -- before CONNECT ----------------------------------------------------------------------


def test_a_connection_that_never_sends_a_complete_connect_is_closed_after_the_timeout(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport, raw: Callable[..., Raw]
) -> None:
    broker = serve(limits=BrokerLimits(connect_timeout=0.3))
    silent, slow = raw(broker), raw(broker)
    slow.send(connect_packet(b"slow")[:9])  # half a CONNECT
    started = time.monotonic()

    assert silent.closed_within(3) and slow.closed_within(3)

    assert time.monotonic() - started >= 0.25
    settled(broker, {"connect_timeout": 2})
    round_trip(broker, make_transport)


def test_a_first_packet_that_is_not_connect_is_refused(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport, raw: Callable[..., Raw]
) -> None:
    broker = serve()
    client = raw(broker)

    client.send(publish_packet(topics.global_model(FLEET).path.encode(), b"forged"))

    assert client.closed_within(2)
    settled(broker, {"not_connect": 1})
    round_trip(broker, make_transport)


def test_connections_beyond_the_limit_are_closed_at_once(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport, raw: Callable[..., Raw]
) -> None:
    broker = serve(limits=BrokerLimits(max_connections=3))
    held = [raw(broker).login(f"held-{i}".encode()) for i in range(3)]

    extra = [raw(broker) for _ in range(2)]

    assert all(client.closed_within(1) for client in extra)
    settled(broker, {"too_many_connections": 2})
    for client in held[:2]:
        client.close()
    wait_until(lambda: broker.connections == 1, timeout=5)
    round_trip(broker, make_transport)
    assert broker.refused == {"too_many_connections": 2}


# -- packets -----------------------------------------------------------------------------


@needs_proc
@pytest.mark.parametrize("connected", [False, True], ids=["as-connect", "after-connect"])
def test_a_packet_announcing_more_than_the_limit_is_refused_before_its_body_is_read(
    connected: bool,
    serve: Callable[..., EmbeddedBroker],
    make_transport: MakeTransport,
    raw: Callable[..., Raw],
) -> None:
    broker = serve(limits=BrokerLimits(max_packet_bytes=64 << 10, max_queued_bytes=64 << 10))
    round_trip(broker, make_transport, "warm")  # the broker's own allocations come first
    client = raw(broker)
    if connected:
        client.login(b"flooder")
    gc.collect()
    before = rss()
    header = frame(0x30 if connected else 0x10, b"", announced=200 * MIB)

    sender = threading.Thread(target=_send_quietly, args=(client, header + bytes(16 * MIB)))
    sender.start()
    assert client.closed_within(5)
    sender.join(10)

    gc.collect()
    assert rss() - before < 4 * MIB
    settled(broker, {"packet_too_large": 1})
    round_trip(broker, make_transport)


def _send_quietly(client: Raw, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the broker hangs up mid-way, as it should
        client.send(data)


def test_a_publish_on_a_topic_nobody_may_publish_on_is_dropped_and_the_client_kept(
    serve: Callable[..., EmbeddedBroker], raw: Callable[..., Raw], make_transport: MakeTransport
) -> None:
    """amqtt raised on a wildcard topic and then read the payload as the next packet:
    here a forged header announcing 200 MiB that no size check would have seen."""
    broker = serve()
    inbox = Inbox()
    make_transport(broker.url, "watcher").subscribe(topics.telemetry_all(FLEET), inbox)
    client = raw(broker).login(b"dev-01")
    smuggled = frame(0x30, b"", announced=200 * MIB)
    good = topics.telemetry(FLEET, "dev-01").path.encode()

    for topic in [b"tern/plant-7/telemetry/#", b"", b"$SYS/broker", b"tern/\xff"]:
        client.send(publish_packet(topic, smuggled))
    client.send(publish_packet(good, b"reading"))

    inbox.wait_for(lambda m: m.payload == b"reading")
    assert collect(inbox) == [(good.decode(), b"reading", False)]
    client.send(frame(0xC0, b""))  # PINGREQ
    assert client.packet() == (0xD0, b"")  # still connected
    settled(broker, {"bad_topic": 4})


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(frame(0x40, b"\x00\x01\x30\x7f"), id="puback-too-long"),
        pytest.param(subscribe_packet(b"tern/\xff"), id="filter-not-utf8"),
        pytest.param(frame(0x82, b"\x00\x01"), id="subscribe-without-filter"),
        pytest.param(connect_packet(b"again"), id="second-connect"),
        pytest.param(frame(0x20, b"\x00\x00"), id="connack-from-a-client"),
        pytest.param(publish_packet(b"t", b"", qos=3), id="qos-3"),
        pytest.param(frame(0x38, text(b"t") + b"payload"), id="qos-0-dup"),
        pytest.param(b"\xc0\xff\xff\xff\xff\x01", id="length-of-5-bytes"),
    ],
)
def test_a_packet_mqtt_does_not_allow_closes_the_connection(
    packet: bytes,
    serve: Callable[..., EmbeddedBroker],
    raw: Callable[..., Raw],
    make_transport: MakeTransport,
) -> None:
    broker = serve()
    client = raw(broker).login(b"dev-01")

    client.send(packet)

    assert client.closed_within(2)
    settled(broker, {"protocol_error": 1})
    round_trip(broker, make_transport)
