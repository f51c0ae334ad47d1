"""A smoke run of bench.hostile's part c: a gateway under secure aggregation."""

from __future__ import annotations

from typing import Any

import pytest

from bench.hostile_classes import flip_signature
from bench.hostile_secagg import STAGES, secagg_costs, secagg_flood, world
from bench.secagg_session import Session

# a word of each secure-aggregation class of the brief
BRIEF = ("oversize", "malformed CBOR", "bad signature", "another round", "out-of-order",
         "duplicate", "not addressed", "wrong ring length", "bad share ciphertext")  # fmt: skip


@pytest.fixture(scope="module")
def costs() -> dict[str, Any]:
    return secagg_costs(world(0), repeat=1, samples=1)


def test_every_secagg_class_is_refused_at_the_gateway_with_its_expected_reason(
    costs: dict[str, Any],
) -> None:
    classes = costs["classes"]

    wrong = {n: (c["reason"], c["expected"]) for n, c in classes.items()
             if c["reason"] != c["expected"]}  # fmt: skip

    assert len(classes) >= 20
    assert not wrong
    assert set(costs["accept_us"]) == set(STAGES)
    assert all(c["ratio"] > 0 and c["baseline"] in STAGES for c in classes.values())


def test_the_secagg_classes_of_the_brief_are_measured(costs: dict[str, Any]) -> None:
    names = " | ".join(costs["classes"])

    missing = [word for word in BRIEF if word not in names]

    assert not missing


def test_a_round_under_a_flood_of_hostile_stage_messages_closes_with_the_exact_sum() -> None:
    flood = secagg_flood(world(0), 200)

    assert flood["sent"] == 200 and flood["counted"] > 100
    assert not flood["honest_refused"] and not flood["failure"]
    assert flood["honest_in_sum"] and flood["exact_sum"]


def test_a_session_without_hostile_input_sums_every_device_exactly() -> None:
    session = Session(world(0)).finish()

    assert session.exact and len(session.round.server.survivors) == 4


def test_a_refused_stage_message_leaves_the_gateway_able_to_close_exactly() -> None:
    session = Session(world(0)).at_stage("masked")
    forged = flip_signature(session.up["dev-01"])

    refused = session.round.offer(forged, session.world.topic("dev-01"), retained=False)
    session.finish()

    assert refused.reason == "bad_signature"
    assert session.exact and len(session.round.server.survivors) == 4
