"""A device agent and the kernels its schedules name: fetch, verify, cache, refuse, survive.

A stand-in coordinator (the fleet's real key, publishing on a real broker) lets each
test put exactly the kernel message it needs on the kernel topic: the coordinator's
own behaviour is covered in test_system.py.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import wasmtime
from nacl.signing import SigningKey

from broker.transport import MqttTransport
from device import DeviceAgent, RoundOutcome
from device.kernels import KernelShelf
from kernels.reference import init_weights, mlp_spec
from kernels.wasm import ABI_VERSION, DEFAULT_FUEL, DEFAULT_MEMORY_LIMIT, packaged_kernel
from tern import topics
from tern.codecs import CodecName
from tern.envelope import Envelope, Kind, open_envelope, seal
from tern.fleet import COORDINATOR
from tern.messages import (
    Failure,
    GlobalModel,
    KernelFile,
    KernelRef,
    RoundSchedule,
    TrainConfig,
    seal_kernel,
)
from tern.reports import Status
from tests.fleet_fixtures import FleetKit, build_fleet
from tests.mqtt_fixtures import AmqttBroker, Inbox, MakeTransport, listen

SPEC = mlp_spec([5, 4, 3])
TRAIN = TrainConfig(epochs=2, batch_size=4, lr=0.2)
WAIT = 15.0
SHIPPED = packaged_kernel()
# The shipped kernel plus a custom section: another valid kernel, under another hash.
VARIANT = SHIPPED + b"\x00\x09\x08tern-alt"


def _trapping_kernel() -> bytes:
    """Every ABI export, and a tern_train_epoch that traps (`unreachable`)."""
    return bytes(
        wasmtime.wat2wasm(
            f"""
            (module
              (memory (export "memory") 2)
              (func (export "tern_abi_version") (result i32) i32.const {ABI_VERSION})
              (func (export "tern_reset"))
              (func (export "tern_alloc") (param i32) (result i32) i32.const 1024)
              (func (export "tern_loss_and_grad")
                (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32) unreachable)
              (func (export "tern_train_epoch")
                (param i32 i32 i32 i32 i32 i32 i32 i32 f32) (result i32) unreachable)
              (func (export "tern_evaluate")
                (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32) unreachable))
            """
        )
    )


def sha(wasm: bytes) -> str:
    return hashlib.sha256(wasm).hexdigest()


def ref(wasm: bytes, **budget: int) -> KernelRef:
    return KernelRef(
        sha(wasm),
        budget.get("abi", ABI_VERSION),
        budget.get("fuel", DEFAULT_FUEL),
        budget.get("memory", DEFAULT_MEMORY_LIMIT),
    )


class StandIn:
    """Publishes model, schedule and kernel messages as the fleet's coordinator would."""

    def __init__(self, kit: FleetKit, transport: MqttTransport) -> None:
        self.kit, self.transport = kit, transport
        self.model = GlobalModel(SPEC, init_weights(SPEC, np.random.default_rng(1)))

    def kernel(self, digest: str, payload: bytes) -> None:
        f = self.kit.fleet.fleet
        self.transport.publish(topics.kernel(f, digest), payload, retain=True, wait=True)

    def signed(self, wasm: bytes, key: SigningKey | None = None) -> bytes:
        return seal_kernel(
            KernelFile(ABI_VERSION, wasm), self.kit.fleet.fleet, key or self.kit.coordinator_key
        )

    def open_round(self, round: int, kernel: KernelRef | None, seconds: float = 30.0) -> None:
        f = self.kit.fleet.fleet
        schedule = RoundSchedule(
            round, 1, CodecName.TERNARY, time.time() + seconds, 1, None, 11, TRAIN, kernel
        )
        for kind, body, topic in (
            (Kind.MODEL, self.model.to_body(), topics.global_model(f)),
            (Kind.SCHEDULE, schedule.to_body(), topics.round_schedule(f)),
        ):
            env = Envelope(kind, f, round, 1, COORDINATOR, body)
            data = seal(env, self.kit.coordinator_key)
            self.transport.publish(topic, data, retain=True, wait=True)


@pytest.fixture
def kit() -> FleetKit:
    return build_fleet({"gw-1": (COORDINATOR, ["dev-01"])})


@pytest.fixture
def coordinator(amqtt_broker: AmqttBroker, make_transport: MakeTransport, kit: FleetKit) -> StandIn:
    return StandIn(kit, make_transport(amqtt_broker.url, "coordinator"))


@pytest.fixture
def updates(amqtt_broker: AmqttBroker, make_transport: MakeTransport, kit: FleetKit) -> Inbox:
    topic = topics.updates_to(kit.fleet.fleet, "gw-1")
    return listen(make_transport, amqtt_broker.url, topic, "listener")


@pytest.fixture
def statuses(amqtt_broker: AmqttBroker, make_transport: MakeTransport, kit: FleetKit) -> Inbox:
    topic = topics.status(kit.fleet.fleet, "dev-01")
    return listen(make_transport, amqtt_broker.url, topic, "status-watcher")


@pytest.fixture
def agent(amqtt_broker: AmqttBroker, kit: FleetKit, tmp_path: Path) -> Iterator[DeviceAgent]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 5), dtype=np.float32)
    made = DeviceAgent(
        "dev-01",
        kit.fleet,
        kit.keys["dev-01"],
        amqtt_broker.url,
        x,
        (x[:, 0] > 0).astype(np.int64) * 2,
        kernel_cache=tmp_path / "kernels",
        backoff_min=0.05,
        backoff_max=0.3,
    )
    yield made.start()
    made.stop()


def _reported(updates: Inbox, kit: FleetKit, round: int) -> Envelope:
    """The device's message for `round` on its update topic, opened."""
    keys = {"dev-01": kit.keys["dev-01"].verify_key}

    def opened(payload: bytes) -> Envelope:
        kinds = (Kind.UPDATE, Kind.FAILURE)
        return open_envelope(payload, keys, fleet=kit.fleet.fleet, kinds=kinds)

    message = updates.wait_for(lambda m: opened(m.payload).round == round, WAIT)
    return opened(message.payload)


def _failed(agent: DeviceAgent, updates: Inbox, kit: FleetKit, round: int) -> RoundOutcome:
    outcome = agent.wait_for_round(round, WAIT)
    env = _reported(updates, kit, round)
    assert env.kind is Kind.FAILURE
    assert Failure.from_body(env.body).failed == {outcome.reason: 1}
    return outcome


# -- tests ------------------------------------------------------------------------------------


def test_device_fetches_the_named_kernel_verifies_caches_and_trains_with_it(
    agent: DeviceAgent, coordinator: StandIn, updates: Inbox, kit: FleetKit, tmp_path: Path
) -> None:
    coordinator.kernel(sha(VARIANT), coordinator.signed(VARIANT))

    coordinator.open_round(1, ref(VARIANT))

    outcome = agent.wait_for_round(1, WAIT)
    assert (outcome.error, outcome.kernel) == ("", sha(VARIANT))
    assert _reported(updates, kit, 1).kind is Kind.UPDATE
    cached = tmp_path / "kernels" / kit.fleet.fleet / f"{sha(VARIANT)}.kernel"
    assert cached.read_bytes() == coordinator.signed(VARIANT)


def test_a_schedule_without_a_kernel_trains_with_the_shipped_one(
    agent: DeviceAgent, coordinator: StandIn
) -> None:
    coordinator.open_round(1, None)

    outcome = agent.wait_for_round(1, WAIT)
    assert (outcome.error, outcome.kernel) == ("", "")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (lambda c: VARIANT, "kernel_unsigned"),
        (lambda c: c.signed(VARIANT, SigningKey(bytes(32))), "kernel_bad_signature"),
        (lambda c: c.signed(SHIPPED), "kernel_digest_mismatch"),
        (lambda c: b"\xa1\x61v\x01", "kernel_malformed"),
    ],
    ids=["unsigned", "mis-signed", "mismatching", "garbage"],
)
def test_device_refuses_a_bad_kernel_reports_why_and_takes_the_good_copy_next_round(
    agent: DeviceAgent,
    coordinator: StandIn,
    updates: Inbox,
    statuses: Inbox,
    kit: FleetKit,
    payload: object,
    reason: str,
    tmp_path: Path,
) -> None:
    coordinator.kernel(sha(VARIANT), payload(coordinator))  # type: ignore[operator]

    coordinator.open_round(1, ref(VARIANT))

    outcome = _failed(agent, updates, kit, 1)
    assert outcome.reason == reason and outcome.kernel == ""
    status = statuses.wait_for(lambda m: reason in Status.from_json(m.payload).detail, WAIT)
    assert Status.from_json(status.payload).detail.startswith(f"round 1: {reason}")
    assert not (tmp_path / "kernels" / kit.fleet.fleet / f"{sha(VARIANT)}.kernel").exists()

    coordinator.kernel(sha(VARIANT), coordinator.signed(VARIANT))
    coordinator.open_round(2, ref(VARIANT))

    assert agent.wait_for_round(2, WAIT).kernel == sha(VARIANT)
    assert _reported(updates, kit, 2).kind is Kind.UPDATE
    statuses.wait_for(lambda m: Status.from_json(m.payload).detail == "", WAIT)


def test_device_survives_trap_fuel_memory_and_abi_failures_round_after_round(
    agent: DeviceAgent, coordinator: StandIn, updates: Inbox, kit: FleetKit
) -> None:
    trapping = _trapping_kernel()
    coordinator.kernel(sha(trapping), coordinator.signed(trapping))
    coordinator.kernel(sha(VARIANT), coordinator.signed(VARIANT))
    rounds = [
        (ref(trapping), "kernel_trap"),
        (ref(VARIANT, fuel=1_000), "kernel_fuel"),
        (ref(VARIANT, memory=65_536), "kernel_memory"),
        (ref(VARIANT, abi=ABI_VERSION + 1), "kernel_abi"),
    ]

    for r, (kernel, reason) in enumerate(rounds, start=1):
        coordinator.open_round(r, kernel)
        assert _failed(agent, updates, kit, r).reason == reason

    coordinator.open_round(len(rounds) + 1, ref(VARIANT))
    assert agent.wait_for_round(len(rounds) + 1, WAIT).error == ""


def test_a_kernel_that_does_not_arrive_fails_the_round_in_time_to_tell_the_gateway(
    agent: DeviceAgent, coordinator: StandIn, updates: Inbox, kit: FleetKit
) -> None:
    coordinator.open_round(1, ref(VARIANT), seconds=1.5)  # never published

    outcome = _failed(agent, updates, kit, 1)  # the failure is sent before the deadline

    assert outcome.reason == "kernel_unavailable"


def test_a_tampered_cache_file_is_dropped_not_run(kit: FleetKit, tmp_path: Path) -> None:
    data = seal_kernel(KernelFile(ABI_VERSION, VARIANT), kit.fleet.fleet, kit.coordinator_key)
    KernelShelf(kit.fleet, tmp_path).offer(sha(VARIANT), data)
    path = tmp_path / kit.fleet.fleet / f"{sha(VARIANT)}.kernel"
    assert KernelShelf(kit.fleet, tmp_path).cached(sha(VARIANT)) is not None  # a restart

    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))

    assert KernelShelf(kit.fleet, tmp_path).cached(sha(VARIANT)) is None
    assert not path.exists()
