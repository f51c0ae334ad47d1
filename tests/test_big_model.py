"""Big models in small messages (issue 13): a 1,000,000-parameter model runs a round over
brokers that take MQTT packets of at most 128 KiB, as AWS IoT Core does. Real components
(coordinator, one gateway with its own broker, two devices) over real brokers with the
fleet's rights (embedded, or Mosquitto with ``max_packet_size`` and ``message_size_limit``
131072 when it is installed); models, updates and partials travel in chunks
(broker.chunking)."""

from __future__ import annotations

import hashlib
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.fleet_access import broker_policy
from broker.limits import fleet_limits, sized_for_packets
from broker.mosquitto import MosquittoProcess, find_mosquitto
from broker.mosquitto_config import write_mosquitto_config
from coordinator import Coordinator, CoordinatorConfig
from device import DeviceAgent, NumpyTrainer
from gateway import Gateway, GatewayConfig
from kernels.reference import mlp_spec
from tern.codecs import CodecName
from tern.fleet import COORDINATOR, Fleet
from tern.messages import TrainConfig
from tests.fleet_fixtures import build_fleet, device_data

F = "plant-big"
LAYERS = (8, 1000, 990, 10)  # 1,009,900 parameters: a 4 MB float32 model
LIMIT = 128 * 1024  # bytes of an MQTT packet, header included
DEVICES = ("dev-01", "dev-02")
WAIT = 60.0


def _top_broker(kind: str, fleet: Fleet, tmp_path: Path, stack: ExitStack) -> tuple[str, Any]:
    """The coordinator's broker with the fleet's rights, taking packets of LIMIT bytes at
    most: the embedded broker (its refusals, to check) or Mosquitto (None)."""
    if kind == "amqtt":
        limits = sized_for_packets(fleet_limits(fleet, COORDINATOR), LIMIT)
        control = AccessControl(broker_policy(fleet, COORDINATOR))
        top = EmbeddedBroker("127.0.0.1", 0, access=control, limits=limits).start(10.0)
        stack.callback(top.stop)
        return top.url, top
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")

    def configure(workdir: Path, host: str, port: int) -> Path:
        conf = write_mosquitto_config(fleet, workdir / "config", host=host, port=port).conf
        text = re.sub(r"(?m)^max_packet_size \d+$", f"max_packet_size {LIMIT}", conf.read_text())
        conf.write_text(text + f"message_size_limit {LIMIT}\n")
        return conf

    process = MosquittoProcess(binary, tmp_path / "mosquitto", configure=configure)
    stack.callback(process.stop)
    assert (
        f"max_packet_size {LIMIT}\n" in (tmp_path / "mosquitto/config/mosquitto.conf").read_text()
    )
    return process.url, None


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
def test_a_million_parameter_model_runs_a_round_over_brokers_limited_to_128_kib(
    kind: str, tmp_path: Path
) -> None:
    spec = mlp_spec(LAYERS)
    assert spec.size > 1_000_000 and 4 * spec.size > 30 * LIMIT
    kit = build_fleet({"gw-1": (COORDINATOR, list(DEVICES))}, fleet_id=F)
    fleet = kit.fleet
    with ExitStack() as stack:
        url, top = _top_broker(kind, fleet, tmp_path, stack)
        gateway = Gateway(
            GatewayConfig(
                "gw-1", url, listen_port=0, margin=0.3, login=kit.logins["gw-1"],
                max_message_bytes=LIMIT, max_packet_bytes=LIMIT,
            ),
            fleet, kit.keys["gw-1"], rng=np.random.default_rng(1),
        )  # fmt: skip
        stack.callback(gateway.stop)
        gateway.start(10.0)
        devices = []
        for d in DEVICES:
            x, y = device_data(d)
            agent = DeviceAgent(
                d, fleet, kit.keys[d], gateway.downstream_url, x, y, trainer=NumpyTrainer(),
                login=kit.logins[d], rng=np.random.default_rng(2), max_message_bytes=LIMIT,
            )  # fmt: skip
            stack.callback(agent.stop)
            devices.append(agent.start(10.0))
        coordinator = Coordinator(
            CoordinatorConfig(
                broker_url=url, state_dir=tmp_path / "state", layers=LAYERS,
                codec=CodecName.TERNARY, rounds=2, round_timeout=WAIT, seed=7,
                train=TrainConfig(epochs=1, batch_size=8, lr=0.05),
                login=kit.logins[COORDINATOR], max_message_bytes=LIMIT,
            ),
            fleet, kit.coordinator_key,
        )  # fmt: skip
        stack.callback(coordinator.stop)
        coordinator.start()

        # two rounds: the float32 model (4 MB: 31 chunks) goes down twice, the ternary
        # updates (200 KB: 2 chunks) and the float32 partials (4 MB) go up twice
        for r in (1, 2):
            record = coordinator.wait_for_round(r, WAIT)
            outcomes = [agent.wait_for_round(r, WAIT) for agent in devices]
            closed = gateway.wait_for_round(r, WAIT)

            assert record.ok and record.contributors == 2 and record.accepted == ("gw-1",)
            assert record.base_version == r - 1
            assert all(o.error == "" and o.model_version == r - 1 for o in outcomes), outcomes
            assert closed.contributors == 2 and not closed.rejected

        # every device holds exactly the coordinator's model of the round it trained on
        want = hashlib.sha256(_model_bytes(tmp_path, 1, spec.size)).hexdigest()
        for agent in devices:
            model = agent.machine.model
            assert model is not None
            assert hashlib.sha256(model.weights.tobytes()).hexdigest() == want
        # the big messages went in chunks both ways, and nothing was refused
        up, down, chunks = gateway.upstream, gateway.downstream, coordinator._transport
        assert up is not None and down is not None
        assert chunks.chunked >= 2 and up.reassembled >= 2  # models v0 and v1 down
        assert up.chunked >= 2 and chunks.reassembled >= 2  # the partials of rounds 1, 2 up
        assert down.chunked >= 2 and all(a.transport.reassembled >= 2 for a in devices)
        assert all(a.transport.chunked == 2 for a in devices) and down.reassembled >= 4
        assert (top is None or not top.refused) and not gateway.access_refused
        assert not up.rejected() and not down.rejected() and not chunks.rejected()
        assert not any(a.transport.rejected() for a in devices)


def _model_bytes(tmp_path: Path, version: int, size: int) -> bytes:
    from coordinator.store import StateStore

    weights = StateStore(tmp_path / "state").load_model(version, size)[0]
    return np.asarray(weights, dtype=np.float32).tobytes()
