"""The tensor codecs (float32, float16, ternary): round trips, what encode refuses, codec_for.

The quantization rules are in test_codecs_ternarize.py, the checks of received wire values
in test_codecs_check.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from cbor2 import CBORTag
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.codecs import (
    Codec,
    CodecName,
    Float16Codec,
    Float32Codec,
    TernaryCodec,
    codec_for,
    decode,
)
from tern.errors import NonFiniteValue, UnknownCodec
from tern.quantize import TernaryRule
from tern.tensors import TypedArrayTag
from tern.trits import pack
from tests.codec_strategies import ALL_RULES, f32_arrays, wire_roundtrip
from tests.helpers import all_codecs, make_rng


def _bits(a: np.ndarray) -> np.ndarray:
    """Bit pattern of a float32 array, with -0.0 folded to +0.0 (0 + -0 is +0)."""
    return (np.asarray(a, dtype=np.float32).reshape(-1) + np.float32(0.0)).view(np.uint32)


# == tern.codecs: round trips ========================================================


@pytest.mark.parametrize("codec", all_codecs())
@settings(max_examples=60, deadline=None)
@given(x=f32_arrays(st.floats(min_value=-65504, max_value=65504, width=32), scalars=False))
def test_codec_roundtrip_through_cbor_adds_exactly_the_decoded_value(
    codec: Codec, x: np.ndarray
) -> None:
    # prepare
    wire, decoded = codec.encode(x)
    received = wire_roundtrip(wire)
    acc = np.zeros(x.size, dtype=np.float32)

    # act
    codec.check(received, x.shape, "t").add_to(acc)

    # assert
    assert decoded.shape == x.shape
    np.testing.assert_array_equal(_bits(acc), _bits(decoded))


@settings(max_examples=100, deadline=None)
@given(x=f32_arrays(scalars=False))
def test_float32_codec_is_exact(x: np.ndarray) -> None:
    # prepare
    codec = Float32Codec()

    # act
    wire, decoded = codec.encode(x)
    got = decode(codec, wire_roundtrip(wire), x.shape)

    # assert
    np.testing.assert_array_equal(_bits(decoded), _bits(x))
    np.testing.assert_array_equal(_bits(got), _bits(x))


@settings(max_examples=100, deadline=None)
@given(x=f32_arrays(st.floats(min_value=-65504, max_value=65504, width=32), scalars=False))
def test_float16_codec_is_within_half_a_float16_ulp(x: np.ndarray) -> None:
    # prepare
    codec = Float16Codec()
    x64 = x.astype(np.float64)
    # half the float16 spacing: 2**-11 relative for normals, 2**-25 absolute below
    tolerance = np.maximum(np.abs(x64) * 2.0**-11, 2.0**-25)

    # act
    wire, _ = codec.encode(x)
    got = decode(codec, wire_roundtrip(wire), x.shape)

    # assert
    assert got.dtype == np.float32
    assert np.all(np.abs(got.astype(np.float64) - x64) <= tolerance)


@pytest.mark.parametrize("codec", all_codecs())
@pytest.mark.parametrize(
    "shape", [(), (0,), (1,), (5,), (6,), (2, 3, 4), (3, 0, 2)], ids=lambda s: f"shape{list(s)}"
)
def test_codec_roundtrip_keeps_shape(codec: Codec, shape: tuple[int, ...]) -> None:
    # prepare
    x = make_rng(11).standard_normal(shape).astype(np.float32)
    wire, decoded = codec.encode(x)

    # act
    got = decode(codec, wire_roundtrip(wire), shape)

    # assert
    assert got.shape == shape
    np.testing.assert_array_equal(got, decoded)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_ternary_wire_is_the_documented_map(rule: TernaryRule) -> None:
    # prepare
    x = np.array([[0.0, 2.0, -2.0], [2.0, 0.0, 0.0]], dtype=np.float32)
    codec = TernaryCodec(rule=rule, rng=make_rng(1))

    # act
    wire = codec.encode(x)[0]

    # assert: every rule maps this tensor to scale 2 and trits [0, 1, -1, 1, 0, 0]
    assert wire == {
        "shape": [2, 3],
        "scale": 2.0,
        "trits": CBORTag(int(TypedArrayTag.UINT8), pack([0, 1, -1, 1, 0, 0])),
    }


def test_ternary_codec_compresses_to_a_fifth_byte_per_value() -> None:
    # prepare
    x = make_rng(2).standard_normal(10_000).astype(np.float32)

    # act
    wire = TernaryCodec(rule=TernaryRule.OPTIMAL).encode(x)[0]

    # assert
    assert isinstance(wire, dict)
    assert len(wire["trits"].value) == 2000


# == tern.codecs: encode rejects ====================================================


@pytest.mark.parametrize("codec", all_codecs())
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_codec_encode_rejects_non_finite_values(codec: Codec, bad: float) -> None:
    # prepare
    x = np.array([1.0, bad, 0.5], dtype=np.float32)

    # act / assert
    with pytest.raises(NonFiniteValue):
        codec.encode(x)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("codec", all_codecs())
def test_codec_encode_rejects_float64_that_overflows_float32(codec: Codec) -> None:
    # prepare
    x = np.array([1.0, 1e39], dtype=np.float64)

    # act / assert
    with pytest.raises(NonFiniteValue):
        codec.encode(x)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [65520.0, -65520.0, 1e6, -3.0e38])
def test_float16_encode_rejects_overflow(value: float) -> None:
    # prepare
    x = np.array([0.0, value], dtype=np.float32)

    # act / assert
    with pytest.raises(NonFiniteValue, match="float16"):
        Float16Codec().encode(x)


def test_float16_encode_accepts_largest_float16() -> None:
    # prepare
    x = np.array([65504.0, -65504.0], dtype=np.float32)

    # act
    _, decoded = Float16Codec().encode(x)

    # assert
    np.testing.assert_array_equal(decoded, x)


# == codec_for ======================================================================


@pytest.mark.parametrize("name", list(CodecName))
def test_codec_for_returns_the_named_codec(name: CodecName) -> None:
    # act (a sparse codec needs the schedule's density; the others ignore it)
    codec = codec_for(str(name), density=0.1)

    # assert
    assert codec.name == name


@pytest.mark.parametrize("name", ["", "float64", "TERNARY", "int8", "ternary ", "bfloat16"])
def test_codec_for_rejects_unknown_name(name: str) -> None:
    # act / assert
    with pytest.raises(UnknownCodec) as info:
        codec_for(name)
    assert info.value.reason == "unknown_codec"


def test_codec_for_passes_the_generator_to_the_ternary_codec() -> None:
    # prepare
    rng = make_rng(4)

    # act
    codec = codec_for("ternary", rng)

    # assert
    assert isinstance(codec, TernaryCodec)
    assert codec.rng is rng
