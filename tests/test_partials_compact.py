"""Compact partials on the in-memory bus: gateways send their cohort's fold in the
schedule's `partials` codec (here ternary) with their own error feedback, and the
hierarchy's model is then the fold, in ascending sender id, of the gateways' DECODED
partials (docs/rounds.md "Compact partials"), not the flat fold of the devices."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import pytest

from broker.transport import Message
from demo.memory import MemoryFleet
from device.trainer import NumpyTrainer
from kernels.wasm import DEFAULT_FUEL, DEFAULT_MEMORY_LIMIT
from tern import topics
from tern.aggregate import fold_sorted
from tern.codecs import CodecName
from tern.envelope import Kind, open_envelope
from tern.fleet import COORDINATOR
from tern.members import new_members
from tern.messages import TrainConfig, Update
from tern.rounds.opening import RoundSettings, ServerModel
from tern.secagg.terms import SecAggTerms

SMALL = (8, 6, 3)
TWO = {"gw-1": (COORDINATOR, ["dev-1", "dev-2"]), "gw-2": (COORDINATOR, ["dev-3", "dev-4"])}
# three levels under gw-1, and a second top gateway
DEEP = {
    "gw-1": (COORDINATOR, ["dev-1"]),
    "gw-2": ("gw-1", ["dev-2"]),
    "gw-3": ("gw-2", ["dev-3", "dev-4"]),
    "gw-4": (COORDINATOR, ["dev-5", "dev-6"]),
}
FLAT = {"gw-1": (COORDINATOR, ["dev-1", "dev-2", "dev-3", "dev-4", "dev-5", "dev-6"])}


def fleet_of(
    layout: dict[str, tuple[str, list[str]]],
    *,
    partials: CodecName = CodecName.TERNARY,
    rounds: int = 3,
    density: float | None = None,
    secagg: SecAggTerms | None = None,
) -> MemoryFleet:
    rng = np.random.default_rng(7)
    devices = sorted(d for _, devs in layout.values() for d in devs)
    data = {d: (rng.normal(size=(16 + 4 * i, SMALL[0])).astype(np.float32),
                rng.integers(0, SMALL[-1], 16 + 4 * i)) for i, d in enumerate(devices)}  # fmt: skip
    settings = RoundSettings(
        codec=CodecName.TERNARY, round_timeout=10.0, min_contributors=1, rounds=rounds,
        train=TrainConfig(epochs=1, batch_size=8, lr=0.1), kernel_fuel=DEFAULT_FUEL,
        kernel_memory=DEFAULT_MEMORY_LIMIT, partials=partials, density=density, secagg=secagg,
    )  # fmt: skip
    return MemoryFleet(new_members("plant", layout), data, settings, layers=SMALL,
                       trainer=NumpyTrainer)  # fmt: skip


def sniff_partials(fleet: MemoryFleet) -> list[bytes]:
    """Every partial (or failure) the coordinator's broker delivers, as sent."""
    seen: list[bytes] = []
    spy = fleet.buses[COORDINATOR].transport("spy").connect()
    where = topics.partials_to(fleet.fleet.fleet, COORDINATOR)
    spy.subscribe(where, lambda m: seen.append(m.payload))
    return seen


def opened(fleet: MemoryFleet, sniffed: list[bytes]) -> dict[int, dict[str, Update]]:
    """The sniffed partials by round and sender, opened with the gateways' keys."""
    keys = {g: e.key for g, e in fleet.fleet.gateways.items()}
    out: dict[int, dict[str, Update]] = defaultdict(dict)
    for data in sniffed:
        env = open_envelope(data, keys, fleet=fleet.fleet.fleet, kinds=(Kind.PARTIAL,))
        out[env.round][env.sender] = Update.from_body(env.body)
    return out


def run_round_by_round(fleet: MemoryFleet, rounds: int) -> dict[int, ServerModel]:
    """The coordinator's model before round 1 (key 0) and after each round."""
    models = {0: fleet.coordinator.model}
    for r in range(1, rounds + 1):
        fleet.run_rounds(r)
        assert fleet.records[r].ok
        models[r] = fleet.coordinator.model
    return models


def is_partial(m: Message) -> bool:
    return "/partial/" in m.topic


def assert_model_is_the_fold_of_decoded_partials(
    fleet: MemoryFleet, models: dict[int, ServerModel], sent: dict[int, dict[str, Update]]
) -> None:
    spec = fleet.spec
    for r in range(1, len(models)):
        assert sent[r], f"no partial sniffed in round {r}"
        decoded = [(g, u.check(spec).to_partial()) for g, u in sent[r].items()]
        fold = fold_sorted(decoded, spec.size)
        before = models[r - 1]
        weights, _ = fleet.coordinator.strategy.apply(before.weights, before.state, fold)
        assert weights.tobytes() == models[r].weights.tobytes(), f"round {r}"


def test_a_hierarchy_with_ternary_partials_steps_by_the_fold_of_its_gateways_decoded_partials() -> (
    None
):
    fleet = fleet_of(DEEP)
    sniffed = sniff_partials(fleet)
    fleet.connect()

    models = run_round_by_round(fleet, 3)

    sent = opened(fleet, sniffed)
    assert all(sorted(sent[r]) == ["gw-1", "gw-4"] for r in (1, 2, 3))
    assert all(u.codec is CodecName.TERNARY for r in (1, 2, 3) for u in sent[r].values())
    assert [fleet.records[r].contributors for r in (1, 2, 3)] == [6, 6, 6]
    assert_model_is_the_fold_of_decoded_partials(fleet, models, sent)


def test_a_gateway_below_another_sends_ternary_partials_too() -> None:
    fleet = fleet_of(DEEP, rounds=1).connect()

    fleet.run_rounds(1)

    for gw in ("gw-2", "gw-3"):
        sent = fleet.gateways[gw]._sent_up
        assert sent is not None
        env = open_envelope(sent[2], {gw: fleet.fleet.gateways[gw].key}, fleet="plant",
                            kinds=(Kind.PARTIAL,))  # fmt: skip
        assert Update.from_body(env.body).codec is CodecName.TERNARY


def test_ternary_partials_are_lossy_so_the_hierarchy_leaves_the_flat_fleet_s_model() -> None:
    """The old invariant no longer holds, by design: with float32 partials the same
    hierarchy trains the flat fleet's model up to float32 rounding."""
    exact = fleet_of(DEEP, partials=CodecName.FLOAT32)
    flat = fleet_of(FLAT, partials=CodecName.FLOAT32)
    lossy = fleet_of(DEEP)
    for f in (exact, flat, lossy):
        f.connect().run_rounds(3)

    assert np.allclose(exact.weights, flat.weights, rtol=0, atol=1e-5)
    assert not np.allclose(lossy.weights, flat.weights, rtol=0, atol=1e-5)


def test_a_ternary_partial_is_about_the_size_of_one_device_update() -> None:
    exact, compact = fleet_of(TWO, rounds=2, partials=CodecName.FLOAT32), fleet_of(TWO, rounds=2)
    for f in (exact, compact):
        f.connect().run_rounds(2)

    for r in (1, 2):
        # each gateway received two ternary updates and sent one partial
        one_update = {g: compact.gateway_metrics[g][r].bytes_up / 2 for g in TWO}
        assert compact.records[r].bytes_up <= 1.02 * sum(one_update.values())
        assert compact.records[r].bytes_up < exact.records[r].bytes_up


def test_partials_lost_in_a_top_broker_restart_are_sent_again_as_the_same_bytes() -> None:
    fleet = fleet_of(TWO, rounds=2)
    sniffed = sniff_partials(fleet)
    fleet.connect()
    fleet.settle(hold=is_partial)  # both gateways have closed round 1; nothing arrived
    first = {g: fleet.gateways[g]._sent_up for g in TWO}
    residuals = {g: fleet.gateways[g].uplink.residual for g in TWO}

    fleet.buses[COORDINATOR].restart()  # the partials in flight are lost
    fleet.buses[COORDINATOR].up()
    fleet.run_rounds(1)

    assert fleet.records[1].contributors == 4
    assert {s for s in first.values() if s is not None} and all(
        s is not None and s[2] in sniffed for s in first.values()
    )
    for g in TWO:  # the resend encoded nothing: the residual is round 1's
        after = fleet.gateways[g].uplink.residual
        assert after is not None and residuals[g] is not None
        assert after.tobytes() == residuals[g].tobytes()


def test_sparse_partials_keep_the_invariant() -> None:
    fleet = fleet_of(TWO, partials=CodecName.SPARSE, density=0.25, rounds=2)
    sniffed = sniff_partials(fleet)
    fleet.connect()

    models = run_round_by_round(fleet, 2)

    sent = opened(fleet, sniffed)
    assert all(u.codec is CodecName.SPARSE for r in (1, 2) for u in sent[r].values())
    spec = fleet.spec
    for r in (1, 2):
        decoded = [(g, u.check(spec, density=0.25).to_partial()) for g, u in sent[r].items()]
        fold = fold_sorted(decoded, spec.size)
        before = models[r - 1]
        weights, _ = fleet.coordinator.strategy.apply(before.weights, before.state, fold)
        assert weights.tobytes() == models[r].weights.tobytes()


SECAGG = SecAggTerms((0.05,), threshold=0.6, keys_s=1.0, shares_s=1.0, unmask_s=1.0)
TWO_COHORTS = {
    "gw-1": (COORDINATOR, ["dev-1", "dev-2", "dev-3"]),
    "gw-2": (COORDINATOR, ["dev-4", "dev-5", "dev-6"]),
}


@pytest.mark.parametrize(
    "layout",
    [TWO_COHORTS, {**TWO_COHORTS, "gw-3": ("gw-1", ["dev-7", "dev-8", "dev-9"])}],
    ids=["two-cohorts", "nested"],
)
def test_under_secure_aggregation_top_gateways_send_their_exact_sum_in_the_partials_codec(
    layout: dict[str, tuple[str, list[str]]],
) -> None:
    fleet = fleet_of(layout, rounds=2, secagg=dataclasses.replace(SECAGG))
    sniffed = sniff_partials(fleet)
    fleet.connect()

    models = run_round_by_round(fleet, 2)

    sent = opened(fleet, sniffed)
    devices = sum(len(devs) for _, devs in layout.values())
    assert [fleet.records[r].contributors for r in (1, 2)] == [devices, devices]
    assert all(sorted(sent[r]) == ["gw-1", "gw-2"] for r in (1, 2))  # gw-3 is a member
    assert all(u.codec is CodecName.TERNARY for r in (1, 2) for u in sent[r].values())
    assert_model_is_the_fold_of_decoded_partials(fleet, models, sent)
