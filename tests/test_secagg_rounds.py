"""Secure aggregation and differential privacy through the round machines, on the
in-memory bus: whole fleets under a virtual clock, with devices that vanish at each stage
of the protocol, a gateway that is a member of its parent's cohort, and a coordinator
that stops at its privacy budget."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import numpy.typing as npt
import pytest

from demo.memory import MemoryFleet
from device.trainer import NumpyTrainer
from kernels.wasm import DEFAULT_FUEL, DEFAULT_MEMORY_LIMIT
from tern.codecs import CodecName
from tern.envelope import Kind, open_envelope
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.members import new_members
from tern.messages import TrainConfig, Update
from tern.privacy.terms import DpTerms, Noise
from tern.rounds.device import Trained
from tern.rounds.events import Link
from tern.secagg.ring import decode_sum
from tern.secagg.terms import SecAggTerms

SMALL = (8, 6, 3)
IntArray = npt.NDArray[np.int64]
FOUR = {"gw-1": (COORDINATOR, ["dev-1", "dev-2", "dev-3", "dev-4"])}
TWO_COHORTS = {
    "gw-1": (COORDINATOR, ["dev-1", "dev-2", "dev-3"]),
    "gw-2": (COORDINATOR, ["dev-4", "dev-5", "dev-6"]),
}


def secagg_terms(**kw: object) -> SecAggTerms:
    base = SecAggTerms((0.05,), threshold=0.6, keys_s=1.0, shares_s=1.0, unmask_s=1.0)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def fleet_of(
    layout: dict[str, tuple[str, list[str]]],
    *,
    rounds: int = 2,
    secagg: SecAggTerms | None = None,
    dp: DpTerms | None = None,
    dp_epsilon: float | None = None,
    codec: CodecName = CodecName.TERNARY,
) -> MemoryFleet:
    from tern.rounds.opening import RoundSettings

    rng = np.random.default_rng(7)
    devices = sorted(d for _, devs in layout.values() for d in devs)
    data = {d: (rng.normal(size=(16 + 4 * i, SMALL[0])).astype(np.float32),
                rng.integers(0, SMALL[-1], 16 + 4 * i)) for i, d in enumerate(devices)}  # fmt: skip
    settings = RoundSettings(
        codec=codec, round_timeout=10.0, min_contributors=1, rounds=rounds,
        train=TrainConfig(epochs=1, batch_size=8, lr=0.1), kernel_fuel=DEFAULT_FUEL,
        kernel_memory=DEFAULT_MEMORY_LIMIT, secagg=secagg, dp=dp, dp_epsilon=dp_epsilon,
    )  # fmt: skip
    return MemoryFleet(new_members("plant", layout), data, settings, layers=SMALL,
                       trainer=NumpyTrainer)  # fmt: skip


def record_contributions(fleet: MemoryFleet) -> dict[tuple[int, str], IntArray]:
    """Every device's integer contribution, by (round, device), as it trains."""
    seen: dict[tuple[int, str], IntArray] = {}
    train = fleet._train

    def spy(dev: object, job: object) -> Trained:
        done = train(dev, job)  # type: ignore[arg-type]
        if done.ints is not None:
            seen[(done.schedule.round, dev.machine.id)] = done.ints.copy()  # type: ignore[attr-defined]
        return done

    fleet._train = spy  # type: ignore[method-assign]
    return seen


def vanish(fleet: MemoryFleet, device: str) -> None:
    """The device is gone: nothing more from it or to it."""
    fleet.devices[device].loop.links[Link.DOWN].close()


def partial_of(fleet: MemoryFleet, gateway: str, round: int) -> Update:
    """What `gateway` sent its parent for `round`, opened."""
    data = fleet.gateway_metrics[gateway]  # noqa: F841 - metrics exist for the round
    sent = fleet.gateways[gateway]._sent_up
    assert sent is not None and sent[0][1] == round
    env = open_envelope(sent[2], {gateway: fleet.fleet.gateways[gateway].key},
                        fleet="plant", kinds=(Kind.PARTIAL, Kind.FAILURE))  # fmt: skip
    return Update.from_body(env.body)


def run_round_with(fleet: MemoryFleet, until: object, then: object) -> None:
    fleet.run_until(until)  # type: ignore[arg-type]
    then()  # type: ignore[operator]


def test_a_secure_round_folds_exactly_the_sum_of_its_devices_contributions() -> None:
    fleet = fleet_of(FOUR, rounds=1, secagg=secagg_terms())
    seen = record_contributions(fleet)

    records = fleet.connect().run_rounds(1)

    assert records[1].ok and records[1].contributors == 4
    total = np.sum([seen[(1, d)] for d in ("dev-1", "dev-2", "dev-3", "dev-4")], axis=0)
    sa = fleet.coordinator.settings.secagg
    assert sa is not None
    expected = decode_sum(fleet.spec, total, dataclasses.replace(sa, scales=(0.05,) * 4))
    partial = partial_of(fleet, "gw-1", 1).check(fleet.spec).to_partial()
    assert partial.weighted_sum.tobytes() == expected.weighted_sum.tobytes()
    assert (partial.total_weight, partial.count) == (expected.total_weight, 4)


@pytest.mark.parametrize("stage", ["keys", "shares", "masked", "reveal"])
def test_a_device_that_vanishes_at_any_stage_leaves_exactly_the_survivors_sum(
    stage: str,
) -> None:
    fleet = fleet_of(FOUR, rounds=1, secagg=secagg_terms())
    seen = record_contributions(fleet)
    fleet.connect()
    gone = "dev-3"
    dev = fleet.devices[gone].machine
    gw = fleet.gateways["gw-1"]

    def at_stage() -> bool:  # the moment it vanishes: before it sends its `stage` message
        current = getattr(gw.round, "stage", None)
        if stage == "reveal":
            return dev.member is not None and dev.member.masked
        if stage == "masked":
            return current == "masked" and dev.member is not None and not dev.member.masked
        return current == "shares"

    if stage != "keys":  # at "keys": gone before it hears of the round
        fleet.run_until(at_stage)
    if stage == "shares":
        fleet.buses["gw-1"].deliver(hold=lambda m: m.topic.endswith("/" + gone))
    vanish(fleet, gone)
    records = fleet.run_rounds(1)

    survivors = ["dev-1", "dev-2", "dev-4"] + (["dev-3"] if stage == "reveal" else [])
    assert records[1].ok and records[1].contributors == len(survivors)
    total = np.sum([seen[(1, d)] for d in survivors], axis=0)
    partial = partial_of(fleet, "gw-1", 1).check(fleet.spec).to_partial()
    terms = dataclasses.replace(secagg_terms(), scales=(0.05,) * 4)
    expected = decode_sum(fleet.spec, total, terms)
    assert partial.weighted_sum.tobytes() == expected.weighted_sum.tobytes()
    assert partial.count == len(survivors)


def test_too_few_survivors_fail_the_cohort_with_the_stage_and_reveal_nothing() -> None:
    fleet = fleet_of(FOUR, rounds=1, secagg=secagg_terms())  # needs 3 of 4
    fleet.connect()
    gw = fleet.gateways["gw-1"]
    fleet.run_until(lambda: getattr(gw.round, "stage", None) == "masked")
    for gone in ("dev-2", "dev-3"):
        member = fleet.devices[gone].machine.member
        assert member is not None and not member.masked
        vanish(fleet, gone)
    revealed = []
    records = fleet.run_rounds(1)

    assert not records[1].ok
    assert records[1].failed == {"secagg_masked": 4}
    metrics = fleet.gateway_metrics["gw-1"][1]
    assert metrics.contributors == 0 and metrics.failed == {"secagg_masked": 4}
    for d in ("dev-1", "dev-4"):  # asked for nothing: no survivor list was ever sent
        client = fleet.devices[d].machine.member
        assert client is not None and client.client.last is not None
        keys = fleet.fleet.gateways["gw-1"].devices
        last = open_envelope(client.client.last, {d: keys[d]}, fleet="plant", kinds=tuple(Kind))
        revealed.append(last.kind)
    assert Kind.SA_REVEAL not in revealed


def test_a_gateway_below_another_is_a_member_of_its_parent_s_cohort() -> None:
    nested = {
        "gw-top": (COORDINATOR, ["dev-1", "dev-2", "dev-3"]),
        "gw-low": ("gw-top", ["dev-4", "dev-5", "dev-6"]),
    }
    flat = {"gw-top": (COORDINATOR, [f"dev-{i}" for i in range(1, 7)])}
    a = fleet_of(nested, rounds=3, secagg=secagg_terms()).connect()
    b = fleet_of(flat, rounds=3, secagg=secagg_terms()).connect()

    ra, rb = a.run_rounds(3), b.run_rounds(3)

    assert [ra[r].contributors for r in (1, 2, 3)] == [6, 6, 6]
    assert [rb[r].contributors for r in (1, 2, 3)] == [6, 6, 6]
    # exact integer sums at every level: the hierarchy folds the flat fleet's sum exactly
    assert a.weights.tobytes() == b.weights.tobytes()
    low = a.gateways["gw-low"]
    assert low.member is not None and low.member.masked  # it masked its cohort's sum up
    assert a.gateway_metrics["gw-top"][3].contributors == 6


def test_a_masked_contribution_on_the_wire_does_not_decode_as_an_update() -> None:
    fleet = fleet_of(FOUR, rounds=1, secagg=secagg_terms())
    sniffed: list[bytes] = []
    fleet.buses["gw-1"].transport("sniffer").connect().subscribe(
        "tern/plant/update/gw-1/+", lambda m: sniffed.append(m.payload)
    )
    fleet.connect().run_rounds(1)

    keys = fleet.fleet.gateways["gw-1"].devices
    kinds: Counter[Kind] = Counter()
    for data in sniffed:
        env = open_envelope(data, keys, fleet="plant", kinds=tuple(Kind))
        kinds[env.kind] += 1
        with pytest.raises(TernError):
            Update.from_body(env.body)
    assert kinds[Kind.SA_MASKED] == 4 and Kind.UPDATE not in kinds
    # what crosses the wire does not depend on a device's data: every masked vector has
    # the same size, whatever its device's samples (16 to 28 here) or its update
    sizes = {
        kind: {len(d) for d in sniffed if open_envelope(d, keys, fleet="plant",
                                                        kinds=tuple(Kind)).kind is kind}
        for kind in (Kind.SA_KEYS, Kind.SA_MASKED)
    }  # fmt: skip
    assert all(len(n) == 1 for n in sizes.values()), sizes


def test_secure_aggregation_with_a_float_codec_is_refused_with_the_reason() -> None:
    fleet = fleet_of(FOUR, rounds=1, secagg=secagg_terms(), codec=CodecName.FLOAT32)

    records = fleet.connect().run_rounds(1)

    assert not records[1].ok
    assert records[1].failed == {"policy_unsupported": 4}


def test_a_stage_message_replayed_into_the_next_round_is_refused_as_stale() -> None:
    fleet = fleet_of(FOUR, rounds=2, secagg=secagg_terms())
    sniffed: list[tuple[str, bytes]] = []
    spy = fleet.buses["gw-1"].transport("sniffer").connect()
    spy.subscribe("tern/plant/update/gw-1/+", lambda m: sniffed.append((m.topic, m.payload)))
    fleet.connect()
    fleet.run_until(lambda: 1 in fleet.records)
    gw = fleet.gateways["gw-1"]
    fleet.run_until(lambda: gw.round is not None and gw.round.round == 2)
    topic, old_keys = sniffed[0]  # dev-1's key advertisement of round 1

    spy.publish(topic, old_keys)
    records = fleet.run_rounds(2)

    assert records[2].ok and records[2].contributors == 4
    assert fleet.gateway_metrics["gw-1"][2].rejected.get("stale_round") == 1


def test_central_noise_spends_the_budget_and_then_the_coordinator_stops() -> None:
    dp = DpTerms(clip=1.0, multiplier=3.0, noise=Noise.CENTRAL, weight_cap=40.0)
    fleet = fleet_of(TWO_COHORTS, rounds=20, dp=dp, dp_epsilon=4.0)

    fleet.connect().run_until(lambda: fleet.finished)

    records = [fleet.records[r] for r in sorted(fleet.records)]
    eps = [r.epsilon for r in records]
    assert 1 < len(records) < 20  # stopped by the budget, not by the rounds
    assert all(e is not None for e in eps) and eps == sorted(eps)  # type: ignore[type-var]
    assert eps[-1] is not None and eps[-1] <= 4.0
    assert all(r.noise_multiplier == 3.0 for r in records)
    assert "privacy budget spent" in fleet.coordinator.stopped
    ledger = fleet.coordinator.ledger
    assert ledger is not None and ledger.would_exceed(3.0)
    assert b'"epsilon"' in records[-1].metrics("coordinator").to_json()


def test_distributed_noise_counts_only_the_survivors_shares() -> None:
    dp = DpTerms(clip=1.0, multiplier=2.0, noise=Noise.DISTRIBUTED, weight_cap=40.0)
    fleet = fleet_of(FOUR, rounds=1, secagg=secagg_terms(), dp=dp, dp_epsilon=50.0)
    fleet.connect()
    gw = fleet.gateways["gw-1"]
    fleet.run_until(lambda: getattr(gw.round, "stage", None) == "masked")
    vanish(fleet, "dev-4")  # its noise share never reaches the sum

    records = fleet.run_rounds(1)

    assert records[1].ok and records[1].contributors == 3
    assert records[1].noise_multiplier == pytest.approx(2.0 * (3 / 4) ** 0.5)


@pytest.mark.parametrize("stage", ["shares", "masked", "reveal"])
def test_a_gateway_broker_restart_mid_protocol_loses_no_member(stage: str) -> None:
    fleet = fleet_of(FOUR, rounds=1, secagg=secagg_terms())
    seen = record_contributions(fleet)
    fleet.connect()
    gw = fleet.gateways["gw-1"]
    fleet.run_until(lambda: getattr(gw.round, "stage", None) == stage)
    fleet.settle(hold=lambda m: True)  # what is in flight now is lost with the broker
    assert fleet.buses["gw-1"].pending > 0

    fleet.buses["gw-1"].restart()
    fleet.buses["gw-1"].up()
    records = fleet.run_rounds(1)

    assert records[1].ok and records[1].contributors == 4
    total = np.sum([seen[(1, d)] for d in ("dev-1", "dev-2", "dev-3", "dev-4")], axis=0)
    terms = dataclasses.replace(secagg_terms(), scales=(0.05,) * 4)
    expected = decode_sum(fleet.spec, total, terms)
    partial = partial_of(fleet, "gw-1", 1).check(fleet.spec).to_partial()
    assert partial.weighted_sum.tobytes() == expected.weighted_sum.tobytes()


def test_a_forged_inbox_message_is_refused_counted_and_the_round_goes_on() -> None:
    fleet = fleet_of(FOUR, rounds=1, secagg=secagg_terms())
    fleet.connect()
    gw = fleet.gateways["gw-1"]
    fleet.run_until(lambda: getattr(gw.round, "stage", None) == "shares")
    stranger = fleet.buses["gw-1"].transport("stranger").connect()
    forged = fleet.gateways["gw-1"].inboxes["dev-2"]  # gw-1's roster for dev-2, readdressed

    stranger.publish("tern/plant/inbox/dev-1/gw-1", forged)
    stranger.publish("tern/plant/inbox/dev-1/gw-1", b"\xa1\x00" * 40)
    records = fleet.run_rounds(1)

    assert records[1].ok and records[1].contributors == 4
    rejected = fleet.devices["dev-1"].machine.rejected
    assert rejected.get("secagg_not_addressed") == 1
    assert sum(v for k, v in rejected.items() if k.startswith("secagg_")) == 2
