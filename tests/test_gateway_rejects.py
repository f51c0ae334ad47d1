"""Gateways refuse bad input from below, against real brokers: each refusal is counted by
reason in the round's metrics, and the round completes without it.
"""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
from nacl.signing import SigningKey

from broker.transport import MqttTransport
from tern import topics
from tern.aggregate import Partial
from tern.codecs import CodecName, codec_for
from tern.envelope import Envelope, Kind, seal
from tern.messages import encode_update
from tern.reports import RoundMetrics
from tern.spec import ModelSpec
from tests.fleet_fixtures import FleetKit, FleetRig, build_fleet
from tests.gateway_helpers import ONE, SPEC, WAIT, Coordinator
from tests.helpers import wait_until
from tests.mqtt_fixtures import AmqttBroker, MakeTransport


def _sealed(kit: FleetKit, sender: str, round: int, body: object, **kw: object) -> bytes:
    env = Envelope(Kind.UPDATE, str(kw.get("fleet", kit.fleet.fleet)), round, 1, sender, body)
    key = kw.get("key", kit.keys[sender])
    assert isinstance(key, SigningKey)
    return seal(env, key)


def _valid_body(seed: int) -> dict[str, object]:
    delta = np.random.default_rng(seed).standard_normal(SPEC.size).astype(np.float32)
    update, _ = encode_update(codec_for(CodecName.TERNARY), SPEC, Partial(delta, 10.0, 1))
    return update.to_body()


def compromised(kit: FleetKit, url: str, device: str, make: MakeTransport) -> MqttTransport:
    """A connection with `device`'s own login: what an attacker holding that device has."""
    client_id = sorted(kit.fleet.client_ids(device))[0]
    return make(url, client_id, login=kit.login(device))


def test_gateway_counts_bad_input_by_reason_and_completes_the_round(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, stack: ExitStack
) -> None:
    kit = build_fleet(ONE)
    f = kit.fleet.fleet
    coordinator = Coordinator(kit, make_transport(amqtt_broker.url, "coord"))
    rig = FleetRig(kit, amqtt_broker.url, stack)
    gateway = rig.gateway("gw-1")
    rig.device("dev-01")
    rig.device("dev-02")
    attacker = compromised(kit, gateway.downstream_url, "dev-03", make_transport)
    own_topic = topics.update(f, "gw-1", "dev-03")

    wrong_shape, _ = encode_update(
        codec_for(CodecName.TERNARY),
        ModelSpec.of({"w0": (2, 2)}),
        Partial(np.ones(4, np.float32), 1.0, 1),
    )
    nan_body = _valid_body(0)
    nan_body["tensors"][0]["scale"] = float("nan")  # type: ignore[index]
    bad_input = [
        (own_topic, b"\xff\x00 not an envelope"),
        (own_topic, _sealed(kit, "dev-03", 1, wrong_shape.to_body())),
        (own_topic, _sealed(kit, "dev-03", 1, nan_body)),
        (own_topic, _sealed(kit, "dev-03", 0, _valid_body(1))),
        # past its few checks per round (tern.collect.MAX_ATTEMPTS) nothing more is verified
        (own_topic, _sealed(kit, "dev-03", 1, _valid_body(2), fleet="other-fleet")),
        (own_topic, _sealed(kit, "dev-03", 1, _valid_body(3), key=SigningKey(bytes(32)))),
        (own_topic, _sealed(kit, "dev-03", 1, _valid_body(5))),
        # another device's topic: the broker drops it
        (topics.update(f, "gw-1", "dev-01"), _sealed(kit, "dev-03", 1, _valid_body(4))),
    ]

    coordinator.open_round(1, 1, seconds=3.0)
    wait_until(lambda: gateway.open_round == 1)
    for topic, data in bad_input:
        attacker.publish(topic, data, wait=True)
    metrics = gateway.wait_for_round(1, WAIT)

    assert metrics.rejected == {
        "malformed": 1,
        "wrong_shape": 1,
        "non_finite": 1,
        "stale_round": 1,
        "rate_limited": 3,
        "access_publish_denied": 1,
    }
    assert (metrics.contributors, metrics.dropped) == (2, 1)
    published = RoundMetrics.from_json(coordinator.metrics.wait_for(timeout=WAIT).payload)
    assert published.rejected == metrics.rejected

    # Still running: the next round completes with the good devices alone.
    coordinator.open_round(2, 2, participants=["dev-01", "dev-02"], seconds=5.0)
    assert gateway.wait_for_round(2, WAIT).contributors == 2


def test_gateway_rejects_an_update_on_a_partial_topic(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, stack: ExitStack
) -> None:
    kit = build_fleet(ONE)
    coordinator = Coordinator(kit, make_transport(amqtt_broker.url, "coord"))
    rig = FleetRig(kit, amqtt_broker.url, stack)
    gateway = rig.gateway("gw-1")
    attacker = compromised(kit, gateway.downstream_url, "dev-03", make_transport)

    coordinator.open_round(1, 1, participants=["dev-03"], seconds=1.5)
    wait_until(lambda: gateway.open_round == 1)
    wrong = topics.partial(kit.fleet.fleet, "gw-1", "dev-03")
    attacker.publish(wrong, _sealed(kit, "dev-03", 1, _valid_body(1)), wait=True)
    metrics = gateway.wait_for_round(1, WAIT)

    assert metrics.rejected == {"access_publish_denied": 1}  # the broker drops it
    assert (metrics.contributors, metrics.dropped) == (0, 1)
    assert 1 not in gateway.partials  # nothing accepted: no partial
