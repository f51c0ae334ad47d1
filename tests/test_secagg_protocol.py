"""Secure aggregation in one cohort: exact sums whatever drops, and every refusal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tern.envelope import Envelope, Kind
from tern.errors import TernError
from tern.secagg import SecAggFailed
from tern.secagg.bodies import MaskedBody, SurvivorsBody
from tern.secagg.ring import to_ring, unpack
from tern.secagg.wire import open_member_message, open_server_message, seal_message
from tests.secagg_helpers import (
    GATEWAY_KEY,
    SERVER,
    Round,
    cohort_of,
    member_ids,
    signing_key,
)


def to_stage(rnd: Round, stage: str) -> dict[str, bytes]:
    """Run a full cohort up to the server messages that open `stage` (roster, inbox,
    survivors), every member answering; returns those messages undelivered."""
    rnd.offer({m: c.advertise() for m, c in rnd.clients.items()})
    out = rnd.server.advance()
    stages = ("roster", "inbox", "survivors")
    for _ in stages[: stages.index(stage)]:
        rnd.offer(rnd.deliver(out, rnd.cohort.members))
        out = rnd.server.advance()
    return out


def server_message(rnd: Round, kind: Kind, body: object) -> Envelope:
    data = seal_message(rnd.cohort, kind, SERVER, body, GATEWAY_KEY)
    return open_server_message(data, rnd.cohort, body["to"])  # type: ignore[index]


def refusal(call: object) -> str:
    assert callable(call)
    with pytest.raises(TernError) as info:
        call()
    return info.value.reason


# -- exact sums ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10, 16, 30])
def test_the_cohort_sum_is_exactly_the_plain_sum(n: int) -> None:
    rnd = Round(cohort_of(n))

    rnd.run()

    assert rnd.server.survivors == rnd.cohort.members
    assert np.array_equal(rnd.server.result(), rnd.expected())


def test_a_sparse_cohort_of_100_sums_exactly() -> None:
    rnd = Round(cohort_of(100, degree=16, length=17))

    rnd.run({"inbox": member_ids(100)[:5], "survivors": member_ids(100)[50:55]})

    assert {len(rnd.cohort.neighbours(m)) for m in rnd.cohort.members} == {16}
    assert len(rnd.server.survivors) == 95
    assert np.array_equal(rnd.server.result(), rnd.expected())


@pytest.mark.parametrize("stage", ["keys", "roster", "inbox", "survivors"])
def test_members_dropping_at_any_stage_leave_the_exact_sum_of_survivors(stage: str) -> None:
    rnd = Round(cohort_of(10))
    gone = ("dev-002", "dev-007")

    rnd.run({stage: gone})

    survivors = set(rnd.server.survivors)
    assert survivors == set(rnd.cohort.members) - (set(gone) if stage != "survivors" else set())
    assert np.array_equal(rnd.server.result(), rnd.expected())


def test_dropouts_at_every_stage_together_leave_the_exact_sum() -> None:
    rnd = Round(cohort_of(20, bits=14))

    rnd.run({"keys": ["dev-000"], "roster": ["dev-005"], "inbox": ["dev-011", "dev-012"],
             "survivors": ["dev-019", "dev-003"]})  # fmt: skip

    assert len(rnd.server.survivors) == 16
    assert np.array_equal(rnd.server.result(), rnd.expected())


def test_sums_wrap_and_centre_in_the_ring() -> None:
    rnd = Round(cohort_of(5, bits=6, length=9))
    rnd.xs = {m: np.full(9, 6 if i % 2 else -6, dtype=np.int64) for i, m in enumerate(rnd.xs)}

    rnd.run()

    assert np.array_equal(rnd.server.result(), np.full(9, -6))


def test_a_round_is_deterministic_given_the_randomness() -> None:
    a, b = Round(cohort_of(6)), Round(cohort_of(6))

    a.run()
    b.run()

    assert a.sent == b.sent


def test_the_masked_vector_alone_is_not_the_plain_vector() -> None:
    rnd = Round(cohort_of(5, length=400, bits=12))

    rnd.run()

    cohort, x = rnd.cohort, rnd.xs["dev-001"]
    masked = open_member_message(rnd.sent["dev-001"][2], cohort, "dev-001")
    y = unpack(MaskedBody.from_body(masked.body, 400, 12).data, 400, 12)
    assert np.mean(y == to_ring(x, 12)) < 0.02
    assert 1500 < y.mean() < 2600  # spread over the ring, not near zero


# -- too few ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["keys", "roster", "inbox"])
def test_too_few_members_fail_the_round_before_any_reveal(stage: str) -> None:
    rnd = Round(cohort_of(10))  # t = 6

    with pytest.raises(SecAggFailed) as info:
        rnd.run({stage: member_ids(10)[:5]})

    assert info.value.reason == "too_few"
    assert rnd.server.stage == "failed" and rnd.server.survivors == ()
    assert all(c.stage != "revealed" for c in rnd.clients.values())


def test_too_few_reveals_fail_the_round() -> None:
    rnd = Round(cohort_of(10))

    with pytest.raises(SecAggFailed) as info:
        rnd.run({"survivors": member_ids(10)[:5]})

    assert info.value.reason == "too_few" and not rnd.server.done


def test_a_failed_server_takes_nothing_more() -> None:
    rnd = Round(cohort_of(4))
    late = rnd.clients["dev-003"].advertise()
    rnd.offer({m: rnd.clients[m].advertise() for m in member_ids(4)[:2]})
    with pytest.raises(SecAggFailed):
        rnd.server.advance()

    env = open_member_message(late, rnd.cohort, "dev-003")
    assert refusal(lambda: rnd.server.offer("dev-003", env, late)) == "out_of_order"
    assert rnd.server.advance() == {}


def test_a_client_never_reveals_for_a_list_shorter_than_its_threshold() -> None:
    rnd = Round(cohort_of(10))
    out = to_stage(rnd, "survivors")
    rnd.deliver(out, [m for m in rnd.cohort.members if m != "dev-000"])
    short = SurvivorsBody("dev-000", member_ids(10)[:5])

    env = server_message(rnd, Kind.SA_SURVIVORS, short.to_body())

    assert refusal(lambda: rnd.clients["dev-000"].take(env)) == "too_few"
    assert rnd.clients["dev-000"].stage == "masked"


def test_a_client_refuses_a_second_different_survivor_list() -> None:
    rnd = Round(cohort_of(10))
    out = to_stage(rnd, "survivors")
    client = rnd.clients["dev-000"]
    first = open_server_message(out["dev-000"], rnd.cohort, "dev-000")
    answer = client.take(first)
    # the second list says dev-009 dropped: the gateway would get both its shares
    other = SurvivorsBody("dev-000", member_ids(9))

    assert client.take(first) == answer  # the same list again: the same answer
    second = server_message(rnd, Kind.SA_SURVIVORS, other.to_body())
    assert refusal(lambda: client.take(second)) == "duplicate"


def test_a_reveal_never_holds_both_shares_of_one_member() -> None:
    rnd = Round(cohort_of(10))

    rnd.run({"inbox": ["dev-004"]})

    for m in rnd.server.survivors:
        reveal = open_member_message(rnd.sent[m][-1], rnd.cohort, m).body
        assert "dev-004" in reveal["s"] or m == "dev-004"
        assert not reveal["b"].keys() & reveal["s"].keys()


def test_a_survivor_list_naming_a_stranger_is_refused() -> None:
    rnd = Round(cohort_of(30, degree=6))
    out = to_stage(rnd, "survivors")
    me = "dev-000"
    stranger = next(m for m in rnd.cohort.members if m not in rnd.cohort.holders(me))
    swapped = rnd.cohort.neighbours(me)[0]
    alive = tuple(sorted({*rnd.cohort.holders(me), stranger} - {swapped}))

    env = server_message(rnd, Kind.SA_SURVIVORS, SurvivorsBody(me, alive).to_body())

    assert out and refusal(lambda: rnd.clients[me].take(env)) == "bad_survivors"


def test_the_longest_ids_fit_every_message_cap() -> None:
    members = tuple(sorted(f"{i}" + "d" * 63 for i in range(6)))
    keys = {m: signing_key(m).verify_key for m in members}
    cohort = dataclasses.replace(
        cohort_of(6), members=members, keys=keys, server="g" * 64, run=2**64 - 1
    )
    rnd = Round(cohort)

    rnd.run({"inbox": members[:1]})

    assert np.array_equal(rnd.server.result(), rnd.expected())
