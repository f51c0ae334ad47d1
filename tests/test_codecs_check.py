"""The tensor codecs' checks (tern.codecs): every malformed dense or ternary wire value is
refused with a TernError, and nothing else escapes on arbitrary input.
"""

from __future__ import annotations

import numpy as np
import pytest
from cbor2 import CBORTag
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.codecs import Codec, Float16Codec, Float32Codec, TernaryCodec, decode
from tern.errors import InvalidTrits, MalformedMessage, NonFiniteValue, ShapeMismatch, TernError
from tern.quantize import TernaryRule
from tern.tensors import TAG_MULTI_DIM, TypedArrayTag, encode_array
from tern.trits import pack
from tests.codec_strategies import wire_roundtrip
from tests.helpers import all_codecs

# == tern.codecs: check rejects =====================================================


def _dense_wire(values: np.ndarray, tag: TypedArrayTag) -> CBORTag:
    return encode_array(values, tag)


DENSE = [
    pytest.param(Float32Codec(), TypedArrayTag.FLOAT32_LE, TypedArrayTag.FLOAT16_LE, id="float32"),
    pytest.param(Float16Codec(), TypedArrayTag.FLOAT16_LE, TypedArrayTag.FLOAT32_LE, id="float16"),
]


@pytest.mark.parametrize(("codec", "tag", "other"), DENSE)
@pytest.mark.parametrize("spec_shape", [(3,), (2, 2), (4, 1), (), (0,)])
def test_dense_check_rejects_wrong_shape(
    codec: Codec, tag: TypedArrayTag, other: TypedArrayTag, spec_shape: tuple[int, ...]
) -> None:
    # prepare
    wire = wire_roundtrip(codec.encode(np.ones((4,), dtype=np.float32))[0])

    # act / assert
    with pytest.raises(ShapeMismatch):
        codec.check(wire, spec_shape, "t")


@pytest.mark.parametrize(("codec", "tag", "other"), DENSE)
def test_dense_check_rejects_the_other_float_tag(
    codec: Codec, tag: TypedArrayTag, other: TypedArrayTag
) -> None:
    # prepare
    wire = wire_roundtrip(_dense_wire(np.ones(4, dtype=np.float32), other))

    # act / assert
    with pytest.raises(MalformedMessage):
        codec.check(wire, (4,), "t")


@pytest.mark.parametrize(("codec", "tag", "other"), DENSE)
@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"\x00" * 16, id="bare-bytes"),
        pytest.param([[4], b"\x00" * 16], id="untagged-array"),
        pytest.param(CBORTag(41, [[4], CBORTag(85, b"\x00" * 16)]), id="wrong-outer-tag"),
        pytest.param(CBORTag(TAG_MULTI_DIM, [[4]]), id="no-array"),
        pytest.param(CBORTag(TAG_MULTI_DIM, [[4], b"\x00" * 16, 1]), id="three-items"),
        pytest.param(CBORTag(TAG_MULTI_DIM, {"shape": [4]}), id="map"),
        pytest.param(None, id="null"),
        pytest.param({"shape": [4], "scale": 1.0, "trits": CBORTag(64, b"yy")}, id="ternary-map"),
    ],
)
def test_dense_check_rejects_malformed_wire(
    codec: Codec, tag: TypedArrayTag, other: TypedArrayTag, wire: object
) -> None:
    # act / assert
    with pytest.raises(MalformedMessage):
        codec.check(wire_roundtrip(wire), (4,), "t")


@pytest.mark.parametrize(("codec", "tag", "other"), DENSE)
@pytest.mark.parametrize("delta", [-1, 1, -4, 4, 100])
def test_dense_check_rejects_wrong_byte_length(
    codec: Codec, tag: TypedArrayTag, other: TypedArrayTag, delta: int
) -> None:
    # prepare
    good = encode_array(np.ones(4, dtype=np.float32), tag)
    data = good.value[1].value
    data = data[:delta] if delta < 0 else data + b"\x00" * delta
    wire = CBORTag(TAG_MULTI_DIM, [[4], CBORTag(int(tag), data)])

    # act / assert
    with pytest.raises(ShapeMismatch):
        codec.check(wire_roundtrip(wire), (4,), "t")


@pytest.mark.parametrize(("codec", "tag", "other"), DENSE)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("pos", [0, 3])
def test_dense_check_rejects_non_finite_inside_the_bytes(
    codec: Codec, tag: TypedArrayTag, other: TypedArrayTag, bad: float, pos: int
) -> None:
    # prepare
    values = np.ones(4, dtype=np.float32)
    values[pos] = bad
    wire = wire_roundtrip(_dense_wire(values, tag))

    # act / assert
    with pytest.raises(NonFiniteValue):
        codec.check(wire, (4,), "t")


def _ternary_wire(**override: object) -> dict[str, object]:
    wire: dict[str, object] = {
        "shape": [2, 3],
        "scale": 0.5,
        "trits": CBORTag(64, pack([1, 0, -1, 0, 1, 1])),
    }
    wire.update(override)
    return wire


def _ternary() -> TernaryCodec:
    return TernaryCodec(rule=TernaryRule.OPTIMAL)


def test_ternary_check_accepts_a_well_formed_map() -> None:
    # prepare
    wire = wire_roundtrip(_ternary_wire())

    # act
    got = decode(_ternary(), wire, (2, 3))

    # assert
    np.testing.assert_array_equal(got, [[0.5, 0, -0.5], [0, 0.5, 0.5]])


@pytest.mark.parametrize("spec_shape", [(6,), (3, 2), (2, 3, 1), (), (2, 4)])
def test_ternary_check_rejects_wrong_shape(spec_shape: tuple[int, ...]) -> None:
    # prepare
    wire = wire_roundtrip(_ternary_wire())

    # act / assert
    with pytest.raises(ShapeMismatch):
        _ternary().check(wire, spec_shape, "t")


@pytest.mark.parametrize("bad", range(243, 256))
def test_ternary_check_rejects_byte_above_242(bad: int) -> None:
    # prepare
    wire = wire_roundtrip(_ternary_wire(shape=[10], trits=CBORTag(64, bytes([121, bad]))))

    # act / assert
    with pytest.raises(InvalidTrits):
        _ternary().check(wire, (10,), "t")


@pytest.mark.parametrize("size", [0, 1, 3, 100])
def test_ternary_check_rejects_wrong_byte_length(size: int) -> None:
    # prepare: 6 trits need exactly 2 bytes
    wire = wire_roundtrip(_ternary_wire(trits=CBORTag(64, bytes([121]) * size)))

    # act / assert
    with pytest.raises(InvalidTrits):
        _ternary().check(wire, (2, 3), "t")


def test_ternary_check_rejects_nonzero_padding() -> None:
    # prepare: 6 trits in 2 bytes; position 9 (byte 1's tail digit) is padding
    trits = bytearray(pack([1, 0, -1, 0, 1, 1]))
    trits[1] += 81
    wire = wire_roundtrip(_ternary_wire(trits=CBORTag(64, bytes(trits))))

    # act / assert
    with pytest.raises(InvalidTrits):
        _ternary().check(wire, (2, 3), "t")


@pytest.mark.parametrize(
    ("scale", "error"),
    [
        pytest.param(-0.5, MalformedMessage, id="negative"),
        pytest.param(-1, MalformedMessage, id="negative-int"),
        pytest.param(-1e-30, MalformedMessage, id="tiny-negative"),
        pytest.param(float("nan"), NonFiniteValue, id="nan"),
        pytest.param(float("inf"), NonFiniteValue, id="inf"),
        pytest.param(float("-inf"), NonFiniteValue, id="minus-inf"),
        pytest.param(1e39, NonFiniteValue, id="overflows-float32"),
        pytest.param(10**39, NonFiniteValue, id="int-overflows-float32"),
        pytest.param(True, MalformedMessage, id="bool"),
        pytest.param("0.5", MalformedMessage, id="string"),
        pytest.param(None, MalformedMessage, id="null"),
        pytest.param([0.5], MalformedMessage, id="array"),
    ],
)
def test_ternary_check_rejects_bad_scale(scale: object, error: type[TernError]) -> None:
    # prepare
    wire = wire_roundtrip(_ternary_wire(scale=scale))

    # act / assert
    with pytest.raises(error):
        _ternary().check(wire, (2, 3), "t")


def test_ternary_check_rejects_bignum_scale_with_a_tern_error() -> None:
    # prepare: CBOR bignum (tag 2) decodes to a Python int too large for a float
    wire = wire_roundtrip(_ternary_wire(scale=10**400))

    # act / assert: like 10**39, this is not finite in float32
    with pytest.raises(TernError):
        _ternary().check(wire, (2, 3), "t")


@pytest.mark.parametrize("scale", [0, 0.0, -0.0, 2, 1e-45, 3.4e38])
def test_ternary_check_accepts_edge_scales(scale: float) -> None:
    # prepare
    wire = wire_roundtrip(_ternary_wire(scale=scale))

    # act
    got = decode(_ternary(), wire, (2, 3))

    # assert
    assert np.all(np.isfinite(got))
    assert np.abs(got).max() == np.float32(scale)


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param({"shape": [2, 3], "scale": 0.5}, id="missing-trits"),
        pytest.param({"shape": [2, 3], "trits": CBORTag(64, b"yy")}, id="missing-scale"),
        pytest.param({"scale": 0.5, "trits": CBORTag(64, b"yy")}, id="missing-shape"),
        pytest.param(_ternary_wire(extra=1), id="extra-key"),
        pytest.param(_ternary_wire(codec="ternary"), id="extra-codec-key"),
        pytest.param({}, id="empty-map"),
        pytest.param([[2, 3], 0.5, CBORTag(64, b"yy")], id="array"),
        pytest.param(CBORTag(64, b"yy"), id="bare-trits"),
        pytest.param(None, id="null"),
    ],
)
def test_ternary_check_rejects_a_map_with_extra_or_missing_keys(wire: object) -> None:
    # act / assert
    with pytest.raises(MalformedMessage):
        _ternary().check(wire_roundtrip(wire), (2, 3), "t")


@pytest.mark.parametrize(
    "trits",
    [
        pytest.param(b"yy", id="untagged-bytes"),
        pytest.param(CBORTag(85, b"yy"), id="float32-tag"),
        pytest.param(CBORTag(65, b"yy"), id="uint16-tag"),
        pytest.param(CBORTag(64, [121, 121]), id="tag-on-array"),
        pytest.param(CBORTag(64, "yy"), id="tag-on-text"),
        pytest.param([121, 121], id="array"),
    ],
)
def test_ternary_check_rejects_trits_that_are_not_a_uint8_typed_array(trits: object) -> None:
    # prepare
    wire = wire_roundtrip(_ternary_wire(trits=trits))

    # act / assert
    with pytest.raises(MalformedMessage):
        _ternary().check(wire, (2, 3), "t")


@pytest.mark.parametrize("shape", [[2, -3], [2.0, 3], "23", None, [True, 3], [1] * 9], ids=repr)
def test_ternary_check_rejects_malformed_shape(shape: object) -> None:
    # prepare
    wire = wire_roundtrip(_ternary_wire(shape=shape))

    # act / assert
    with pytest.raises(MalformedMessage):
        _ternary().check(wire, (2, 3), "t")


@pytest.mark.parametrize("codec", all_codecs())
@settings(max_examples=150, deadline=None)
@given(
    wire=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats()
        | st.binary(max_size=20)
        | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(["shape", "scale", "trits", "x"]), inner, max_size=4)
            | st.builds(CBORTag, st.sampled_from([40, 64, 84, 85]), inner)
        ),
        max_leaves=10,
    )
)
def test_codec_check_raises_only_tern_errors_on_arbitrary_wire(codec: Codec, wire: object) -> None:
    # act / assert: either a checked tensor or a TernError, nothing else escapes
    try:
        checked = codec.check(wire_roundtrip(wire), (2, 3), "t")
    except TernError:
        return
    acc = np.zeros(6, dtype=np.float32)
    checked.add_to(acc)
    assert np.all(np.isfinite(acc))
