"""Hostile input as pathological CBOR and bad numbers: deep nesting, huge declared lengths,
indefinite lengths, duplicate keys, cyclic references, bad tensors inside correctly signed
updates, and bignums; each is refused with a TernError, never another exception.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cbor2
import numpy as np
import pytest
from cbor2 import CBORTag

from tern import trits
from tern.codecs import CodecName, codec_for
from tern.envelope import Kind, canonical, loads_bounded, open_envelope
from tern.errors import InvalidTrits, MalformedMessage, NonFiniteValue, ShapeMismatch, TernError
from tern.messages import GlobalModel, RoundSchedule, Update
from tern.tensors import TypedArrayTag, encode_array
from tests.hostile_helpers import (
    LIMIT,
    MESSAGE_NAMES,
    REJECTED,
    decode_bytes,
    dense_wire,
    must_reject,
    only_tern_errors,
    sealed_messages,
)

if TYPE_CHECKING:
    from conftest import ProtocolKit


# -- pathological CBOR -----------------------------------------------------------------

DEEP = [
    b"\x81" * 10000,  # [[[[...
    b"\xa1\x00" * 10000,  # {0: {0: ...
    b"\x9f" * 10000,  # indefinite arrays
    b"\xbf\x00" * 10000,  # indefinite maps
    b"\xc6" * 100000,  # nested tags
    b"\xd8\x28" * 50000,  # nested tag 40
    b"\xd8\x1c" * 50000,  # nested shareable
    b"\xa8" + b"\x81" * 10000,  # an envelope-sized map, deep inside
    b"\x81" * 17 + b"\x00",  # one level past the bound
]


@pytest.mark.parametrize("data", DEEP, ids=lambda d: f"{d[:4].hex()}x{len(d)}")
def test_deep_nesting_is_rejected_as_malformed(kit: ProtocolKit, data: bytes) -> None:
    loads_err = must_reject(loads_bounded, data, LIMIT)
    open_err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))

    assert isinstance(loads_err, MalformedMessage)
    assert isinstance(open_err, MalformedMessage)


def test_a_signed_envelope_nested_past_the_depth_bound_is_rejected(kit: ProtocolKit) -> None:
    body: object = 0
    for _ in range(20):
        body = [body]
    data = kit.seal(Kind.UPDATE, body)

    err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))

    assert isinstance(err, MalformedMessage)


HUGE_LENGTHS = [
    b"\x5b" + b"\xff" * 8,  # byte string of 2**64-1 bytes
    b"\x7b" + b"\xff" * 8,  # text string
    b"\x9b" + b"\xff" * 8,  # array of 2**64-1 items
    b"\xbb" + b"\xff" * 8,  # map
    b"\x5a\xff\xff\xff\xff" + b"\x00" * 16,  # 4 GiB byte string, 16 bytes present
    b"\x9a\xff\xff\xff\xff\x00",  # array of 4 Gi items, one present
    b"\xa1\x64spec\x9b" + b"\x7f" + b"\xff" * 7,  # inside a map
    b"\x5f\x5b" + b"\xff" * 8,  # as a chunk of an indefinite byte string
]


@pytest.mark.parametrize("data", HUGE_LENGTHS, ids=lambda d: d[:6].hex())
def test_a_huge_declared_length_is_rejected_without_allocating_it(
    kit: ProtocolKit, data: bytes
) -> None:
    err = must_reject(loads_bounded, data, LIMIT)
    decode_bytes(data, kit)

    assert isinstance(err, MalformedMessage)


@pytest.mark.parametrize(
    "data",
    [
        b"\x9f\x01\x02",  # indefinite array, no break
        b"\xbf\x01",  # indefinite map, key without value
        b"\x5f\x41a\x61b\xff",  # indefinite byte string with a text chunk
        b"\x7f\x61a\x5f\xff\xff",  # indefinite text string with a nested indefinite chunk
        b"\xff",  # a lone break
        b"\x82\x01\xff",  # a break inside a definite array
        b"\x1c",  # reserved additional information
        b"\xf8\x10",  # simple value below 32 in two bytes
    ],
    ids=lambda d: d.hex(),
)
def test_broken_indefinite_lengths_and_reserved_forms_are_malformed(data: bytes) -> None:
    err = must_reject(loads_bounded, data, LIMIT)

    assert isinstance(err, MalformedMessage)


def _indefinite(value: object) -> bytes:
    """`value` encoded with indefinite lengths for maps, arrays and strings."""
    if isinstance(value, dict):
        items = b"".join(_indefinite(k) + _indefinite(v) for k, v in value.items())
        return b"\xbf" + items + b"\xff"
    if isinstance(value, list | tuple):
        return b"\x9f" + b"".join(_indefinite(v) for v in value) + b"\xff"
    if isinstance(value, str) and value:
        half = len(value) // 2
        return b"\x7f" + cbor2.dumps(value[:half]) + cbor2.dumps(value[half:]) + b"\xff"
    if isinstance(value, bytes) and value:
        return b"\x5f" + cbor2.dumps(value[:1]) + cbor2.dumps(value[1:]) + b"\xff"
    if isinstance(value, CBORTag):
        return cbor2.dumps(CBORTag(value.tag, None))[:-1] + _indefinite(value.value)
    return cbor2.dumps(value)


@pytest.mark.parametrize("name", MESSAGE_NAMES)
def test_an_indefinite_length_encoding_is_rejected(kit: ProtocolKit, name: str) -> None:
    sealed = sealed_messages(kit)[name]
    data = _indefinite(cbor2.loads(sealed))
    assert data != sealed

    env = decode_bytes(data, kit)

    assert env is REJECTED


def test_duplicate_keys_in_a_cbor_map_are_malformed() -> None:
    err = must_reject(loads_bounded, b"\xa2\x01\x02\x01\x03", LIMIT)

    assert isinstance(err, MalformedMessage)


@pytest.mark.parametrize("key", ["round", "sender", "body", "sig"])
def test_an_envelope_with_a_duplicated_key_is_malformed(kit: ProtocolKit, key: str) -> None:
    # A second value for a signed field would let a receiver read one and verify the other.
    m = cbor2.loads(kit.sealed_update(CodecName.FLOAT32))
    entries = b"".join(canonical(k) + canonical(v) for k, v in m.items())
    data = bytes([0xA0 + len(m) + 1]) + entries + canonical(key) + canonical(m[key])

    err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))

    assert isinstance(err, MalformedMessage)


def test_an_envelope_whose_body_is_a_cyclic_shared_reference_is_malformed(
    kit: ProtocolKit,
) -> None:
    m = cbor2.loads(kit.sealed_update(CodecName.FLOAT32))
    cyclic_body = b"\xd8\x1c\x81\xd8\x1d\x00"  # shareable([sharedref(0)]): a list holding itself
    entries = b"".join(
        canonical(k) + (cyclic_body if k == "body" else canonical(v)) for k, v in m.items()
    )
    data = bytes([0xA0 + len(m)]) + entries

    err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))
    loads_err = must_reject(loads_bounded, data, LIMIT)

    assert isinstance(err, MalformedMessage) and isinstance(loads_err, MalformedMessage)


def test_open_envelope_rejects_bytes_after_the_envelope_map(kit: ProtocolKit) -> None:
    # The wire form is one CBOR map. Junk after it makes a second byte string that
    # verifies as the same signed message, so a receiver cannot treat bytes as identity.
    data = kit.sealed_update(CodecName.FLOAT32) + b"\x00"

    err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))

    assert isinstance(err, MalformedMessage)


# -- bad tensors inside correctly signed updates ---------------------------------------


def _dense(tag: TypedArrayTag, w: object, b: object) -> list[object]:
    dtype = np.float16 if tag is TypedArrayTag.FLOAT16_LE else np.float32
    return [encode_array(np.asarray(w, dtype=dtype), tag), encode_array(np.asarray(b, dtype), tag)]


def _ternary(shape: list[int], scale: object, packed: bytes) -> dict[str, object]:
    return {"shape": shape, "scale": scale, "trits": CBORTag(64, packed)}


ZERO_W = trits.pack(np.zeros(6))  # 6 trits: 2 bytes, 4 padding trits
ZERO_B = trits.pack(np.zeros(3))
F32, F16 = TypedArrayTag.FLOAT32_LE, TypedArrayTag.FLOAT16_LE
NAN_W = [[0.0, math.nan, 0.0], [0.0, 0.0, 0.0]]

BAD_TENSORS = [
    pytest.param(CodecName.FLOAT32, _dense(F32, NAN_W, [0, 0, 0]), NonFiniteValue, id="f32-nan"),
    pytest.param(
        CodecName.FLOAT32, _dense(F32, np.zeros((2, 3)), [0, math.inf, 0]), NonFiniteValue,
        id="f32-inf",
    ),
    pytest.param(CodecName.FLOAT16, _dense(F16, NAN_W, [0, 0, 0]), NonFiniteValue, id="f16-nan"),
    pytest.param(
        CodecName.FLOAT16, _dense(F16, np.zeros((2, 3)), [-math.inf, 0, 0]), NonFiniteValue,
        id="f16-minus-inf",
    ),
    pytest.param(
        CodecName.FLOAT32, _dense(F32, np.zeros((3, 2)), [0, 0, 0]), ShapeMismatch,
        id="f32-transposed",
    ),
    pytest.param(
        CodecName.FLOAT16, _dense(F16, np.zeros((2, 3)), [0, 0]), ShapeMismatch, id="f16-short",
    ),
    pytest.param(
        CodecName.FLOAT32, [dense_wire([2, 3], 85, b"\x00" * 20), _dense(F32, [], [0, 0, 0])[1]],
        ShapeMismatch, id="f32-bytes-short-of-shape",
    ),
    pytest.param(
        CodecName.FLOAT32, _dense(F32, np.zeros((2, 3)), [0, 0, 0])[:1], ShapeMismatch,
        id="f32-one-tensor-missing",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([6], 1.0, ZERO_W), _ternary([3], 1.0, ZERO_B)],
        ShapeMismatch, id="ternary-flattened",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([2, 3], 1.0, bytes([243]) + ZERO_W[1:]),
                            _ternary([3], 1.0, ZERO_B)],
        InvalidTrits, id="ternary-byte-243",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([2, 3], 1.0, bytes([121, 202])), _ternary([3], 1.0, ZERO_B)],
        InvalidTrits, id="ternary-nonzero-padding",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([2, 3], 1.0, ZERO_W + b"\x79"), _ternary([3], 1.0, ZERO_B)],
        InvalidTrits, id="ternary-extra-byte",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([2, 3], math.nan, ZERO_W), _ternary([3], 1.0, ZERO_B)],
        NonFiniteValue, id="ternary-nan-scale",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([2, 3], 1e39, ZERO_W), _ternary([3], 1.0, ZERO_B)],
        NonFiniteValue, id="ternary-scale-overflows-float32",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("codec", "tensors", "error"), BAD_TENSORS)
def test_a_signed_update_with_a_bad_tensor_is_rejected_with_the_specific_error(
    kit: ProtocolKit, codec: CodecName, tensors: list[object], error: type[TernError]
) -> None:
    body = {"codec": str(codec), "weight": 2.0, "count": 2, "tensors": tensors}
    env = open_envelope(kit.seal(Kind.UPDATE, body), kit.keys, fleet=kit.fleet, kinds={Kind.UPDATE})
    update = Update.from_body(env.body)

    err = must_reject(update.check, kit.spec)

    assert type(err) is error


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_a_signed_update_with_a_non_finite_weight_is_rejected(
    kit: ProtocolKit, weight: float
) -> None:
    body = {**kit.update(CodecName.FLOAT32).to_body(), "weight": weight}
    env = open_envelope(kit.seal(Kind.UPDATE, body), kit.keys, fleet=kit.fleet, kinds={Kind.UPDATE})

    err = must_reject(Update.from_body, env.body)

    assert isinstance(err, NonFiniteValue)


# -- numbers beyond float range (bignums decode to Python ints of any size) -----------------


@pytest.mark.parametrize("weight", [2**1100, -(2**1100), 2**64, -(2**63) - 1])
def test_a_signed_update_with_a_bignum_weight_is_refused_before_it_is_decoded(
    kit: ProtocolKit, weight: int
) -> None:
    body = {**kit.update(CodecName.FLOAT32).to_body(), "weight": weight}
    data = kit.seal(Kind.UPDATE, body)

    err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds={Kind.UPDATE})
    # and as a value, should one ever get through: beyond any float, or a bounded weight
    decoded = only_tern_errors(Update.from_body, body)

    assert isinstance(err, MalformedMessage)
    assert decoded is REJECTED or abs(weight) < 2**65


@pytest.mark.parametrize("field", ["deadline", "lr"])
def test_a_schedule_with_a_bignum_number_is_rejected_with_a_tern_error(
    kit: ProtocolKit, field: str
) -> None:
    body = kit.schedule().to_body()
    if field == "lr":
        body["train"] = {**body["train"], "lr": 2**1100}  # type: ignore[dict-item]
    else:
        body[field] = 2**1100

    err = must_reject(RoundSchedule.from_body, body)

    assert isinstance(err, MalformedMessage | NonFiniteValue)


@pytest.mark.parametrize("scale", [2**1100, -(2**1100)], ids=["plus", "minus"])
def test_a_ternary_tensor_with_a_bignum_scale_is_rejected_with_a_tern_error(
    scale: int,
) -> None:
    wire = _ternary([2, 3], scale, ZERO_W)

    err = must_reject(codec_for(CodecName.TERNARY).check, wire, (2, 3), "w")

    assert isinstance(err, MalformedMessage | NonFiniteValue)


@pytest.mark.parametrize(
    "shape", [[0, 2**63], [0, 2**70], [0, 2**40, 2**40]], ids=["2^63", "2^70", "2^80"]
)
def test_a_model_with_an_empty_tensor_of_huge_dimensions_is_rejected_with_a_tern_error(
    shape: list[int],
) -> None:
    # The product is 0, so parse_shape's element bound passes; numpy cannot make the array.
    body = {"spec": [["w", shape]], "weights": [dense_wire(shape, 85, b"")]}

    err = must_reject(GlobalModel.from_body, body)

    assert isinstance(err, MalformedMessage | ShapeMismatch)
