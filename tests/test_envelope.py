"""The signed CBOR envelope: round trips, and every way `open_envelope` must say no."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from tern.codecs import CodecName
from tern.envelope import Envelope, Kind, canonical, open_envelope, seal
from tern.errors import BadSignature, MalformedMessage, TernError, UnexpectedMessage
from tern.messages import GlobalModel, RoundSchedule, Update
from tests.envelope_helpers import SLUG, U32_MAX, VALID_ID, open_as_receiver, rejection, signed

if TYPE_CHECKING:
    from conftest import ProtocolKit


# -- round trips ---------------------------------------------------------------------

ROUND_TRIP_CASES = [
    pytest.param(Kind.MODEL, None, id="model"),
    pytest.param(Kind.SCHEDULE, None, id="schedule"),
    *(pytest.param(Kind.UPDATE, c, id=f"update-{c}") for c in CodecName),
    *(pytest.param(Kind.PARTIAL, c, id=f"partial-{c}") for c in CodecName),
]


@pytest.mark.parametrize(("kind", "codec"), ROUND_TRIP_CASES)
def test_open_envelope_returns_what_was_sealed_for_each_kind(
    kit: ProtocolKit, kind: Kind, codec: CodecName | None
) -> None:
    if kind is Kind.MODEL:
        body = kit.global_model().to_body()
    elif kind is Kind.SCHEDULE:
        body = kit.schedule().to_body()
    else:
        assert codec is not None
        body = kit.update(codec).to_body()
    data = kit.seal(kind, body)

    env = open_as_receiver(kit, data, kinds={kind}, round=kit.round)

    assert (env.kind, env.fleet, env.round, env.model_version, env.sender, env.version) == (
        kind,
        kit.fleet,
        kit.round,
        kit.model_version,
        kit.sender,
        2,
    )
    if kind is Kind.MODEL:
        model = GlobalModel.from_body(env.body)
        assert model.spec == kit.spec
        np.testing.assert_array_equal(model.weights, kit.global_model().weights)
    elif kind is Kind.SCHEDULE:
        assert RoundSchedule.from_body(env.body) == kit.schedule()
    else:
        assert codec is not None
        sent = kit.update(codec)
        got = Update.from_body(env.body)
        assert (got.codec, got.weight, got.count) == (sent.codec, sent.weight, sent.count)
        np.testing.assert_array_equal(
            got.check(kit.spec, density=0.5).to_partial().weighted_sum,
            sent.check(kit.spec, density=0.5).to_partial().weighted_sum,
        )


@settings(max_examples=60, deadline=None)
@given(
    fleet=st.from_regex(VALID_ID, fullmatch=True),
    sender=st.from_regex(VALID_ID, fullmatch=True),
    round_=st.integers(0, U32_MAX),
    model=st.integers(0, U32_MAX),
    kind=st.sampled_from(Kind),
)
def test_open_envelope_returns_the_sealed_envelope_for_any_ids_rounds_and_model_versions(
    signing_key: SigningKey, fleet: str, sender: str, round_: int, model: int, kind: Kind
) -> None:
    env = Envelope(kind, fleet, round_, model, sender, {"round": round_, "ids": [fleet, sender]})
    data = seal(env, signing_key)

    opened = open_envelope(
        data, {sender: signing_key.verify_key}, fleet=fleet, kinds={kind}, round=round_
    )

    assert opened == env


def test_seal_is_deterministic_and_emits_canonical_cbor(kit: ProtocolKit) -> None:
    body = kit.update(CodecName.TERNARY).to_body()

    first, second = kit.seal(Kind.UPDATE, body), kit.seal(Kind.UPDATE, body)

    assert first == second
    assert canonical(cbor2.loads(first)) == first


def test_open_envelope_refuses_another_encoding_of_the_signed_map(kit: ProtocolKit) -> None:
    # envelope.py: the receiver verifies the bytes it received, never its own re-encoding
    # of them, so only the deterministic encoding the sender signed verifies.
    m = cbor2.loads(kit.sealed_update(CodecName.FLOAT32))
    reordered = cbor2.dumps(dict(reversed(list(m.items()))))  # not canonical: floats 64-bit
    assert reordered != canonical(m)

    err = rejection(open_as_receiver, kit, reordered)

    assert err.reason == "bad_signature"


def test_open_envelope_refuses_a_head_that_is_not_in_its_shortest_form(kit: ProtocolKit) -> None:
    data = bytearray(kit.sealed_update(CodecName.TERNARY))
    assert data[0] == 0xA9  # a map of 9 entries, in the shortest head
    longer = b"\xb8\x09" + bytes(data[1:])  # the same map, its length in one more byte

    err = rejection(open_as_receiver, kit, longer)

    assert isinstance(err, MalformedMessage)


def test_open_envelope_returns_the_run_it_was_sealed_with(kit: ProtocolKit) -> None:
    data = kit.seal(Kind.MODEL, None, run=2**64 - 1)

    env = open_as_receiver(kit, data, run=2**64 - 1)

    assert env.run == 2**64 - 1


@pytest.mark.parametrize(("run", "reason"), [(5, "stale_run"), (7, "future_run")])
def test_open_envelope_refuses_a_message_of_another_run(
    kit: ProtocolKit, run: int, reason: str
) -> None:
    data = kit.seal(Kind.UPDATE, None, run=run)

    err = rejection(open_as_receiver, kit, data, run=6)

    assert err.reason == reason


def test_open_envelope_refuses_a_message_signed_by_another_sender_than_expected(
    kit: ProtocolKit,
) -> None:
    data = kit.seal(Kind.UPDATE, None)

    err = rejection(open_as_receiver, kit, data, sender="dev-99")

    assert err.reason == "wrong_sender"


def test_open_envelope_accepts_the_largest_round_and_model_version(kit: ProtocolKit) -> None:
    data = kit.seal(Kind.MODEL, None, round=U32_MAX, model_version=U32_MAX)

    env = open_as_receiver(kit, data, round=U32_MAX)

    assert (env.round, env.model_version) == (U32_MAX, U32_MAX)


# -- signatures ----------------------------------------------------------------------


def test_open_envelope_rejects_a_signature_by_another_key(
    kit: ProtocolKit, other_key: SigningKey
) -> None:
    data = kit.sealed_update(CodecName.FLOAT32)

    err = rejection(
        open_envelope, data, {kit.sender: other_key.verify_key}, fleet=kit.fleet, kinds=set(Kind)
    )

    assert isinstance(err, BadSignature)
    assert err.reason == "bad_signature"


def test_open_envelope_rejects_a_message_signed_by_another_key_in_the_senders_name(
    kit: ProtocolKit, other_key: SigningKey
) -> None:
    data = seal(kit.envelope(Kind.UPDATE, {"weight": 1.0}), other_key)

    err = rejection(open_as_receiver, kit, data)

    assert isinstance(err, BadSignature)


@pytest.mark.parametrize("known", [(), ("dev-04",), ("dev-3", "DEV-03", "dev-03 ")])
def test_open_envelope_rejects_an_unknown_sender(kit: ProtocolKit, known: tuple[str, ...]) -> None:
    data = kit.sealed_update(CodecName.FLOAT32)  # from dev-03
    keys = {name: kit.key.verify_key for name in known}

    err = rejection(open_envelope, data, keys, fleet=kit.fleet, kinds=set(Kind))

    assert isinstance(err, BadSignature)
    assert err.reason == "bad_signature"


@pytest.mark.parametrize("codec", list(CodecName))
def test_open_envelope_rejects_every_single_byte_change(kit: ProtocolKit, codec: CodecName) -> None:
    data = kit.sealed_update(codec)
    variants = []
    for i in range(len(data)):
        for mask in (0xFF, 0x01):
            b = bytearray(data)
            b[i] ^= mask
            variants.append((i, mask, bytes(b)))

    accepted, wrong_errors = [], []
    for i, mask, variant in variants:
        try:
            open_as_receiver(kit, variant)
        except TernError as exc:
            if not SLUG.fullmatch(exc.reason):
                wrong_errors.append((i, mask, exc.reason))
        except Exception as exc:
            wrong_errors.append((i, mask, repr(exc)))
        else:
            accepted.append((i, mask))

    assert accepted == [], "byte changes that still opened"
    assert wrong_errors == [], "byte changes rejected with something other than a TernError"


def test_signature_covers_the_body_so_a_tampered_body_verifies_only_once_re_signed(
    kit: ProtocolKit,
) -> None:
    m = cbor2.loads(kit.sealed_update(CodecName.FLOAT32))
    unsigned = {k: v for k, v in m.items() if k != "sig"}
    unsigned["body"] = {**unsigned["body"], "weight": 1000.0}
    tampered = canonical({**unsigned, "sig": m["sig"]})
    resigned = signed(unsigned, kit.key)

    err = rejection(open_as_receiver, kit, tampered)
    env = open_as_receiver(kit, resigned)

    assert isinstance(err, BadSignature)
    assert Update.from_body(env.body).weight == 1000.0


# -- messages that are fine but not for us --------------------------------------------


def test_open_envelope_rejects_another_fleets_message(kit: ProtocolKit) -> None:
    data = kit.sealed_update(CodecName.FLOAT32)

    err = rejection(open_as_receiver, kit, data, fleet="plant-8")

    assert isinstance(err, UnexpectedMessage)
    assert err.reason == "wrong_fleet"


def test_open_envelope_rejects_a_kind_the_receiver_does_not_expect(kit: ProtocolKit) -> None:
    data = kit.sealed_update(CodecName.FLOAT32)

    err = rejection(open_as_receiver, kit, data, kinds={Kind.MODEL, Kind.PARTIAL})

    assert isinstance(err, UnexpectedMessage)
    assert err.reason == "wrong_kind"


@pytest.mark.parametrize(
    ("open_round", "reason"),
    [(13, "stale_round"), (10**6, "stale_round"), (11, "future_round"), (0, "future_round")],
)
def test_open_envelope_rejects_a_message_for_another_round(
    kit: ProtocolKit, open_round: int, reason: str
) -> None:
    data = kit.sealed_update(CodecName.FLOAT32)  # round 12

    err = rejection(open_as_receiver, kit, data, round=open_round)

    assert isinstance(err, UnexpectedMessage)
    assert err.reason == reason


def test_open_envelope_accepts_any_round_when_none_is_given(kit: ProtocolKit) -> None:
    data = kit.seal(Kind.UPDATE, {"weight": 1.0}, round=3)

    env = open_as_receiver(kit, data, round=None)

    assert env.round == 3
