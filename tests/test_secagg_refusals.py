"""Secure aggregation refuses what it must, on both sides, and says why."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.secagg import Cohort, SecAggClient, SecAggFailed
from tern.secagg.bodies import (
    InboxBody,
    KeysBody,
    MaskedBody,
    RevealBody,
    RosterBody,
    SharesBody,
    SurvivorsBody,
)
from tern.secagg.shamir import PRIME, from_bytes, to_bytes
from tern.secagg.wire import (
    KeysTemplate,
    open_keys_advert,
    open_member_message,
    open_server_message,
    seal_message,
)
from tests.secagg_helpers import (
    FLEET,
    GATEWAY_KEY,
    SERVER,
    Round,
    cohort_of,
    member_ids,
    randomness,
    signing_key,
)
from tests.test_secagg_protocol import server_message, to_stage


def refusal(call: Callable[[], object]) -> str:
    with pytest.raises(TernError) as info:
        call()
    return info.value.reason


def flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def member_message(cohort: Cohort, member: str, kind: Kind, body: object) -> bytes:
    return seal_message(cohort, kind, member, body, signing_key(member))


def offered(rnd: Round, member: str, data: bytes) -> Callable[[], None]:
    return lambda: rnd.server.offer(member, open_member_message(data, rnd.cohort, member), data)


# -- the gateway ---------------------------------------------------------------------


@pytest.mark.parametrize("at", [30, 120, -3])  # the signature, a key, the sender
def test_gateway_refuses_a_tampered_member_message(at: int) -> None:
    rnd = Round(cohort_of(4))
    data = flipped(rnd.clients["dev-001"].advertise(), at)

    assert refusal(lambda: open_member_message(data, rnd.cohort, "dev-001")) in {
        "bad_signature", "wrong_sender"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("other", "reason"),
    [({"round": 11}, "stale_round"), ({"round": 13}, "future_round"), ({"run": 5}, "stale_run")],
)
def test_gateway_refuses_a_message_replayed_from_another_round_or_run(
    other: dict[str, int], reason: str
) -> None:
    rnd = Round(cohort_of(4))
    old = dataclasses.replace(rnd.cohort, **other)
    data = SecAggClient(old, "dev-001", signing_key("dev-001")).advertise()
    env = open_member_message(data, old, "dev-001")

    assert refusal(lambda: open_member_message(data, rnd.cohort, "dev-001")) == reason
    assert refusal(lambda: rnd.server.offer("dev-001", env, data)) == reason


def test_gateway_refuses_stage_messages_out_of_order() -> None:
    rnd = Round(cohort_of(4))
    masked = member_message(rnd.cohort, "dev-001", Kind.SA_MASKED, {"bits": 12, "data": b""})
    shares = member_message(rnd.cohort, "dev-001", Kind.SA_SHARES, {"to": {}})

    assert refusal(offered(rnd, "dev-001", masked)) == "out_of_order"
    assert refusal(offered(rnd, "dev-001", shares)) == "out_of_order"


def test_gateway_ignores_the_same_message_again_and_refuses_a_different_one() -> None:
    rnd = Round(cohort_of(4))
    data = rnd.clients["dev-001"].advertise()
    other = SecAggClient(rnd.cohort, "dev-001", signing_key("dev-001"), randomness=randomness("x"))
    offered(rnd, "dev-001", data)()

    offered(rnd, "dev-001", data)()

    assert rnd.server.traffic["dev-001"].received == len(data)
    assert refusal(offered(rnd, "dev-001", other.advertise())) == "duplicate"


def test_gateway_refuses_members_outside_the_cohort_and_keys_of_small_order() -> None:
    rnd = Round(cohort_of(4))
    small = member_message(rnd.cohort, "dev-001", Kind.SA_KEYS, {"c": bytes(32), "s": bytes(32)})

    assert refusal(lambda: open_member_message(small, rnd.cohort, "dev-009")) == "not_member"
    assert refusal(offered(rnd, "dev-001", small)) == "bad_key"


def test_gateway_refuses_shares_not_for_exactly_the_roster() -> None:
    rnd = Round(cohort_of(5))
    to_stage(rnd, "roster")
    shares = {m: bytes(72) for m in member_ids(5)[2:]}  # not dev-000
    data = member_message(rnd.cohort, "dev-001", Kind.SA_SHARES, {"to": shares})

    assert refusal(offered(rnd, "dev-001", data)) == "malformed"  # ciphertexts of 72 bytes
    shares = {m: bytes(74) for m in member_ids(5)[2:]}
    data = member_message(rnd.cohort, "dev-001", Kind.SA_SHARES, {"to": shares})
    assert refusal(offered(rnd, "dev-001", data)) == "wrong_recipients"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"bits": 13, "data": bytes(50)}, "wrong_ring"),
        ({"bits": 12, "data": bytes(49)}, "wrong_length"),
        ({"bits": 12.0, "data": bytes(50)}, "wrong_ring"),
        ({"bits": 12, "data": bytes(49) + b"\xf0"}, "malformed"),  # padding bits set
        ({"bits": 12}, "malformed"),
    ],
)
def test_gateway_refuses_a_masked_vector_of_the_wrong_ring_or_length(
    body: dict[str, object], reason: str
) -> None:
    rnd = Round(cohort_of(4))  # 33 elements of 12 bits: 50 bytes
    out = to_stage(rnd, "inbox")
    rnd.deliver({"dev-001": out["dev-001"]}, ["dev-001"])
    data = member_message(rnd.cohort, "dev-001", Kind.SA_MASKED, body)

    assert refusal(offered(rnd, "dev-001", data)) == reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [("stranger", "bad_reveal"), ("both", "both_shares"), ("big", "malformed")],
)
def test_gateway_refuses_a_reveal_beyond_what_it_asked(change: str, reason: str) -> None:
    rnd = Round(cohort_of(30, degree=6))
    rnd.offer(rnd.deliver(to_stage(rnd, "survivors"), []))
    me, share = "dev-000", to_bytes(1)
    b = {m: share for m in rnd.cohort.holders(me)}
    s: dict[str, bytes] = {}
    if change == "stranger":
        del b[rnd.cohort.neighbours(me)[0]]
        b[next(m for m in rnd.cohort.members if m not in b)] = share
    elif change == "both":
        s[me] = share
    else:
        b[me] = to_bytes(PRIME)
    data = member_message(rnd.cohort, me, Kind.SA_REVEAL, RevealBody(b, s).to_body())

    assert refusal(offered(rnd, me, data)) == reason


def test_a_wrong_share_of_a_dropped_members_key_fails_the_round() -> None:
    rnd = Round(cohort_of(10))
    rnd.offer({m: c.advertise() for m, c in rnd.clients.items()})
    alive = set(rnd.cohort.members)
    out = rnd.server.advance()
    rnd.offer(rnd.deliver(out, alive))
    alive.discard("dev-009")  # drops after sharing: its mask key must be rebuilt
    rnd.offer(rnd.deliver(rnd.server.advance(), alive))
    reveals = rnd.deliver(rnd.server.advance(), alive)
    body = open_member_message(reveals["dev-000"], rnd.cohort, "dev-000").body
    wrong = (from_bytes(body["s"]["dev-009"]) or 0) + 1
    body["s"]["dev-009"] = to_bytes(wrong % PRIME)
    reveals["dev-000"] = member_message(rnd.cohort, "dev-000", Kind.SA_REVEAL, body)
    rnd.offer(reveals)

    with pytest.raises(SecAggFailed) as info:
        rnd.server.advance()

    assert info.value.reason == "bad_reveal"


# -- a member --------------------------------------------------------------------------


def test_a_member_refuses_a_tampered_or_misaddressed_server_message() -> None:
    rnd = Round(cohort_of(4))
    out = to_stage(rnd, "roster")

    assert (
        refusal(lambda: open_server_message(flipped(out["dev-001"], 30), rnd.cohort, "dev-001"))
        == "bad_signature"
    )
    assert (
        refusal(lambda: open_server_message(out["dev-002"], rnd.cohort, "dev-001"))
        == "not_addressed"
    )
    env = open_server_message(out["dev-002"], rnd.cohort, "dev-002")
    assert refusal(lambda: rnd.clients["dev-001"].take(env)) == "not_addressed"


def test_a_member_refuses_a_server_message_of_another_round() -> None:
    rnd = Round(cohort_of(4))
    to_stage(rnd, "roster")
    old = dataclasses.replace(rnd.cohort, round=11)
    data = seal_message(
        old, Kind.SA_ROSTER, SERVER, RosterBody("dev-001", ()).to_body(), GATEWAY_KEY
    )
    env = open_server_message(data, old, "dev-001")

    assert refusal(lambda: open_server_message(data, rnd.cohort, "dev-001")) == "stale_round"
    assert refusal(lambda: rnd.clients["dev-001"].take(env)) == "stale_round"


def test_a_member_refuses_keys_the_gateway_forged() -> None:
    rnd = Round(cohort_of(4))
    out = to_stage(rnd, "roster")
    env = open_server_message(out["dev-000"], rnd.cohort, "dev-000")
    keys = list(env.body["keys"])
    fake = Envelope(Kind.SA_KEYS, FLEET, rnd.cohort.round, rnd.cohort.model_version, "dev-001",
                    {"c": bytes(range(32)), "s": bytes(range(32))}, run=rnd.cohort.run)  # fmt: skip
    keys[0] = seal(fake, GATEWAY_KEY)  # the gateway signs for dev-001

    forged = server_message(rnd, Kind.SA_ROSTER, RosterBody("dev-000", tuple(keys)).to_body())

    assert refusal(lambda: rnd.clients["dev-000"].take(forged)) == "bad_roster"


@pytest.mark.parametrize("roster", ["twice", "short"])
def test_a_member_refuses_a_roster_naming_a_member_twice_or_too_few(roster: str) -> None:
    rnd = Round(cohort_of(10))
    out = to_stage(rnd, "roster")
    keys = open_server_message(out["dev-000"], rnd.cohort, "dev-000").body["keys"]
    keys = [keys[0], keys[0]] if roster == "twice" else keys[:3]

    env = server_message(rnd, Kind.SA_ROSTER, RosterBody("dev-000", tuple(keys)).to_body())

    assert refusal(lambda: rnd.clients["dev-000"].take(env)) == (
        "bad_roster" if roster == "twice" else "too_few"
    )


def test_a_member_refuses_stage_messages_out_of_order() -> None:
    rnd = Round(cohort_of(4))
    client = rnd.clients["dev-000"]
    client.advertise()
    inbox = server_message(rnd, Kind.SA_INBOX, InboxBody("dev-000", {}).to_body())
    survivors = server_message(rnd, Kind.SA_SURVIVORS, {"to": "dev-000", "alive": []})

    assert refusal(lambda: client.take(inbox)) == "out_of_order"
    assert refusal(lambda: client.take(survivors)) == "out_of_order"
    assert refusal(lambda: client.mask(np.zeros(33, dtype=np.int64))) == "out_of_order"


def test_a_member_answers_the_same_message_alike_and_refuses_a_different_one() -> None:
    rnd = Round(cohort_of(4))
    out = to_stage(rnd, "roster")
    client = rnd.clients["dev-000"]
    env = open_server_message(out["dev-000"], rnd.cohort, "dev-000")
    answer = client.take(env)
    shorter = RosterBody("dev-000", tuple(env.body["keys"][:-1])).to_body()

    assert client.take(env) == answer == client.last
    assert refusal(lambda: client.take(server_message(rnd, Kind.SA_ROSTER, shorter))) == "duplicate"


def test_a_member_masks_one_vector_only() -> None:
    rnd = Round(cohort_of(4))
    out = to_stage(rnd, "inbox")
    client = rnd.clients["dev-000"]
    client.take(open_server_message(out["dev-000"], rnd.cohort, "dev-000"))
    x = rnd.xs["dev-000"]

    first = client.mask(x)

    assert client.mask(x.copy()) == first
    assert refusal(lambda: client.mask(x + 1)) == "duplicate"
    assert refusal(lambda: client.mask(np.zeros(32, dtype=np.int64))) == "wrong_length"


def test_a_share_that_does_not_decrypt_is_not_used_and_the_sum_stays_exact() -> None:
    rnd = Round(cohort_of(8))
    out = to_stage(rnd, "inbox")
    inbox = open_server_message(out["dev-000"], rnd.cohort, "dev-000").body
    inbox["from"]["dev-001"] = flipped(inbox["from"]["dev-001"], 40)
    out["dev-000"] = seal_message(rnd.cohort, Kind.SA_INBOX, SERVER, inbox, GATEWAY_KEY)
    rnd.offer(rnd.deliver(out, rnd.cohort.members))
    rnd.offer(rnd.deliver(rnd.server.advance(), rnd.cohort.members))

    rnd.server.advance()

    reveal = open_member_message(rnd.sent["dev-000"][-1], rnd.cohort, "dev-000").body
    assert rnd.clients["dev-000"].bad_shares == ("dev-001",)
    assert "dev-001" not in reveal["b"] and "dev-002" in reveal["b"]
    assert np.array_equal(rnd.server.result(), rnd.expected())


# -- signed key advertisements in a roster ---------------------------------------------


@pytest.mark.parametrize("member", ["d", "d" * 23, "d" * 24, "d" * 64])
def test_a_canonical_key_advertisement_opens_like_any_other(member: str) -> None:
    cohort = dataclasses.replace(
        cohort_of(1), members=(member,), keys={member: signing_key(member).verify_key}
    )
    client = SecAggClient(cohort, member, signing_key(member))
    template = KeysTemplate(cohort)
    canonical = client.advertise()
    env = open_member_message(canonical, cohort, member)
    unsigned = {k: v for k, v in env._unsigned().items()}
    reordered = dict(reversed(list(unsigned.items())))  # valid, but not canonical
    sig = signing_key(member).sign(cbor2.dumps(reordered)).signature
    other = cbor2.dumps({**reordered, "sig": sig})

    assert template.match(canonical) is not None and template.match(other) is None
    assert open_keys_advert(canonical, template) == open_keys_advert(other, template)
    assert refusal(lambda: open_keys_advert(flipped(canonical, 100), template)) == "bad_signature"


# -- bodies ----------------------------------------------------------------------------

_KEYS = st.sampled_from(["to", "from", "keys", "c", "s", "b", "bits", "data", "alive", "x"])
_LEAVES = (
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats()
    | st.binary(max_size=80) | st.text(max_size=70)
)  # fmt: skip
VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)
PARSERS = [
    KeysBody.from_body,
    lambda v: RosterBody.from_body(v, 4),
    lambda v: SharesBody.from_body(v, 4),
    lambda v: InboxBody.from_body(v, 4),
    lambda v: MaskedBody.from_body(v, 33, 12),
    lambda v: SurvivorsBody.from_body(v, 5),
    lambda v: RevealBody.from_body(v, 5),
]


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_stage_bodies_refuse_anything_else_with_a_reason(value: object) -> None:
    for parse in PARSERS:
        try:
            parse(value)
        except TernError as exc:
            assert exc.reason in {"malformed", "wrong_ring", "wrong_length", "both_shares"}
