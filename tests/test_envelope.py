"""The signed CBOR envelope: round trips, and every way `open_envelope` must say no."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from tern.cbor import Caps
from tern.codecs import CodecName
from tern.envelope import Envelope, Kind, canonical, loads_bounded, open_envelope, seal
from tern.errors import (
    BadSignature,
    MalformedMessage,
    PayloadTooLarge,
    TernError,
    TopicError,
    UnexpectedMessage,
    UnknownSchemaVersion,
)
from tern.messages import GlobalModel, RoundSchedule, Update

if TYPE_CHECKING:
    from conftest import ProtocolKit

SLUG = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
VALID_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
U32_MAX = 2**32 - 1


def rejection(fn: Callable[..., object], *args: object, **kwargs: object) -> TernError:
    """Call `fn`, which must raise a TernError carrying a slug reason; return the error."""
    with pytest.raises(TernError) as info:
        fn(*args, **kwargs)
    assert SLUG.fullmatch(info.value.reason), f"reason {info.value.reason!r} is not a slug"
    return info.value


def open_as_receiver(kit: ProtocolKit, data: bytes, **options: object) -> Envelope:
    """Open `data` as the kit's fleet would: the sender's key known, every kind accepted."""
    kwargs: dict[str, object] = {"fleet": kit.fleet, "kinds": set(Kind)}
    kwargs.update(options)
    return open_envelope(data, kit.keys, **kwargs)  # type: ignore[arg-type]


def unsigned_map(kit: ProtocolKit, **fields: object) -> dict[object, object]:
    """The wire map without ``sig``, with `fields` replacing the kit's defaults."""
    m: dict[object, object] = {
        "v": 2,
        "kind": "update",
        "fleet": kit.fleet,
        "run": 0,
        "round": kit.round,
        "model": kit.model_version,
        "sender": kit.sender,
        "body": {"weight": 1.0},
    }
    m.update(fields)
    return m


def signed(m: dict[object, object], key: SigningKey) -> bytes:
    """Sign any map the way `seal` does, without `seal`'s checks."""
    return canonical({**m, "sig": key.sign(canonical(m)).signature})


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
            got.check(kit.spec).to_partial().weighted_sum,
            sent.check(kit.spec).to_partial().weighted_sum,
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


# -- malformed envelopes ---------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 1, 3, 255, 2**32, -1, 2.0, 1.5, True, "2", None, [2]])
def test_open_envelope_rejects_a_schema_version_it_does_not_speak(
    kit: ProtocolKit, version: object
) -> None:
    data = signed(unsigned_map(kit, v=version), kit.key)

    err = rejection(open_as_receiver, kit, data)

    assert isinstance(err, UnknownSchemaVersion)
    assert err.reason == "unknown_version"
    assert err.version == version


def test_open_envelope_rejects_a_sealed_envelope_of_a_future_version(kit: ProtocolKit) -> None:
    data = kit.seal(Kind.UPDATE, {"weight": 1.0}, version=3)

    err = rejection(open_as_receiver, kit, data)

    assert isinstance(err, UnknownSchemaVersion)


ENVELOPE_KEYS = ["v", "kind", "fleet", "run", "round", "model", "sender", "body", "sig"]


@pytest.mark.parametrize("missing", ENVELOPE_KEYS)
def test_open_envelope_rejects_a_missing_envelope_key(kit: ProtocolKit, missing: str) -> None:
    m = cbor2.loads(signed(unsigned_map(kit), kit.key))
    del m[missing]
    data = canonical(m)

    err = rejection(open_as_receiver, kit, data)

    assert isinstance(err, MalformedMessage)
    assert err.reason == "malformed"


@pytest.mark.parametrize("extra", ["x", "Sig", "", 1, b"v"])
def test_open_envelope_rejects_an_extra_envelope_key(kit: ProtocolKit, extra: object) -> None:
    data = signed(unsigned_map(kit) | {extra: 0}, kit.key)

    err = rejection(open_as_receiver, kit, data)

    assert isinstance(err, MalformedMessage)
    assert err.reason == "malformed"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run", -1),
        ("run", 2**64),
        ("run", 1.0),
        ("run", None),
        ("round", True),
        ("round", False),
        ("round", -1),
        ("round", 2**32),
        ("round", 2**64),
        ("round", 12.0),
        ("round", "12"),
        ("round", None),
        ("model", True),
        ("model", -1),
        ("model", 2**32),
        ("model", 11.0),
        ("kind", "telemetry"),
        ("kind", "UPDATE"),
        ("kind", 2),
        ("kind", b"update"),
        ("fleet", b"plant-7"),
        ("fleet", 7),
        ("sender", None),
        ("sender", ["dev-03"]),
    ],
)
def test_open_envelope_rejects_a_field_of_the_wrong_type_or_range(
    kit: ProtocolKit, field: str, value: object
) -> None:
    data = signed(unsigned_map(kit, **{field: value}), kit.key)

    err = rejection(open_as_receiver, kit, data)

    assert isinstance(err, MalformedMessage)
    assert err.reason == "malformed"


@pytest.mark.parametrize(
    "sig",
    [b"", b"\x00" * 63, b"\x00" * 65, b"\x00" * 128, "s" * 64, None, [0] * 64],
    ids=["empty", "63", "65", "128", "text", "null", "array"],
)
def test_open_envelope_rejects_a_signature_that_is_not_64_bytes(
    kit: ProtocolKit, sig: object
) -> None:
    data = canonical({**unsigned_map(kit), "sig": sig})

    err = rejection(open_as_receiver, kit, data)

    assert isinstance(err, MalformedMessage)
    assert err.reason == "malformed"


@pytest.mark.parametrize("top", [[1, 2], 0, b"", "map", None, cbor2.CBORTag(40, {})])
def test_open_envelope_rejects_a_message_that_is_not_a_map(kit: ProtocolKit, top: object) -> None:
    data = canonical(top)

    err = rejection(open_as_receiver, kit, data)

    assert isinstance(err, MalformedMessage)


@pytest.mark.parametrize(("fleet", "sender"), [("a/b", "dev-03"), ("plant-7", "+"), ("", "x")])
def test_seal_refuses_an_invalid_fleet_or_sender_id(
    kit: ProtocolKit, fleet: str, sender: str
) -> None:
    env = kit.envelope(Kind.UPDATE, None, fleet=fleet, sender=sender)

    err = rejection(seal, env, kit.key)

    assert isinstance(err, TopicError)


# -- size limits ---------------------------------------------------------------------


def test_open_envelope_rejects_a_payload_over_max_bytes_with_size_and_limit(
    kit: ProtocolKit,
) -> None:
    data = kit.sealed_update(CodecName.FLOAT32)

    err = rejection(open_as_receiver, kit, data, caps=Caps(len(data) - 1, 1000))

    assert isinstance(err, PayloadTooLarge)
    assert err.reason == "oversize"
    assert (err.size, err.limit) == (len(data), len(data) - 1)


def test_open_envelope_accepts_a_payload_of_exactly_max_bytes(kit: ProtocolKit) -> None:
    data = kit.sealed_update(CodecName.FLOAT32)

    env = open_as_receiver(kit, data, caps=Caps(len(data), 1000))

    assert env.sender == kit.sender


def test_loads_bounded_checks_the_size_before_decoding(kit: ProtocolKit) -> None:
    data = b"\xff" * 100  # not CBOR either: the size must win

    err = rejection(loads_bounded, data, 99)

    assert isinstance(err, PayloadTooLarge)
    assert (err.size, err.limit) == (100, 99)
