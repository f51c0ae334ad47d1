"""The plant issue 9's attacks run against (tests/test_attacks*.py): a real coordinator, a
real gateway with its own broker, real devices, and an attacker holding one device (its key
and its login), on the embedded brokers or on Mosquitto. The demo's model throughout.
"""

from __future__ import annotations

import threading
import zlib
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.fleet_access import broker_policy
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
from tern.codecs import codec_for
from tern.envelope import Envelope, Kind, canonical, seal
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER
from tern.messages import GlobalModel, RoundSchedule, TrainConfig, encode_update
from tests.fleet_fixtures import FleetKit, build_fleet
from tests.helpers import unavailable

__all__ = [
    "BROKERS",
    "HONEST",
    "LAYERS",
    "LAYOUT",
    "SPEC",
    "TAKEN",
    "TRAIN",
    "WAIT",
    "Attacker",
    "Plant",
    "data",
    "shared_reference_bomb",
]

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


def shared_reference_bomb(levels: int = 60) -> bytes:
    """28/29 tags: each level refers twice to the one below; a naive expansion is 2**60."""
    bomb = b"\xd8\x1c\x82\x00\x00"
    for _ in range(levels):
        bomb = b"\xd8\x1c\x82\xd8\x1d\x00\xd8\x1d\x00" + bomb
    return bomb
