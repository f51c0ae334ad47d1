"""Issue 9's attacks, end to end: a real coordinator, a real gateway with its own broker,
real devices, and an attacker holding one device (its key and its login) or none.

Every test shows the attack refused, counted where tern counts it, the component alive,
and the next round unharmed. Each runs on the embedded brokers (the fleet's policy and
limits) and, where it applies, on Mosquitto configured by `tern mosquitto-config`.
The demo's model (MLP 40-100-100-10) and the coordinator's default bounds throughout.
The plant is tests/attack_plant.py; the brokers' side (strangers, freshness) is in
test_attacks_brokers.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import cbor2
import numpy as np
import pytest

from broker.fleet_access import max_packet_bytes
from coordinator.store import RoundRecord
from tern import topics
from tern.codecs import CodecName, codec_for
from tern.envelope import Kind
from tern.messages import Update, encode_update
from tests.attack_plant import BROKERS, SPEC, TAKEN, WAIT, Attacker, Plant, shared_reference_bomb
from tests.helpers import wait_until


@pytest.fixture(params=BROKERS)
def plant(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Plant]:
    with ExitStack() as stack:
        yield Plant(request.param, tmp_path, stack)


@pytest.fixture
def amqtt_plant(tmp_path: Path) -> Iterator[Plant]:
    with ExitStack() as stack:
        yield Plant("amqtt", tmp_path, stack)


def attacked_round(
    plant: Plant, attack: Callable[[Attacker], None], *, settle: bool = True
) -> tuple[RoundRecord, RoundRecord, dict[str, int]]:
    """Round 1 with `attack` (then, with `settle`, the attacker's own honest update, so the
    round closes early); round 2 honest. Returns both records and the gateway's round 1
    refusals (its metrics)."""
    c = plant.coordinator(rounds=2)
    attack(plant.attacker)
    if settle:
        plant.attacker.send(plant.attacker.seal(1, plant.attacker.honest_body(1)))
    first = c.wait_for_round(1, WAIT)
    rejected = dict(plant.gateway.wait_for_round(1, WAIT).rejected)
    plant.attacker.send(plant.attacker.seal(2, plant.attacker.honest_body(2)))
    second = c.wait_for_round(2, WAIT)
    assert second.ok and second.contributors == 3, second  # the next round is unharmed
    assert np.isfinite(c.weights).all()
    return first, second, rejected


# -- CBOR that cannot explode ------------------------------------------------------------


def test_a_shared_reference_bomb_from_a_device_is_refused_and_the_gateway_lives_on(
    plant: Plant,
) -> None:
    def attack(a: Attacker) -> None:
        a.send(a.with_raw_body(1, shared_reference_bomb()))
        a.send(a.with_raw_body(1, b"\xa1\x66tensors" + shared_reference_bomb()))

    first, _, rejected = attacked_round(plant, attack)

    assert first.ok and first.contributors == 3
    assert rejected == {"malformed": 2}


def test_decimal_bigfloat_and_rational_tags_are_refused_before_they_are_computed(
    plant: Plant,
) -> None:
    # A 32,000-bit mantissa: under the update's byte cap, so the tag itself is refused.
    huge = cbor2.dumps(cbor2.CBORTag(2, b"\xff" * 4_000))

    def attack(a: Attacker) -> None:
        for tag in (4, 5, 30):
            a.send(a.with_raw_body(1, bytes([0xC0 | tag]) + b"\x82\x00" + huge))

    first, _, rejected = attacked_round(plant, attack)

    assert rejected == {"malformed": 3} and first.contributors == 3


def test_a_device_signing_a_partial_that_counts_a_thousand_is_refused(plant: Plant) -> None:
    def attack(a: Attacker) -> None:
        body = a.honest_body(1)
        body["count"], body["weight"] = 1000, 1000.0
        a.send(a.seal(1, body, kind=Kind.PARTIAL))

    first, _, rejected = attacked_round(plant, attack)

    assert rejected == {"wrong_kind": 1}
    assert first.contributors == 3  # not 1,002


@pytest.mark.parametrize("weight", [1e30, 5e-324])
def test_the_demo_defaults_refuse_an_absurd_weight(plant: Plant, weight: float) -> None:
    def attack(a: Attacker) -> None:
        a.send(a.seal(1, a.honest_body(1, weight=weight)))

    first, _, rejected = attacked_round(plant, attack)

    assert rejected == {"weight_bound": 1} and first.ok


def test_the_demo_defaults_refuse_an_update_scaled_by_a_hundred(plant: Plant) -> None:
    def attack(a: Attacker) -> None:
        a.send(a.seal(1, a.honest_body(1, scale=100.0)))

    first, _, rejected = attacked_round(plant, attack)

    assert rejected == {"norm_bound": 1} and first.ok


def test_an_update_for_another_model_version_or_in_another_codec_is_refused(
    plant: Plant,
) -> None:
    def attack(a: Attacker) -> None:
        a.send(a.seal(1, a.honest_body(1), model_version=7))
        body = Update.from_body(a.honest_body(1)).check(SPEC).to_partial()
        a.send(a.seal(1, encode_update(codec_for(CodecName.FLOAT16), SPEC, body)[0].to_body()))

    _, _, rejected = attacked_round(plant, attack)

    # float16 is larger than any ternary update: refused by its size before its codec
    assert rejected == {"wrong_model": 1, "oversize": 1}


def test_a_flood_of_bad_updates_is_counted_exactly(amqtt_plant: Plant) -> None:
    sent = 300

    def attack(a: Attacker) -> None:
        a.schedule(1)
        for i in range(sent):
            a.send(b"\xa9" + i.to_bytes(4, "big") + b" junk")

    first, _, rejected = attacked_round(amqtt_plant, attack, settle=False)

    # a few verified by reason, then no more checks: the rest refused unread, or dropped by
    # the broker's rate limit; every one counted once, none lost
    assert sum(rejected.values()) == sent, rejected
    assert rejected["malformed"] == 4
    assert set(rejected) <= {"malformed", "rate_limited", "access_rate_limited"}
    assert first.ok and first.contributors == 2


def test_a_device_cannot_publish_far_beyond_an_update_s_size(amqtt_plant: Plant) -> None:
    limit = max_packet_bytes(amqtt_plant.kit.fleet)
    gateway = amqtt_plant.gateway

    def attack(a: Attacker) -> None:
        a.schedule(1)
        # the broker refuses it from its header and closes the connection: no PUBACK
        # (QoS 0, or paho would send it again on every reconnect)
        a.transport.publish(topics.update(a.f, "gw-1", TAKEN), b"\x00" * (limit + 1), qos=0)
        wait_until(lambda: gateway.access_refused.get("packet_too_large") == 1)
        wait_until(lambda: a.transport.stats.reconnects >= 1 and a.transport.connected)

    _, _, rejected = attacked_round(amqtt_plant, attack)

    assert rejected == {"access_packet_too_large": 1}
    assert amqtt_plant.gateway.access_refused == {"packet_too_large": 1}
