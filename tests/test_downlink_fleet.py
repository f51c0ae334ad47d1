"""The compressed downlink on the in-memory bus: every gateway and device holds exactly
the coordinator's model bytes after every round, having received one full model and
then only deltas, and gets a full model again when it cannot follow (a restart, a new
coordinator run)."""

from __future__ import annotations

from collections import Counter

from broker.loop import Machine
from demo.memory import MemoryFleet
from tern.codecs import CodecName
from tern.downlink import model_hash
from tern.fleet import COORDINATOR
from tern.freshness import Stamp
from tern.rounds.events import Received
from tern.rounds.follow import ModelFollower
from tests.test_memory_fleet import small_fleet

LAYOUT = {
    "gw-1": (COORDINATOR, ["dev-1", "dev-2"]),
    "gw-1a": ("gw-1", ["dev-3"]),
    "gw-2": (COORDINATOR, ["dev-4"]),
}


def _followers(fleet: MemoryFleet) -> dict[str, ModelFollower]:
    out = {g: m.follower for g, m in fleet.gateways.items()}
    out.update({d: dev.machine.follower for d, dev in fleet.devices.items()})
    return out


def _hold_the_coordinators_model(fleet: MemoryFleet) -> None:
    c = fleet.coordinator
    stamp = Stamp(c.run, c.model.version)
    want = model_hash(c.spec, c.model.weights)
    for who, f in _followers(fleet).items():
        held = f.held.get(stamp)
        assert held is not None, f"{who} does not hold v{stamp.version}"
        assert held[1] == want and model_hash(c.spec, held[0].weights) == want, who


def _everyone_holds(fleet: MemoryFleet, version: int) -> bool:
    stamp = Stamp(fleet.coordinator.run, version)
    return all(stamp in f.held for f in _followers(fleet).values())


def _count_model_bytes(fleet: MemoryFleet) -> Counter[str]:
    """Spy on what reaches every device's machine: model and delta bytes, by topic kind."""
    seen: Counter[str] = Counter()
    for dev in fleet.devices.values():
        handle = dev.loop.machine

        def spy(event: object, now: float, handle: Machine = handle) -> list[object]:
            if isinstance(event, Received) and event.topic.split("/")[2] in {"model", "delta"}:
                seen[event.topic.split("/")[2]] += len(event.payload)
            return handle(event, now)

        dev.loop.machine = spy
    return seen


def test_every_gateway_and_device_holds_the_coordinators_model_bytes_after_every_round() -> None:
    fleet = small_fleet(LAYOUT, rounds=4, downlink=CodecName.TERNARY).connect()
    for r in range(1, 5):
        fleet.run_until(lambda r=r: r in fleet.records)
        version = fleet.coordinator.model.version
        fleet.settle(until=lambda v=version: _everyone_holds(fleet, v))
        assert fleet.records[r].ok and fleet.coordinator.model.version == r
        _hold_the_coordinators_model(fleet)

    followers = _followers(fleet)
    assert all(f.full_models == 1 for f in followers.values())  # the first model only
    assert all(f.deltas == 4 for f in followers.values())
    assert not any(f.subscribed for f in followers.values())


def test_deltas_cut_what_reaches_the_devices_against_full_models() -> None:
    delta = small_fleet(LAYOUT, rounds=4, downlink=CodecName.TERNARY)
    by_delta = _count_model_bytes(delta)
    delta.connect().run_rounds(4)
    full = small_fleet(LAYOUT, rounds=4)  # the library's default: full models
    by_full = _count_model_bytes(full)
    full.connect().run_rounds(4)

    assert all(r.ok for r in full.records.values()) and all(r.ok for r in delta.records.values())
    assert all(f.deltas == 0 for f in _followers(full).values())
    assert by_full["delta"] == 0 and by_delta["delta"] > 0
    # one full model each, then deltas, against a full model every round (the bytes a
    # delta saves grow with the model: bench.round and the demo measure the demo's)
    assert 4 * by_delta["model"] <= by_full["model"]


def test_a_restarted_gateway_takes_the_full_model_and_its_devices_keep_following() -> None:
    fleet = small_fleet(LAYOUT, rounds=4, downlink=CodecName.TERNARY).connect()
    fleet.run_rounds(2)
    fleet.settle()

    fleet.restart_gateway("gw-1")
    fleet.run_rounds(4)
    fleet.settle()

    assert all(r.ok for r in fleet.records.values())
    _hold_the_coordinators_model(fleet)
    assert fleet.gateways["gw-1"].follower.full_models == 1  # the restarted machine's first
    assert fleet.devices["dev-1"].machine.follower.full_models == 1  # followed on


def test_a_coordinator_on_a_new_run_is_followed_through_one_full_model() -> None:
    fleet = small_fleet(LAYOUT, rounds=2, downlink=CodecName.TERNARY).connect()
    fleet.run_rounds(2)
    fleet.settle()

    fleet.new_coordinator(run=fleet.coordinator.run + 1000)
    fleet.run_rounds(2)
    fleet.settle()

    assert all(r.ok for r in fleet.records.values())
    _hold_the_coordinators_model(fleet)
    assert all(f.full_models == 2 for f in _followers(fleet).values())


def test_the_schedule_names_the_hash_of_the_model_it_trains_from() -> None:
    fleet = small_fleet(LAYOUT, rounds=1, downlink=CodecName.TERNARY).connect()
    fleet.run_until(lambda: fleet.coordinator.round is not None)
    c = fleet.coordinator
    assert c.round is not None

    assert c.round.schedule.model_hash == model_hash(c.spec, c.model.weights)
    assert c.round.schedule.codec is CodecName.TERNARY


def test_the_delta_is_restored_on_every_broker_after_a_restart() -> None:
    fleet = small_fleet(LAYOUT, rounds=2, downlink=CodecName.TERNARY).connect()
    fleet.run_rounds(2)
    fleet.settle()
    buses = [fleet.buses[COORDINATOR], fleet.buses["gw-1"], fleet.buses["gw-1a"]]
    before = [dict(b._retained) for b in buses]

    for bus in buses:
        bus.restart()
        bus.up()
    fleet.settle()

    assert [b._retained for b in buses] == before
    assert all(any(t.endswith("/delta") for t in b._retained) for b in buses)
