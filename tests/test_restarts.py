"""Nothing is lost when a broker restarts mid-round: real brokers, real components.

Measured before the round engine v2: a top broker down for 4 s mid-round lost about half
of the partials sent meanwhile, and a gateway's broker half of its devices' updates. The
senders' queued messages reached the restarted broker before the receiver had
subscribed again. Now a receiver republishes the round's schedule once it is back, and
a sender answers a schedule it has already contributed to by sending the same bytes.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from coordinator import Coordinator, CoordinatorConfig
from device.trainer import NumpyTrainer
from tern.codecs import CodecName
from tern.fleet import COORDINATOR
from tests.fleet_fixtures import FleetRig, build_fleet
from tests.helpers import wait_until
from tests.mqtt_fixtures import AmqttBroker, MosquittoBroker

LAYERS = (8, 6, 3)
TIMEOUT = 30.0  # the round's deadline: a round closed well before it lost nothing
TWO = {"gw-1": (COORDINATOR, ["dev-1", "dev-2"]), "gw-2": (COORDINATOR, ["dev-3", "dev-4"])}


def coordinator(url: str, state: Path, kit_fleet: object, key: object) -> Coordinator:
    config = CoordinatorConfig(
        broker_url=url, state_dir=state, layers=LAYERS, codec=CodecName.TERNARY,
        round_timeout=TIMEOUT, min_contributors=1, rounds=2,
    )  # fmt: skip
    return Coordinator(config, kit_fleet, key)  # type: ignore[arg-type]


def test_partials_sent_while_the_top_broker_is_down_reach_the_coordinator(
    mosquitto_broker: MosquittoBroker, tmp_path: Path
) -> None:
    kit = build_fleet(TWO)
    with ExitStack() as stack:
        rig = FleetRig(kit, mosquitto_broker.url, stack)
        gateways = [rig.gateway(g) for g in ("gw-1", "gw-2")]
        for d in ("dev-1", "dev-2", "dev-3", "dev-4"):
            rig.device(d, trainer=NumpyTrainer(), slowdown=1.5)
        c = coordinator(mosquitto_broker.url, tmp_path, kit.fleet, kit.coordinator_key)
        stack.callback(c.stop)
        c.start()
        wait_until(lambda: all(g.open_round == 1 for g in gateways))

        mosquitto_broker.stop()  # while the devices train: every partial goes up meanwhile
        wait_until(lambda: all(1 in g.partials for g in gateways), timeout=TIMEOUT / 2)
        mosquitto_broker.start()
        first = c.wait_for_round(1, TIMEOUT + 5)
        second = c.wait_for_round(2, TIMEOUT + 5)

    assert (first.contributors, second.contributors) == (4, 4)
    assert first.round_seconds < TIMEOUT / 2  # closed by its partials, not its deadline


def test_updates_sent_while_a_gateway_broker_is_down_reach_the_gateway(
    amqtt_broker: AmqttBroker, mosquitto_broker: MosquittoBroker, tmp_path: Path
) -> None:
    kit = build_fleet({"gw-1": (COORDINATOR, ["dev-1", "dev-2", "dev-3"])})
    with ExitStack() as stack:
        rig = FleetRig(kit, amqtt_broker.url, stack)
        gateway = rig.gateway("gw-1", downstream_url=mosquitto_broker.url)
        devices = [rig.device(d, trainer=NumpyTrainer(), slowdown=1.5)
                   for d in ("dev-1", "dev-2", "dev-3")]  # fmt: skip
        c = coordinator(amqtt_broker.url, tmp_path, kit.fleet, kit.coordinator_key)
        stack.callback(c.stop)
        c.start()
        wait_until(lambda: gateway.open_round == 1)
        wait_until(lambda: all(d.machine._training for d in devices))

        mosquitto_broker.stop()  # the devices finish training while their broker is down
        wait_until(lambda: all(1 in d.outcomes for d in devices), timeout=TIMEOUT / 2)
        mosquitto_broker.start()
        metrics = gateway.wait_for_round(1, TIMEOUT + 5)
        record = c.wait_for_round(1, TIMEOUT + 5)

    assert (metrics.contributors, record.contributors) == (3, 3)
    assert metrics.round_seconds < TIMEOUT / 2


def test_a_fleet_started_after_a_top_broker_restart_gets_model_schedule_and_kernel(
    mosquitto_broker: MosquittoBroker, tmp_path: Path
) -> None:
    kit = build_fleet({"gw-1": (COORDINATOR, ["dev-1"])})
    with ExitStack() as stack:
        c = coordinator(mosquitto_broker.url, tmp_path, kit.fleet, kit.coordinator_key)
        stack.callback(c.stop)
        c.start()  # round 1 opens: kernel, model and schedule are retained on the broker
        wait_until(lambda: c.next_round == 1 and c.machine.round is not None)
        mosquitto_broker.restart()  # ... and lost
        rig = FleetRig(kit, mosquitto_broker.url, stack)
        rig.gateway("gw-1")
        device = rig.device("dev-1")  # trains in the Wasm kernel; none is cached
        outcome = device.wait_for_round(1, TIMEOUT)
        record = c.wait_for_round(1, TIMEOUT)

    assert (outcome.reason, outcome.kernel) == ("", c.kernel.sha256)
    assert record.contributors == 1 and record.round_seconds < TIMEOUT / 2


def test_a_coordinator_on_a_fresh_state_dir_is_followed_by_the_running_fleet(
    amqtt_broker: AmqttBroker, tmp_path: Path
) -> None:
    kit = build_fleet(TWO)
    with ExitStack() as stack:
        rig = FleetRig(kit, amqtt_broker.url, stack)
        for g in ("gw-1", "gw-2"):
            rig.gateway(g)
        for d in ("dev-1", "dev-2", "dev-3", "dev-4"):
            rig.device(d, trainer=NumpyTrainer())
        old = coordinator(amqtt_broker.url, tmp_path / "a", kit.fleet, kit.coordinator_key)
        with old:
            assert old.wait_for_round(2, TIMEOUT).contributors == 4
        new = coordinator(amqtt_broker.url, tmp_path / "b", kit.fleet, kit.coordinator_key)
        with new:
            first = new.wait_for_round(1, TIMEOUT)

    assert new.run > old.run
    assert first.contributors == 4 and first.round_seconds < TIMEOUT / 2
