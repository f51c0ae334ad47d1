"""The device agent: trainer interface, local update with error feedback, rounds over MQTT."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from broker.transport import Message, MqttTransport
from device import DeviceAgent, DeviceError, NumpyTrainer, local_update, trainer_for
from device.__main__ import main as device_main
from device.data import main as data_main
from kernels.reference import init_weights, mlp_spec, train_local
from kernels.wasm import WasmTrainer
from tern import topics
from tern.aggregate import Partial
from tern.codecs import CodecName, codec_for
from tern.envelope import Envelope, Kind, open_envelope, seal
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER
from tern.messages import GlobalModel, RoundSchedule, TrainConfig, Update, encode_update
from tern.reports import State, Status
from tests.fleet_fixtures import FleetKit, build_fleet, write_fleet
from tests.mqtt_fixtures import AmqttBroker, Inbox, MakeTransport, listen

SPEC = mlp_spec([5, 4, 3])
TRAIN = TrainConfig(epochs=2, batch_size=4, lr=0.2)
WAIT = 10.0
REPO = Path(__file__).resolve().parents[1]


def data(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5), dtype=np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) * 2


def model(version: int = 1) -> GlobalModel:
    return GlobalModel(SPEC, init_weights(SPEC, np.random.default_rng(version)))


def schedule(round: int, participants: Sequence[str] | None = None, **kw: object) -> RoundSchedule:
    fields: dict[str, object] = {
        "round": round,
        "model_version": 1,
        "codec": CodecName.TERNARY,
        "deadline": time.time() + 30.0,
        "min_contributors": 1,
        "participants": None if participants is None else tuple(participants),
        "seed": 11,
        "train": TRAIN,
    }
    fields.update(kw)
    return RoundSchedule(**fields)  # type: ignore[arg-type]


def test_numpy_trainer_is_the_reference_trainer() -> None:
    x, y = data()
    w = model().weights
    got = trainer_for("numpy").train(SPEC, w, x, y, TRAIN, np.random.default_rng(3))
    want = train_local(SPEC, w, x, y, TRAIN, np.random.default_rng(3))
    assert got.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="trainer"):
        trainer_for("wasm-someday")


def test_local_update_weights_the_delta_by_samples_and_keeps_the_residual() -> None:
    x, y = data()
    m, s = model(), schedule(1)
    update, residual = local_update(NumpyTrainer(), m, x, y, s, "dev-01", None)

    rng = np.random.default_rng([11, 1, zlib.crc32(b"dev-01")])  # run seed, round, device
    delta = train_local(SPEC, m.weights, x, y, TRAIN, rng) - m.weights
    partial = Partial((delta * np.float32(24)).astype(np.float32), 24.0, 1)
    want, want_residual = encode_update(codec_for(CodecName.TERNARY), SPEC, partial, None)
    assert update == want and residual.tobytes() == want_residual.tobytes()
    assert np.abs(residual).sum() > 0  # ternary loses something: it is carried over

    again, _ = local_update(NumpyTrainer(), m, x, y, s, "dev-01", residual)
    assert again != update  # error feedback changes what is sent next


def test_a_device_shuffles_its_data_differently_every_round_and_alike_on_a_rerun() -> None:
    x, y = data()
    m = model()
    first, _ = local_update(NumpyTrainer(), m, x, y, schedule(1), "dev-01", None)
    second, _ = local_update(NumpyTrainer(), m, x, y, schedule(2), "dev-01", None)
    rerun, _ = local_update(NumpyTrainer(), m, x, y, schedule(1), "dev-01", None)

    assert first != second  # the same model and data, another round: another order
    assert rerun == first


def test_device_refuses_data_without_matching_labels() -> None:
    kit = build_fleet({"gw-1": (COORDINATOR, ["dev-01"])})
    x, _ = data()
    with pytest.raises(DeviceError, match="data"):
        DeviceAgent("dev-01", kit.fleet, kit.keys["dev-01"], "mqtt://127.0.0.1:1", x, x[:10, 0])


class Coordinator:
    def __init__(self, kit: FleetKit, transport: MqttTransport) -> None:
        self.kit, self.transport = kit, transport

    def publish(
        self, kind: Kind, body: object, round: int, *, key: SigningKey | None = None
    ) -> None:
        f = self.kit.fleet.fleet
        env = Envelope(kind, f, round, 1, COORDINATOR, body)
        topic = topics.global_model(f) if kind is Kind.MODEL else topics.round_schedule(f)
        data = seal(env, key or self.kit.coordinator_key)
        self.transport.publish(topic, data, retain=True, wait=True)

    def open_round(self, s: RoundSchedule) -> None:
        self.publish(Kind.MODEL, model().to_body(), s.round)
        self.publish(Kind.SCHEDULE, s.to_body(), s.round)


@pytest.fixture
def kit() -> FleetKit:
    return build_fleet({"gw-1": (COORDINATOR, ["dev-01", "dev-02"])})


@pytest.fixture
def updates(amqtt_broker: AmqttBroker, make_transport: MakeTransport, kit: FleetKit) -> Inbox:
    topic = topics.updates_to(kit.fleet.fleet, "gw-1")
    return listen(make_transport, amqtt_broker.url, topic, "listener")


@pytest.fixture
def coordinator(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, kit: FleetKit
) -> Coordinator:
    return Coordinator(kit, make_transport(amqtt_broker.url, "coordinator"))


@pytest.fixture
def agent(amqtt_broker: AmqttBroker, kit: FleetKit) -> Iterator[DeviceAgent]:
    x, y = data()
    made = DeviceAgent(
        "dev-01",
        kit.fleet,
        kit.keys["dev-01"],
        amqtt_broker.url,
        x,
        y,
        backoff_min=0.05,
        backoff_max=0.3,
        rng=np.random.default_rng(0),
    )
    yield made
    made.stop()


def test_device_ignores_a_forged_schedule_and_sends_a_signed_update(
    agent: DeviceAgent, coordinator: Coordinator, updates: Inbox, kit: FleetKit
) -> None:
    agent.start()
    coordinator.publish(Kind.SCHEDULE, schedule(1).to_body(), 1, key=SigningKey(bytes(32)))
    coordinator.open_round(schedule(1))

    outcome = agent.wait_for_round(1, WAIT)
    message: Message = updates.wait_for(timeout=WAIT)

    assert outcome.error == "" and outcome.samples == 24
    assert agent.rejected == {"schedule_bad_signature": 1}
    assert topics.parse(message.topic) == topics.update(kit.fleet.fleet, "gw-1", "dev-01")
    keys = {"dev-01": kit.keys["dev-01"].verify_key}
    env = open_envelope(message.payload, keys, fleet=kit.fleet.fleet, kinds=(Kind.UPDATE,))
    x, y = data()
    want, _ = local_update(WasmTrainer(), model(), x, y, schedule(1), "dev-01", None)
    assert (env.round, Update.from_body(env.body)) == (1, want)  # the shipped kernel trained


def test_device_starting_mid_round_joins_the_open_round(
    agent: DeviceAgent, coordinator: Coordinator, updates: Inbox
) -> None:
    coordinator.open_round(schedule(1))  # retained before the device connects
    agent.start()

    assert agent.wait_for_round(1, WAIT).error == ""
    updates.wait_for(timeout=WAIT)
    assert len(updates.messages) == 1


def test_device_told_not_to_join_mid_round_takes_part_from_the_next_schedule(
    amqtt_broker: AmqttBroker, kit: FleetKit, coordinator: Coordinator, updates: Inbox
) -> None:
    x, y = data()
    late = DeviceAgent("dev-01", kit.fleet, kit.keys["dev-01"], amqtt_broker.url, x, y,
                       join_current_round=False)  # fmt: skip
    coordinator.open_round(schedule(1))  # retained before the device connects
    with late:
        coordinator.open_round(schedule(2))

        assert late.wait_for_round(2, WAIT).error == ""
        assert 1 not in late.outcomes
        updates.wait_for(timeout=WAIT)
        assert len(updates.messages) == 1


def test_device_not_named_by_the_schedule_sends_nothing(
    agent: DeviceAgent, coordinator: Coordinator, updates: Inbox
) -> None:
    agent.start()
    coordinator.open_round(schedule(1, participants=["dev-02"]))
    coordinator.open_round(schedule(2, participants=["dev-01", "dev-02"]))

    assert agent.wait_for_round(2, WAIT).error == ""
    assert sorted(agent.outcomes) == [2]
    updates.wait_for(timeout=WAIT)
    assert len(updates.messages) == 1


def test_device_skips_a_round_past_its_deadline(
    agent: DeviceAgent, coordinator: Coordinator, updates: Inbox
) -> None:
    agent.start()
    coordinator.open_round(schedule(1, deadline=time.time() - 1.0))

    assert "deadline" in agent.wait_for_round(1, WAIT).error
    assert updates.messages == []


def test_device_command_fails_cleanly_without_its_data(tmp_path: Path, kit: FleetKit) -> None:
    fleet_file = write_fleet(kit, tmp_path)
    argv = [
        "--id",
        "dev-01",
        "--fleet-file",
        str(fleet_file),
        "--key",
        str(tmp_path / "dev-01.key"),
        "--gateway-url",
        "mqtt://127.0.0.1:1",
        "--data",
        str(tmp_path / "missing.npz"),
    ]
    assert device_main(argv) == 1


def online(component: str) -> Callable[[Message], bool]:
    def test(m: Message) -> bool:
        status = Status.from_json(m.payload)
        return status.id == component and status.state is State.ONLINE

    return test


def test_data_gateway_and_device_commands_complete_a_round_together(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, tmp_path: Path
) -> None:
    kit = build_fleet({"gw-1": (COORDINATOR, ["dev-01", "dev-02"])})
    fleet_file = write_fleet(kit, tmp_path)
    data_args = ["mnist1d", "--devices", "2", "--seed", "5", "--samples", "400"]
    assert data_main([*data_args, "--out", str(tmp_path / "data")]) == 0
    partials = Inbox()
    coordinator = Coordinator(kit, make_transport(amqtt_broker.url, "coordinator"))
    coordinator.transport.subscribe(topics.partials_to(kit.fleet.fleet, COORDINATOR), partials)
    common = ["--fleet-file", str(fleet_file)]
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "--id",
            "gw-1",
            *common,
            "--key",
            str(tmp_path / "gw-1.key"),
            "--upstream",
            amqtt_broker.url,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state" / "gw-1"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    procs = [gateway]
    try:
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(gateway.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(WAIT)
        assert line, "the gateway did not report its downstream URL"
        url = line[0].decode().rsplit(" ", 1)[-1].strip()
        status = Inbox()
        watcher = make_transport(url, "watcher", login=kit.login(OBSERVER))
        watcher.subscribe(topics.status_all(kit.fleet.fleet), status)
        for dev in ("dev-01", "dev-02"):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "device",
                        "--id",
                        dev,
                        *common,
                        "--key",
                        str(tmp_path / f"{dev}.key"),
                        "--gateway-url",
                        url,
                        "--data",
                        str(tmp_path / "data" / f"{dev}.npz"),
                        "--state-dir",
                        str(tmp_path / "state" / dev),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=REPO,
                )
            )
        for dev in ("dev-01", "dev-02"):
            status.wait_for(online(dev), WAIT)

        spec = mlp_spec([40, 16, 10])
        weights = init_weights(spec, np.random.default_rng(0))
        coordinator.publish(Kind.MODEL, GlobalModel(spec, weights).to_body(), 1)
        coordinator.publish(Kind.SCHEDULE, schedule(1, deadline=time.time() + 8.0).to_body(), 1)
        data = partials.wait_for(timeout=WAIT).payload

        keys = {"gw-1": kit.keys["gw-1"].verify_key}
        env = open_envelope(data, keys, fleet=kit.fleet.fleet, kinds=(Kind.PARTIAL,))
        partial = Update.from_body(env.body).check(spec).to_partial()
        samples = sum(
            int(np.load(tmp_path / "data" / f"{d}.npz")["y"].size) for d in ("dev-01", "dev-02")
        )
        assert (partial.count, partial.total_weight) == (2, float(samples))
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(WAIT) for proc in procs] == [0, 0, 0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
