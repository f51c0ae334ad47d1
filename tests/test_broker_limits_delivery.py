"""The embedded broker's limits on what it keeps and delivers: retained messages by count
and bytes, queues of subscribers that never acknowledge, QoS 2 never released, and the
rate limit. A real amqtt broker in this process, as in test_broker_limits.py.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pytest

from broker.access import AccessControl
from broker.acl import AccessPolicy, Account, Rights
from broker.embedded import EmbeddedBroker
from broker.limits import BrokerLimits
from tern import topics
from tern.logins import hash_password
from tests.helpers import wait_until
from tests.mqtt_fixtures import Inbox, MakeTransport
from tests.raw_mqtt import (
    FLEET,
    MIB,
    QUIET,
    Raw,
    broker_starter,
    collect,
    frame,
    needs_proc,
    publish_packet,
    raw_opener,
    round_trip,
    rss,
    settled,
    subscribe_packet,
)

# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def serve(stack: ExitStack) -> Callable[..., EmbeddedBroker]:
    """`serve(limits=..., access=..., config=...)`: a started broker, stopped at the end."""
    return broker_starter(stack)


@pytest.fixture
def raw(stack: ExitStack) -> Callable[[EmbeddedBroker], Raw]:
    return raw_opener(stack)


def collect_messages(inbox: Inbox) -> list[Any]:
    """Everything `inbox` got, once nothing more came for a while, in arrival order."""
    time.sleep(QUIET)
    return list(inbox.messages)


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
