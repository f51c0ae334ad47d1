"""Issue 9's attacks, end to end: a real coordinator, a real gateway with its own broker,
real devices, and an attacker holding one device (its key and its login) or none.

Every test shows the attack refused, counted where tern counts it, the component alive,
and the next round unharmed. Each runs on the embedded brokers (the fleet's policy and
limits) and, where it applies, on Mosquitto configured by `tern mosquitto-config`.
The demo's model (MLP 40-100-100-10) and the coordinator's default bounds throughout.
"""

from __future__ import annotations

import contextlib
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.errors import ConnectRefused, SubscribeError
from broker.fleet_access import broker_policy, max_packet_bytes
from broker.limits import fleet_limits
from broker.mosquitto import MosquittoProcess, find_mosquitto
from broker.mosquitto_config import write_mosquitto_config
from broker.transport import Message, MqttTransport
from coordinator import Coordinator, CoordinatorConfig
from coordinator.store import RoundRecord
from device.agent import DeviceAgent, local_update
from device.trainer import NumpyTrainer
from gateway import Gateway, GatewayConfig
from kernels.reference import mlp_spec
from tern import topics
from tern.aggregate import Partial
from tern.codecs import CodecName, codec_for
from tern.envelope import Envelope, Kind, canonical, seal
from tern.fleet import COORDINATOR
from tern.freshness import Stamp
from tern.logins import OBSERVER
from tern.messages import GlobalModel, RoundSchedule, TrainConfig, Update, encode_update
from tests.fleet_fixtures import FleetKit, build_fleet
from tests.helpers import unavailable, wait_until
from tests.mqtt_fixtures import Inbox

LAYERS = (40, 100, 100, 10)  # the demo's model
SPEC = mlp_spec(LAYERS)
TRAIN = TrainConfig(epochs=1, batch_size=32, lr=0.5)  # the demo's training
HONEST = ("dev-01", "dev-02")
TAKEN = "dev-03"  # the device the attacker holds
WAIT = 15.0
LAYOUT = {"gw-1": (COORDINATOR, [*HONEST, TAKEN])}


def data(device: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(device.encode()))
    x = rng.standard_normal((40, LAYERS[0])).astype(np.float32)
    return x, np.argmax(x[:, : LAYERS[-1]], axis=1).astype(np.int64)


class Attacker:
    """Whoever holds `TAKEN`: its key, its login, its client id, on its gateway's broker."""

    def __init__(self, kit: FleetKit, url: str, stack: ExitStack) -> None:
        self.kit, self.f = kit, kit.fleet.fleet
        self.schedules: list[tuple[int, RoundSchedule]] = []
        self.models: dict[int, GlobalModel] = {}
        self._changed = threading.Condition()
        client_id = sorted(kit.fleet.client_ids(TAKEN))[0]
        self.transport = MqttTransport(
            url, client_id, login=kit.login(TAKEN), backoff_min=0.05, backoff_max=0.3
        )
        self.transport.subscribe(topics.round_schedule(self.f), self._on_schedule)
        self.transport.subscribe(topics.global_model(self.f), self._on_model)
        stack.callback(self.transport.close)
        self.transport.connect(WAIT)

    def _on_schedule(self, message: Message) -> None:
        raw = cbor2.loads(message.payload)
        with self._changed:
            self.schedules.append((raw["run"], RoundSchedule.from_body(raw["body"])))
            self._changed.notify_all()

    def _on_model(self, message: Message) -> None:
        raw = cbor2.loads(message.payload)
        with self._changed:
            self.models[raw["model"]] = GlobalModel.from_body(raw["body"])
            self._changed.notify_all()

    def schedule(self, round: int) -> tuple[int, RoundSchedule]:
        with self._changed:
            found: list[tuple[int, RoundSchedule]] = []

            def seen() -> bool:
                found[:] = [(r, s) for r, s in self.schedules if s.round == round]
                return bool(found) and found[0][1].model_version in self.models

            assert self._changed.wait_for(seen, WAIT), f"no schedule for round {round}"
            return found[0]

    def seal(self, round: int, body: object, kind: Kind = Kind.UPDATE, **fields: Any) -> bytes:
        run, s = self.schedule(round)
        env = Envelope(kind, self.f, round, s.model_version, TAKEN, body, run=run)
        return seal(replace(env, **fields), self.kit.keys[TAKEN])

    def with_raw_body(self, round: int, raw: bytes) -> bytes:
        """A sealed envelope of this round whose body is `raw` CBOR, as received: what no
        encoder writes (the signature no longer matches; the decoder must refuse first)."""
        m = cbor2.loads(self.seal(round, 0))
        entries = b"".join(
            canonical(k) + (raw if k == "body" else canonical(v)) for k, v in m.items()
        )
        return bytes([0xA0 + len(m)]) + entries

    def honest_body(self, round: int, *, scale: float = 1.0, weight: float | None = None) -> Any:
        """What the device would send, trained on its own data, then tampered with."""
        _, s = self.schedule(round)
        x, y = data(TAKEN)
        update, _ = local_update(NumpyTrainer(), self.models[s.model_version], x, y, s, TAKEN, None)
        if scale != 1.0:
            sums = update.check(SPEC).to_partial()
            tampered = Partial(sums.weighted_sum * np.float32(scale), sums.total_weight, 1)
            update, _ = encode_update(codec_for(s.codec), SPEC, tampered)
        body = update.to_body()
        if weight is not None:
            body["weight"] = weight
        return body

    def send(self, data: bytes, topic: topics.Topic | None = None) -> None:
        self.transport.publish(topic or topics.update(self.f, "gw-1", TAKEN), data, wait=True)


class Plant:
    """A fleet of one gateway and three devices, two honest, on amqtt or Mosquitto."""

    def __init__(self, kind: str, tmp: Path, stack: ExitStack) -> None:
        self.kind, self.tmp, self.stack = kind, tmp, stack
        self.kit = kit = build_fleet(LAYOUT, "plant-7")
        self.f = kit.fleet.fleet
        self.records: dict[int, RoundRecord] = {}
        if kind == "amqtt":
            self.top = EmbeddedBroker(
                port=0,
                access=AccessControl(broker_policy(kit.fleet, COORDINATOR)),
                limits=fleet_limits(kit.fleet, COORDINATOR),
            ).start()
            stack.callback(self.top.stop)
            self.top_url, downstream = self.top.url, None
        else:
            binary = find_mosquitto()
            if binary is None:
                unavailable("mosquitto is not installed (apt-get install mosquitto)")
            self.top_url = self._mosquitto(binary, COORDINATOR)
            downstream = self._mosquitto(binary, "gw-1")
        config = GatewayConfig(
            "gw-1",
            self.top_url,
            downstream_url=downstream,
            listen_port=0,
            margin=0.3,
            backoff_min=0.05,
            backoff_max=0.3,
            login=kit.logins["gw-1"],
            state_dir=tmp / "gw-1",
        )
        self.gateway = Gateway(config, kit.fleet, kit.keys["gw-1"])
        stack.callback(self.gateway.stop)
        self.gateway.start()
        self.devices = []
        for dev in HONEST:
            x, y = data(dev)
            agent = DeviceAgent(
                dev,
                kit.fleet,
                kit.keys[dev],
                self.gateway.downstream_url,
                x,
                y,
                trainer=NumpyTrainer(),
                backoff_min=0.05,
                backoff_max=0.3,
                login=kit.logins[dev],
                state_dir=tmp / dev,
            )
            stack.callback(agent.stop)
            self.devices.append(agent.start())
        self.attacker = Attacker(kit, self.gateway.downstream_url, stack)

    def _mosquitto(self, binary: str, broker: str) -> str:
        def configure(directory: Path, host: str, port: int) -> Path:
            return write_mosquitto_config(
                self.kit.fleet, directory, broker=broker, host=host, port=port
            ).conf

        process = MosquittoProcess(binary, self.tmp / broker, configure=configure)
        self.stack.callback(process.stop)
        return process.url

    def coordinator(self, rounds: int, round_timeout: float = 4.0, **extra: Any) -> Coordinator:
        """The demo's defaults (bounds included), short rounds."""
        config = CoordinatorConfig(
            broker_url=self.top_url,
            state_dir=self.tmp / "coordinator",
            layers=LAYERS,
            rounds=rounds,
            round_timeout=round_timeout,
            min_contributors=2,
            train=TRAIN,
            login=self.kit.logins[COORDINATOR],
            **extra,
        )
        c = Coordinator(config, self.kit.fleet, self.kit.coordinator_key)
        self.stack.callback(c.stop)
        return c.start()

    def observer(self, url: str, client_id: str = "dashboard") -> MqttTransport:
        t = MqttTransport(
            url, client_id, login=self.kit.login(OBSERVER), backoff_min=0.05, backoff_max=0.3
        )
        self.stack.callback(t.close)
        return t.connect(WAIT)


BROKERS = [
    pytest.param("amqtt", id="amqtt"),
    pytest.param("mosquitto", id="mosquitto"),
]


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


def shared_reference_bomb(levels: int = 60) -> bytes:
    """28/29 tags: each level refers twice to the one below; a naive expansion is 2**60."""
    bomb = b"\xd8\x1c\x82\x00\x00"
    for _ in range(levels):
        bomb = b"\xd8\x1c\x82\xd8\x1d\x00\xd8\x1d\x00" + bomb
    return bomb


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
