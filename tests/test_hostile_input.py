"""Hostile input: whatever arrives, every decoder of the protocol layer fails with a TernError.

A component counts rejections by ``reason`` and carries on; any other exception
(OverflowError, ValueError from numpy, RecursionError, ...) would end its loop. So each
test here feeds garbage to every decoder and lets anything but a TernError fail it:
random bytes, truncations, bit flips, arbitrary CBOR-shaped Python values, near-valid
bodies, deep nesting, huge declared lengths, indefinite lengths and duplicate keys.

Here: bytes (random, truncated, flipped). Values and near-valid bodies are in
test_hostile_input_values.py; pathological CBOR, bad tensors and bignums in
test_hostile_input_cbor.py; what they share in tests/hostile_helpers.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.codecs import CodecName
from tern.envelope import Kind, canonical, loads_bounded, open_envelope
from tern.messages import GlobalModel
from tern.spec import ModelSpec
from tests.hostile_helpers import (
    FUZZ,
    LIMIT,
    MESSAGE_NAMES,
    REJECTED,
    decode_body,
    decode_bytes,
    must_reject,
    only_tern_errors,
    sealed_messages,
)

if TYPE_CHECKING:
    from conftest import ProtocolKit


# -- bytes -----------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_tern_errors_in_every_decoder(
    kit: ProtocolKit, data: bytes
) -> None:
    decode_bytes(data, kit)


@FUZZ
@given(
    head=st.sampled_from([b"\xa8", b"\xbf", b"\x9f", b"\xd8\x28\x82", b"\xa4dspec", b"\xa1"]),
    tail=st.binary(max_size=200),
)
def test_random_bytes_under_a_container_header_raise_only_tern_errors(
    kit: ProtocolKit, head: bytes, tail: bytes
) -> None:
    decode_bytes(head + tail, kit)


@pytest.mark.parametrize("name", MESSAGE_NAMES)
def test_every_truncation_of_a_sealed_message_is_rejected(kit: ProtocolKit, name: str) -> None:
    data = sealed_messages(kit)[name]

    opened = [n for n in range(len(data)) if decode_bytes(data[:n], kit) is not REJECTED]

    assert opened == [], "truncated lengths that still opened"


@pytest.mark.parametrize("codec", list(CodecName))
def test_every_bit_flip_of_a_small_sealed_update_is_rejected(
    kit: ProtocolKit, codec: CodecName
) -> None:
    data = kit.sealed_update(codec)

    opened = []
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        if decode_bytes(bytes(flipped), kit) is not REJECTED:
            opened.append(bit)

    assert opened == [], "bit positions whose flip still opened"


@pytest.mark.parametrize("name", MESSAGE_NAMES)
def test_every_bit_flip_of_a_message_body_raises_only_tern_errors(
    kit: ProtocolKit, name: str
) -> None:
    # Below the signature: what a decoder sees if a signer was compromised or buggy.
    body = cbor2.loads(sealed_messages(kit)[name])["body"]
    data = canonical(body)

    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        value = only_tern_errors(loads_bounded, bytes(flipped), LIMIT)
        if value is not REJECTED:
            decode_body(value, kit.spec)


@pytest.fixture(scope="module")
def large_model(kit: ProtocolKit) -> bytes:
    spec = ModelSpec.of({"w": (40, 50), "b": (50,)})
    weights = np.linspace(-1.0, 1.0, spec.size, dtype=np.float32)
    return kit.seal(Kind.MODEL, GlobalModel(spec, weights).to_body())


@settings(max_examples=120, deadline=None)
@given(bits=st.lists(st.integers(0, 2**40), min_size=1, max_size=6, unique=True))
def test_random_bit_flips_of_a_large_sealed_model_are_rejected(
    kit: ProtocolKit, large_model: bytes, bits: list[int]
) -> None:
    flipped = bytearray(large_model)
    for bit in {b % (8 * len(large_model)) for b in bits}:
        flipped[bit // 8] ^= 1 << (bit % 8)

    err = must_reject(open_envelope, bytes(flipped), kit.keys, fleet=kit.fleet, kinds={Kind.MODEL})

    assert err.reason in {"malformed", "bad_signature", "wrong_fleet", "unknown_version",
                          "wrong_kind", "oversize"}  # fmt: skip
