"""Issue 9's attacks on the brokers, end to end: strangers kept out of the fleet's client ids
and topics, and replayed or hostile retained messages on an open broker refused as stale or
malformed, at no cost to the gateway. The plant (real coordinator, gateway, devices and an
attacker) is tests/attack_plant.py's, as in test_attacks.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import cbor2
import numpy as np
import pytest

from broker.embedded import EmbeddedBroker
from broker.errors import ConnectRefused, SubscribeError
from broker.transport import MqttTransport
from gateway import Gateway, GatewayConfig
from tern import topics
from tern.envelope import Envelope, Kind, canonical, seal
from tern.fleet import COORDINATOR
from tern.freshness import Stamp
from tern.logins import OBSERVER
from tern.messages import GlobalModel
from tests.attack_plant import BROKERS, LAYOUT, SPEC, TAKEN, WAIT, Plant, shared_reference_bomb
from tests.fleet_fixtures import FleetKit, build_fleet
from tests.helpers import wait_until
from tests.mqtt_fixtures import Inbox


@pytest.fixture(params=BROKERS)
def plant(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Plant]:
    with ExitStack() as stack:
        yield Plant(request.param, tmp_path, stack)


# -- brokers that keep strangers out ----------------------------------------------------


def test_a_stranger_cannot_take_the_coordinator_s_client_id(plant: Plant) -> None:
    c = plant.coordinator(rounds=2)
    plant.attacker.schedule(1)
    for login in (None, ("coordinator", "guess"), plant.kit.login(TAKEN)):
        with pytest.raises(ConnectRefused):
            MqttTransport(
                plant.top_url, COORDINATOR, login=login, backoff_min=0.05, backoff_max=0.05
            ).connect(3.0)

    plant.attacker.send(plant.attacker.seal(1, plant.attacker.honest_body(1)))
    assert c.wait_for_round(1, WAIT).contributors == 3
    plant.attacker.send(plant.attacker.seal(2, plant.attacker.honest_body(2)))
    assert c.wait_for_round(2, WAIT).contributors == 3  # it still hears every partial
    if plant.kind == "amqtt":
        assert plant.top.refused == {
            "anonymous": 1,
            "bad_password": 1,
            "unknown_user": 1,  # the device has no account on the coordinator's broker
        }


def test_a_refused_connect_with_the_gateway_s_own_client_id_leaves_it_folding(
    plant: Plant,
) -> None:
    c = plant.coordinator(rounds=2)
    down_id = f"tern-{plant.f}-gw-1-down"
    with pytest.raises(ConnectRefused):
        MqttTransport(
            plant.gateway.downstream_url, down_id, backoff_min=0.05, backoff_max=0.05
        ).connect(3.0)
    if plant.kind == "amqtt":  # Mosquitto makes any login's client id its user name
        with pytest.raises(ConnectRefused):
            MqttTransport(
                plant.gateway.downstream_url,
                down_id,
                login=plant.kit.login(OBSERVER),
                backoff_min=0.05,
                backoff_max=0.05,
            ).connect(3.0)

    plant.attacker.send(plant.attacker.seal(1, plant.attacker.honest_body(1)))
    assert c.wait_for_round(1, WAIT).contributors == 3
    plant.attacker.send(plant.attacker.seal(2, plant.attacker.honest_body(2)))
    assert c.wait_for_round(2, WAIT).contributors == 3


def test_a_device_can_neither_overwrite_the_model_nor_read_the_others_updates(
    plant: Plant,
) -> None:
    c = plant.coordinator(rounds=2)
    a = plant.attacker
    _, s = a.schedule(1)
    seen = Inbox()
    # amqtt refuses the subscription; Mosquitto grants it and delivers nothing
    with contextlib.suppress(SubscribeError):
        a.transport.subscribe(topics.Topic(topics.TopicKind.UPDATE, plant.f, "gw-1"), seen)
    forged = GlobalModel(SPEC, np.zeros(SPEC.size, np.float32)).to_body()
    a.send(a.seal(1, forged, kind=Kind.MODEL), topics.global_model(plant.f))
    a.send(a.seal(1, s.to_body(), kind=Kind.SCHEDULE), topics.round_schedule(plant.f))

    a.send(a.seal(1, a.honest_body(1)))
    first = c.wait_for_round(1, WAIT)
    a.send(a.seal(2, a.honest_body(2)))
    second = c.wait_for_round(2, WAIT)

    assert first.contributors == second.contributors == 3
    assert [m for m in seen.messages if TAKEN not in m.topic] == []
    # the model retained on the gateway's broker is still the coordinator's
    retained = Inbox()
    plant.observer(plant.gateway.downstream_url).subscribe(topics.global_model(plant.f), retained)
    newest = retained.wait_for(
        lambda m: cbor2.loads(m.payload)["model"] == second.model_version, WAIT
    )
    assert cbor2.loads(newest.payload)["sender"] == COORDINATOR
    if plant.kind == "amqtt":
        refused = plant.gateway.access_refused
        assert refused["publish_denied"] == 2 and refused["subscribe_denied"] == 1


def test_the_observer_reads_every_topic_and_publishes_nothing(plant: Plant) -> None:
    c = plant.coordinator(rounds=1)
    seen = Inbox()
    dashboard = plant.observer(plant.top_url)
    dashboard.subscribe(topics.Topic(topics.TopicKind.METRICS, plant.f), seen)
    dashboard.publish(topics.metrics(plant.f, COORDINATOR), b"{}", retain=True, wait=True)

    plant.attacker.send(plant.attacker.seal(1, plant.attacker.honest_body(1)))
    record = c.wait_for_round(1, WAIT)

    wait_until(lambda: any(b'"component":"coordinator"' in m.payload for m in seen.messages))
    assert all(m.payload != b"{}" for m in seen.messages)
    assert record.ok


# -- freshness ---------------------------------------------------------------------------


def gateway_config(kit: FleetKit, upstream_url: str, tmp: Path) -> GatewayConfig:
    """gw-1 under `upstream_url`, serving on its own broker, its marks in `tmp`."""
    return GatewayConfig(
        "gw-1",
        upstream_url,
        listen_port=0,
        login=kit.logins["gw-1"],
        state_dir=tmp / "gw-1",
        backoff_min=0.05,
        backoff_max=0.3,
    )


def test_a_replayed_old_model_and_schedule_on_an_open_broker_are_refused_as_stale(
    tmp_path: Path, stack: ExitStack
) -> None:
    # An upstream broker with no access policy (misconfigured, or the attacker is on it):
    # only the signatures and the (run, version) order stand.
    kit = build_fleet(LAYOUT, "plant-7")
    f = kit.fleet.fleet
    open_top = stack.enter_context(EmbeddedBroker(port=0))
    config = gateway_config(kit, open_top.url, tmp_path)
    gateway = Gateway(config, kit.fleet, kit.keys["gw-1"])
    stack.callback(gateway.stop)
    gateway.start()
    sent: dict[int, bytes] = {}
    publisher = stack.enter_context(MqttTransport(open_top.url, "replayer").connect(WAIT))

    def publish_model(version: int, run: int = 5) -> bytes:
        body = GlobalModel(SPEC, np.full(SPEC.size, version, np.float32)).to_body()
        env = Envelope(Kind.MODEL, f, version + 1, version, COORDINATOR, body, run=run)
        data = seal(env, kit.coordinator_key)
        publisher.publish(topics.global_model(f), data, retain=True, wait=True)
        return data

    for version in (0, 1, 2):
        sent[version] = publish_model(version)
    wait_until(lambda: gateway.high_water.model == Stamp(5, 2))
    publisher.publish(topics.global_model(f), sent[0], retain=True, wait=True)
    wait_until(lambda: gateway.intake_refused.get("model_stale") == 1)

    # the gateway restarts: its marks are on disk, the replay is still retained upstream
    gateway.stop()
    restarted = Gateway(config, kit.fleet, kit.keys["gw-1"])
    stack.callback(restarted.stop)
    restarted.start()
    wait_until(lambda: restarted.intake_refused.get("model_stale") == 1)
    # a new run on a fresh coordinator state is followed at once
    publish_model(0, run=6)
    wait_until(lambda: restarted.high_water.model == Stamp(6, 0))
    retained = Inbox()
    observer = MqttTransport(restarted.downstream_url, "dash", login=kit.login(OBSERVER))
    stack.enter_context(observer.connect(WAIT)).subscribe(topics.global_model(f), retained)
    relayed = cbor2.loads(retained.wait_for(timeout=WAIT).payload)
    assert (relayed["run"], relayed["model"]) == (6, 0)


def test_hostile_messages_retained_on_an_open_upstream_broker_cost_the_gateway_nothing(
    tmp_path: Path, stack: ExitStack
) -> None:
    """A 200 KB schedule of decimal fractions, and a reference bomb retained on an unused
    kernel topic, on a broker anyone may write to: refused from their size or their first
    tags, counted, and a restarted gateway (the bomb is still retained) refuses them again."""
    kit = build_fleet(LAYOUT, "plant-7")
    f = kit.fleet.fleet
    open_top = stack.enter_context(EmbeddedBroker(port=0))
    stranger = stack.enter_context(MqttTransport(open_top.url, "stranger").connect(WAIT))
    decimals = b"\xc4\x82\x00\xc2\x59\xff\xff" + b"\xff" * 0xFFFF  # 4([0, 2(65535 bytes)])
    schedule = cbor2.dumps([1] * 10)[:1] + decimals * 3  # about 200 KB
    digest = "ab" * 32
    bomb_env = b"\xa9" + canonical("v") + b"\x02" + canonical("body") + shared_reference_bomb()
    stranger.publish(topics.round_schedule(f), schedule, retain=True, wait=True)
    stranger.publish(topics.kernel(f, digest), bomb_env, retain=True, wait=True)
    config = gateway_config(kit, open_top.url, tmp_path)

    for attempt in range(2):
        gateway = Gateway(config, kit.fleet, kit.keys["gw-1"])
        stack.callback(gateway.stop)
        started = time.perf_counter()
        gateway.start()
        wait_until(lambda g=gateway: sum(g.intake_refused.values()) == 2)  # type: ignore[misc]
        assert gateway.intake_refused == {"schedule_oversize": 1, "kernel_malformed": 1}
        assert time.perf_counter() - started < 5.0, attempt
        gateway.stop()
