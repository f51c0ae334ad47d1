"""The signed CBOR envelope: every way `open_envelope` must say no to a malformed or oversized
message (schema version, keys, field types and ranges, signature length, size limits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cbor2
import pytest

from tern.cbor import Caps
from tern.codecs import CodecName
from tern.envelope import Kind, canonical, loads_bounded, seal
from tern.errors import MalformedMessage, PayloadTooLarge, TopicError, UnknownSchemaVersion
from tests.envelope_helpers import open_as_receiver, rejection, signed, unsigned_map

if TYPE_CHECKING:
    from conftest import ProtocolKit


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
