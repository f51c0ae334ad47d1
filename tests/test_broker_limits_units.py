"""The broker limits' pieces without a broker: token buckets, the CONNECT and SUBSCRIBE body
checks, which limits are refused, and the amqtt internals the embedded broker overrides.
"""

from __future__ import annotations

from typing import Any

import pytest

from broker import amqtt_broker
from broker.embedded import check_amqtt_internals
from broker.errors import BrokerConfigError, BrokerError
from broker.fleet_access import max_packet_bytes
from broker.limits import (
    BrokerLimits,
    Reason,
    TokenBuckets,
    connect_well_formed,
    fleet_limits,
    sized_for_packets,
    subscription_well_formed,
)
from tests.fleet_fixtures import build_fleet
from tests.raw_mqtt import MIB, connect_packet, text

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
        "tls_failed",
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
