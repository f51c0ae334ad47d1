"""The stand-in coordinator and the model the gateway tests share (tests/test_gateway*.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from broker.transport import Message, MqttTransport
from kernels.reference import init_weights, mlp_spec
from tern import topics
from tern.aggregate import Partial
from tern.codecs import CodecName
from tern.envelope import Envelope, Kind, open_envelope, seal
from tern.fleet import COORDINATOR
from tern.messages import GlobalModel, RoundSchedule, TrainConfig, Update
from tern.secagg.terms import SecAggTerms
from tests.fleet_fixtures import FleetKit
from tests.mqtt_fixtures import Inbox

__all__ = ["ONE", "SEED", "SPEC", "TRAIN", "WAIT", "Coordinator", "model_weights"]

SPEC = mlp_spec([8, 6, 3])
TRAIN = TrainConfig(epochs=1, batch_size=8, lr=0.1)
SEED = 7
WAIT = 10.0


def model_weights(version: int) -> np.ndarray:
    return init_weights(SPEC, np.random.default_rng(version))


class Coordinator:
    """The test's stand-in coordinator: seals model and schedule, publishes them retained."""

    def __init__(self, kit: FleetKit, transport: MqttTransport) -> None:
        self.kit, self.transport = kit, transport
        self.partials = Inbox()
        self.metrics = Inbox()
        f = kit.fleet.fleet
        transport.subscribe(topics.partials_to(f, COORDINATOR), self.partials)
        transport.subscribe(topics.metrics(f, "gw-1"), self.metrics)

    def open_round(
        self,
        round: int,
        version: int,
        *,
        participants: Sequence[str] | None = None,
        seconds: float = 3.0,
        codec: CodecName = CodecName.TERNARY,
        secagg: SecAggTerms | None = None,
    ) -> RoundSchedule:
        f, key = self.kit.fleet.fleet, self.kit.coordinator_key
        model = GlobalModel(SPEC, model_weights(version))
        env = Envelope(Kind.MODEL, f, round, version, COORDINATOR, model.to_body())
        self.transport.publish(topics.global_model(f), seal(env, key), retain=True, wait=True)
        schedule = RoundSchedule(
            round=round,
            model_version=version,
            codec=codec,
            deadline=time.time() + seconds,
            min_contributors=1,
            participants=None if participants is None else tuple(sorted(participants)),
            seed=SEED,
            train=TRAIN,
            secagg=secagg,
        )
        env = Envelope(Kind.SCHEDULE, f, round, version, COORDINATOR, schedule.to_body())
        self.transport.publish(topics.round_schedule(f), seal(env, key), retain=True, wait=True)
        return schedule

    def partial_from(self, gateway: str, round: int) -> Partial:
        def sent(m: Message) -> bool:
            return topics.parse(m.topic).sender == gateway

        data = self.partials.wait_for(sent, WAIT).payload
        keys = {gateway: self.kit.fleet.gateways[gateway].key}
        env = open_envelope(data, keys, fleet=self.kit.fleet.fleet, kinds=(Kind.PARTIAL,))
        assert env.round == round
        return Update.from_body(env.body).check(SPEC).to_partial()


ONE = {"gw-1": (COORDINATOR, ["dev-01", "dev-02", "dev-03"])}
