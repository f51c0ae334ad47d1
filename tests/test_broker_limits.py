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
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from broker import amqtt_broker
from broker.access import AccessControl
from broker.acl import AccessPolicy, Account, Rights
from broker.embedded import EmbeddedBroker, check_amqtt_internals
from broker.errors import BrokerConfigError, BrokerError, ConnectRefused
from broker.fleet_access import broker_policy, max_packet_bytes
from broker.limits import (
    BrokerLimits,
    Reason,
    TokenBuckets,
    connect_well_formed,
    fleet_limits,
    sized_for_packets,
    subscription_well_formed,
)
from tern import topics
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER, hash_password
from tests.broker_plugins import RefuseUser
from tests.fleet_fixtures import build_fleet
from tests.helpers import wait_until
from tests.mqtt_fixtures import Inbox, MakeTransport

FLEET = "plant-7"
QUIET = 0.4  # how long "nothing else arrives" is watched for
MIB = 1 << 20


# -- MQTT by hand ------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(first: int, body: bytes, announced: int | None = None) -> bytes:
    """A packet: byte 1, the remaining length (`announced`, or the body's), the body."""
    return bytes([first]) + _varint(len(body) if announced is None else announced) + body


def text(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(
    client_id: bytes,
    user: bytes | None = None,
    will: tuple[bytes, bytes] | None = None,
    clean: bool = True,
) -> bytes:
    flags = (0x02 if clean else 0) | (0x80 if user else 0) | (0x24 if will else 0)  # retained will
    body = text(b"MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big") + text(client_id)
    if will:
        body += text(will[0]) + text(will[1])
    return frame(0x10, body + (text(user) if user else b""))


def publish_packet(topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 1) -> bytes:
    body = text(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return frame(0x30 | qos << 1, body)


def subscribe_packet(topic_filter: bytes, qos: int = 1, packet_id: int = 1) -> bytes:
    return frame(0x82, packet_id.to_bytes(2, "big") + text(topic_filter) + bytes([qos]))


class Raw:
    """A bare TCP client that writes whatever it is told to."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def login(self, client_id: bytes, **kwargs: Any) -> Raw:
        self.send(connect_packet(client_id, **kwargs))
        assert self.packet() == (0x20, b"\x00\x00"), "CONNECT not accepted"
        return self

    def packet(self) -> tuple[int, bytes]:
        """The next packet the broker sends: (byte 1, body)."""
        first = self._exactly(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._exactly(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return first, self._exactly(length)

    def closed_within(self, timeout: float) -> bool:
        """Whether the broker closes the connection within `timeout` (data is discarded)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker")
            data += chunk
        return data


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def serve(stack: ExitStack) -> Callable[..., EmbeddedBroker]:
    """`serve(limits=..., access=..., config=...)`: a started broker, stopped at the end."""

    def start(**kwargs: Any) -> EmbeddedBroker:
        return stack.enter_context(EmbeddedBroker("127.0.0.1", 0, **kwargs))

    return start


@pytest.fixture(autouse=True)
def _fresh_refuse_user() -> Iterator[None]:
    """RefuseUser counts in a class attribute: each test starts from none."""
    RefuseUser.asked.clear()
    yield
    RefuseUser.asked.clear()


@pytest.fixture
def raw(stack: ExitStack) -> Callable[[EmbeddedBroker], Raw]:
    def open_raw(broker: EmbeddedBroker) -> Raw:
        client = Raw(broker.port)
        stack.callback(client.close)
        return client

    return open_raw


def rss() -> int:
    """This process's resident memory in bytes (the broker runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


needs_proc = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")


def settled(broker: EmbeddedBroker, expected: dict[str, int]) -> None:
    """`broker.refused` reaches `expected` and stays there (no late extra refusal)."""
    wait_until(lambda: broker.refused == expected, timeout=5)
    time.sleep(0.1)
    assert broker.refused == expected


def round_trip(broker: EmbeddedBroker, make_transport: MakeTransport, name: str = "check") -> None:
    """A normal subscriber receives what a normal publisher sends through `broker`."""
    inbox = Inbox()
    topic = topics.telemetry(FLEET, name)
    make_transport(broker.url, f"{name}-sub").subscribe(topic, inbox)
    make_transport(broker.url, f"{name}-pub").publish(topic, b"still serving", wait=True)
    inbox.wait_for(lambda m: m.payload == b"still serving")


def collect(inbox: Inbox, quiet: float = QUIET) -> list[tuple[str, bytes, bool]]:
    """Everything `inbox` got, once nothing more came for `quiet` seconds, sorted."""
    time.sleep(quiet)
    return sorted((m.topic, m.payload, m.retain) for m in inbox.messages)


def collect_messages(inbox: Inbox) -> list[Any]:
    """Everything `inbox` got, once nothing more came for a while, in arrival order."""
    time.sleep(QUIET)
    return list(inbox.messages)


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


# -- retained messages -------------------------------------------------------------------


def test_retained_messages_beyond_the_count_are_not_kept_but_replacing_and_clearing_work(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport
) -> None:
    broker = serve(limits=BrokerLimits(max_retained=2))
    publisher = make_transport(broker.url, "dev-01")
    live = Inbox()
    make_transport(broker.url, "live").subscribe(topics.status_all(FLEET), live)

    def retain(device: str, payload: bytes) -> None:
        publisher.publish(topics.status(FLEET, device), payload, retain=True, wait=True)

    retain("dev-01", b"a1")
    retain("dev-02", b"b1")
    retain("dev-03", b"c1")  # a third: not kept
    retain("dev-01", b"a2")  # replacing
    retain("dev-02", b"")  # clearing
    retain("dev-03", b"c2")  # fits again
    later = Inbox()
    make_transport(broker.url, "later").subscribe(topics.status_all(FLEET), later)

    assert collect(later) == [
        (topics.status(FLEET, "dev-01").path, b"a2", True),
        (topics.status(FLEET, "dev-03").path, b"c2", True),
    ]
    assert b"c1" in {m.payload for m in live.messages}  # not kept, still delivered
    assert broker.refused == {"retained_full": 1}


def test_retained_messages_beyond_the_bytes_are_not_kept_but_replacing_and_clearing_work(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport
) -> None:
    topic_bytes = len(topics.status(FLEET, "dev-01").path)
    broker = serve(limits=BrokerLimits(max_retained_bytes=2 * topic_bytes + 300))
    publisher = make_transport(broker.url, "dev-01")

    def retain(device: str, size: int) -> None:
        publisher.publish(topics.status(FLEET, device), b"x" * size, retain=True, wait=True)

    retain("dev-01", 200)
    retain("dev-02", 200)  # 400 > 300: not kept
    retain("dev-01", 290)  # replacing, 290 fits
    retain("dev-02", 10)  # 300 fits
    retain("dev-01", 0)  # clearing
    retain("dev-03", 280)  # 290 fits
    later = Inbox()
    make_transport(broker.url, "later").subscribe(topics.status_all(FLEET), later)

    assert [(t[0], len(t[1])) for t in collect(later)] == [
        (topics.status(FLEET, "dev-02").path, 10),
        (topics.status(FLEET, "dev-03").path, 280),
    ]
    assert broker.refused == {"retained_full": 1}


def test_a_new_subscriber_gets_every_retained_message_however_small_its_queue(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport
) -> None:
    broker = serve(limits=BrokerLimits(max_inflight=2, max_queued=4, publish_burst=100))
    publisher = make_transport(broker.url, "gw-1")
    for i in range(30):
        publisher.publish(topics.status(FLEET, f"dev-{i:02d}"), b"online", retain=True)
    publisher.publish(topics.status(FLEET, "gw-1"), b"online", retain=True, wait=True)
    inbox = Inbox()

    make_transport(broker.url, "dashboard").subscribe(topics.status_all(FLEET), inbox)

    wait_until(lambda: len(inbox.messages) == 31, timeout=5)
    assert len(collect(inbox)) == 31
    assert broker.refused == {}


def test_a_retained_publish_without_the_retain_right_is_dropped_entirely(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport
) -> None:
    status = topics.status(FLEET, "dev-01").path
    policy = AccessPolicy(
        accounts={
            "dev-01": Account(hash_password("pw"), Rights(publish=(status,))),
            "watcher": Account(hash_password("pw"), Rights(subscribe=(f"tern/{FLEET}/#",))),
        }
    )
    broker = serve(access=AccessControl(policy), limits=BrokerLimits(publish_burst=2))
    inbox = Inbox()
    make_transport(broker.url, "w", login=("watcher", "pw")).subscribe(
        topics.status_all(FLEET), inbox
    )
    device = make_transport(broker.url, "d", login=("dev-01", "pw"))

    device.publish(topics.status(FLEET, "dev-01"), b"kept?", retain=True, wait=True)
    device.publish(topics.status(FLEET, "dev-01"), b"plain", wait=True)
    device.publish(topics.status(FLEET, "dev-01"), b"over the burst", wait=True)

    inbox.wait_for(lambda m: m.payload == b"plain")
    assert collect(inbox) == [(status, b"plain", False)]
    # the broker's own refusals and its access policy's, in one count
    settled(broker, {"retain_denied": 1, "rate_limited": 1})


# -- deliveries and rates ----------------------------------------------------------------


@needs_proc
def test_a_subscriber_that_never_acknowledges_does_not_grow_the_broker(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport, raw: Callable[..., Raw]
) -> None:
    limits = BrokerLimits(
        max_inflight=4,
        max_queued=10,
        max_packet_bytes=64 << 10,
        max_queued_bytes=1 * MIB,
        publish_burst=1000,
    )
    broker = serve(limits=limits)
    topic = topics.telemetry(FLEET, "dev-01")
    stuck = raw(broker).login(b"stuck")
    stuck.send(subscribe_packet(topic.path.encode()))
    assert stuck.packet()[0] == 0x90  # SUBACK; from now on it reads and acknowledges nothing
    publisher = make_transport(broker.url, "dev-01")
    publisher.publish(topic, b"warm-up", wait=True)
    gc.collect()
    before = rss()

    for i in range(400):  # 12.5 MiB that the broker would otherwise hold for 5 s
        publisher.publish(topic, i.to_bytes(4, "big") * (8 << 10), wait=True)

    settled(broker, {"inflight_full": 401 - 10})  # 10 kept: the warm-up and 9 more
    gc.collect()
    assert rss() - before < 4 * MIB
    round_trip(broker, make_transport)


def test_incoming_qos2_messages_never_released_are_bounded(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport, raw: Callable[..., Raw]
) -> None:
    broker = serve(limits=BrokerLimits(max_inflight=4, max_queued=4))
    client = raw(broker).login(b"dev-01")
    topic = topics.telemetry(FLEET, "dev-01").path.encode()

    for packet_id in range(1, 8):  # never a PUBREL
        client.send(publish_packet(topic, b"held", qos=2, packet_id=packet_id))

    assert client.closed_within(2)
    settled(broker, {"inflight_full": 1})
    round_trip(broker, make_transport)


def test_the_rate_limit_drops_exactly_what_exceeds_the_bucket(
    serve: Callable[..., EmbeddedBroker], make_transport: MakeTransport
) -> None:
    limits = BrokerLimits(publish_rate=0.01, publish_burst=10, unlimited_users=frozenset({"gw-1"}))
    broker = serve(limits=limits)
    inbox = Inbox()
    make_transport(broker.url, "watcher").subscribe(topics.telemetry_all(FLEET), inbox)
    device = make_transport(broker.url, "dev-01")
    gateway = make_transport(broker.url, "gw-1-down", login=("gw-1", "any"))

    for i in range(25):
        device.publish(topics.telemetry(FLEET, "dev-01"), b"d%d" % i, wait=True)
        gateway.publish(topics.telemetry(FLEET, "gw-1"), b"g%d" % i, wait=True)

    inbox.wait_for(lambda m: m.payload == b"g24")
    received = [m.payload for m in collect_messages(inbox)]
    assert [p for p in received if p.startswith(b"d")] == [b"d%d" % i for i in range(10)]
    assert len([p for p in received if p.startswith(b"g")]) == 25  # exempt
    assert device.connected
    settled(broker, {"rate_limited": 15})


@needs_proc
def test_a_flood_beyond_the_rate_is_counted_exactly_and_does_not_grow_the_broker(
    serve: Callable[..., EmbeddedBroker],
    make_transport: MakeTransport,
    raw: Callable[..., Raw],
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = serve(limits=BrokerLimits(publish_rate=0.01, publish_burst=10))
    round_trip(broker, make_transport, "warm")
    flooder = raw(broker).login(b"dev-01")
    topic = topics.telemetry(FLEET, "dev-01").path.encode()
    flood = b"".join(publish_packet(topic, bytes(1024)) for _ in range(5000))
    gc.collect()
    before = rss()

    flooder.send(flood)

    settled(broker, {"rate_limited": 5000 - 10})
    gc.collect()
    assert rss() - before < 4 * MIB
    logged = [r for r in caplog.records if "rate_limited" in r.getMessage()]
    assert len(logged) == 1  # once per client, reason and minute
    flooder.send(frame(0xC0, b""))  # PINGREQ
    assert flooder.packet() == (0xD0, b"")  # still connected
    round_trip(broker, make_transport)


# -- the pieces, without a broker --------------------------------------------------------


def test_token_buckets_refill_at_the_rate_and_forget_full_buckets() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, max_keys=2, clock=lambda: now[0])

    taken = [buckets.take("a") for _ in range(4)]
    now[0] = 0.5  # one token back
    again = [buckets.take("a"), buckets.take("a")]
    buckets.take("b")
    now[0] = 100.0  # both full again: forgotten when a third client comes
    buckets.take("c")

    assert taken == [True, True, True, False]
    assert again == [True, False]
    assert len(buckets._buckets) == 1


def test_connect_and_subscribe_bodies_are_checked_field_by_field() -> None:
    good = connect_packet(b"dev-01", user=b"dev-01", will=(b"t", b"w"))[2:]

    assert connect_well_formed(good)
    assert not connect_well_formed(good + b"\x00")  # a byte amqtt would never read
    assert not connect_well_formed(good[:-1])
    assert subscription_well_formed(b"\x00\x01" + text(b"a/#") + b"\x01", with_qos=True)
    assert not subscription_well_formed(b"\x00\x01" + text(b"a") + b"\x03", with_qos=True)
    assert not subscription_well_formed(b"\x00\x01" + text(b""), with_qos=False)


@pytest.mark.parametrize(
    "change",
    [
        {"max_inflight": 0},
        {"connect_timeout": float("inf")},
        {"publish_rate": -1.0},
        {"max_connections": 2.5},
        {"max_packet_bytes": 1 << 29},
        {"max_queued": 8, "max_inflight": 16},
        {"max_queued_bytes": 1 << 10},
        {"unlimited_users": "gw-1"},
    ],
)
def test_limits_that_cannot_work_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(BrokerConfigError):
        BrokerLimits(**change)


def test_limits_sized_for_larger_packets_keep_room_for_them() -> None:
    limits = sized_for_packets(BrokerLimits(), 100 * MIB)

    assert limits.max_packet_bytes == 100 * MIB
    assert limits.max_retained_bytes == 400 * MIB and limits.max_queued_bytes == 200 * MIB


def test_a_gateways_broker_exempts_it_and_its_child_gateways_from_the_rate() -> None:
    kit = build_fleet({"gw-1": ("coordinator", ["dev-01"]), "gw-1a": ("gw-1", ["dev-02"])})

    limits = fleet_limits(kit.fleet, "gw-1")

    assert limits.unlimited_users == {"gw-1", "gw-1a"}
    assert limits.max_packet_bytes == max_packet_bytes(kit.fleet)
    with pytest.raises(BrokerConfigError):
        fleet_limits(kit.fleet, "dev-01")


def test_the_refusal_reasons_are_the_documented_counter_keys() -> None:
    assert {r.value for r in Reason} == {
        "packet_too_large", "too_many_connections", "connect_timeout", "not_connect",
        "protocol_error", "bad_topic", "retained_full", "inflight_full", "rate_limited",
    }  # fmt: skip


def test_the_amqtt_internals_the_broker_relies_on_are_still_there() -> None:
    from importlib.metadata import version

    check_amqtt_internals()

    assert version("amqtt").startswith("0.12."), "update AMQTT_INTERNALS, then the pin"


def test_an_amqtt_that_moved_an_overridden_method_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moved = {"amqtt.broker.Broker": {"_client_connected": ("listener", "reader", "writer")}}
    monkeypatch.setattr(amqtt_broker, "AMQTT_INTERNALS", moved)

    with pytest.raises(BrokerError, match="_client_connected"):
        check_amqtt_internals()
