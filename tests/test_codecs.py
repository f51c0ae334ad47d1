"""Ternary quantization rules and the tensor codecs (float32, float16, ternary)."""

from __future__ import annotations

from typing import Any

import cbor2
import numpy as np
import pytest
from cbor2 import CBORTag
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tern.codecs import (
    Codec,
    CodecName,
    Float16Codec,
    Float32Codec,
    TernaryCodec,
    codec_for,
    decode,
)
from tern.errors import (
    InvalidTrits,
    MalformedMessage,
    NonFiniteValue,
    ShapeMismatch,
    TernError,
    UnknownCodec,
)
from tern.quantize import TernaryRule, ternarize
from tern.tensors import TAG_MULTI_DIM, TypedArrayTag, encode_array
from tern.trits import pack
from tests.helpers import all_codecs, make_rng

ALL_RULES = list(TernaryRule)
DETERMINISTIC_RULES = [r for r in TernaryRule if r is not TernaryRule.STOCHASTIC]

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7)
# 0-d tensors have their own explicit test (test_codec_roundtrip_keeps_shape), so a
# failure there does not hide what the property tests check for every other shape.
shapes_1d_up = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=7)
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# Values whose squares do not overflow float64 sums and that are not subnormal, so
# error comparisons are about the rule, not about rounding at the edge of the range.
moderate_f32 = st.floats(min_value=-1e6, max_value=1e6, width=32, allow_subnormal=False) | st.just(
    0.0
)


def f32_arrays(
    elements: st.SearchStrategy[float] = finite_f32, *, scalars: bool = True
) -> st.SearchStrategy[Any]:
    return hnp.arrays(np.float32, shapes if scalars else shapes_1d_up, elements=elements)


def _wire_roundtrip(wire: object) -> object:
    """What a receiver decodes: canonical CBOR out, CBOR in."""
    return cbor2.loads(cbor2.dumps(wire, canonical=True))


def _bits(a: np.ndarray) -> np.ndarray:
    """Bit pattern of a float32 array, with -0.0 folded to +0.0 (0 + -0 is +0)."""
    return (np.asarray(a, dtype=np.float32).reshape(-1) + np.float32(0.0)).view(np.uint32)


def _l2_error(x: np.ndarray, trits: np.ndarray, scale: np.float32) -> float:
    x64 = x.astype(np.float64)
    return float(np.sum((x64 - float(scale) * trits.astype(np.float64)) ** 2))


# == tern.quantize ==================================================================


@pytest.mark.parametrize("rule", ALL_RULES)
@settings(max_examples=60, deadline=None)
@given(x=f32_arrays())
def test_ternarize_returns_trits_of_input_shape_and_finite_nonnegative_scale(
    rule: TernaryRule, x: np.ndarray
) -> None:
    # act
    trits, scale = ternarize(x, rule, make_rng())

    # assert
    assert trits.shape == x.shape
    assert trits.dtype == np.int8
    assert set(np.unique(trits).tolist()) <= {-1, 0, 1}
    assert isinstance(scale, np.float32)
    assert np.isfinite(scale)
    assert scale >= 0
    # a kept value never has the opposite sign of its input
    assert np.all(trits.astype(np.float64) * x.astype(np.float64) >= 0)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 4), ()])
def test_ternarize_maps_zeros_to_zero_trits_and_zero_scale(
    rule: TernaryRule, shape: tuple[int, ...]
) -> None:
    # prepare
    x = np.zeros(shape, dtype=np.float32)

    # act
    trits, scale = ternarize(x, rule, make_rng())

    # assert
    assert trits.shape == shape
    assert not trits.any()
    assert scale == 0.0


@pytest.mark.parametrize("rule", ALL_RULES)
def test_ternarize_keeps_the_largest_magnitude(rule: TernaryRule) -> None:
    # prepare
    x = np.array([0.1, -3.0, 0.2, 0.05], dtype=np.float32)

    # act
    trits, scale = ternarize(x, rule, make_rng())

    # assert
    assert trits[1] == -1
    assert scale > 0


@pytest.mark.parametrize("other", [TernaryRule.THRESHOLD, TernaryRule.MAX_ROUND])
@settings(max_examples=80, deadline=None)
@given(x=f32_arrays(moderate_f32))
def test_optimal_rule_error_is_at_most_other_deterministic_rules(
    other: TernaryRule, x: np.ndarray
) -> None:
    # act
    t_opt, s_opt = ternarize(x, TernaryRule.OPTIMAL)
    t_other, s_other = ternarize(x, other)

    # assert: exact minimiser over support sets; slack only for the float32 scale
    e_opt = _l2_error(x, t_opt, s_opt)
    e_other = _l2_error(x, t_other, s_other)
    assert e_opt <= e_other * (1 + 1e-6) + 1e-30


@pytest.mark.parametrize("seed", range(20))
def test_optimal_rule_error_is_at_most_threshold_and_max_round_on_random_tensors(
    seed: int,
) -> None:
    # prepare: heavy-tailed, like real gradient deltas
    rng = make_rng(seed)
    x = (rng.standard_t(df=3, size=int(rng.integers(1, 2000))) * 1e-3).astype(np.float32)

    # act
    errors = {rule: _l2_error(x, *ternarize(x, rule)) for rule in DETERMINISTIC_RULES}

    # assert
    best = errors[TernaryRule.OPTIMAL]
    assert best <= errors[TernaryRule.THRESHOLD] * (1 + 1e-6)
    assert best <= errors[TernaryRule.MAX_ROUND] * (1 + 1e-6)


@settings(max_examples=100, deadline=None)
@given(x=f32_arrays(moderate_f32).filter(lambda a: bool(np.any(a))))
def test_optimal_rule_is_contractive(x: np.ndarray) -> None:
    # act
    trits, scale = ternarize(x, TernaryRule.OPTIMAL)

    # assert
    assert _l2_error(x, trits, scale) < float(np.sum(x.astype(np.float64) ** 2))


def test_optimal_rule_picks_the_support_that_minimises_error() -> None:
    # prepare: sum of the k largest |x| is 4, 7, 8, 9, so S**2 / k is 16, 24.5, 21.3,
    # 20.25: keep {4, -3} at scale 3.5, error 1 + 0.25 + 0.25 + 1 = 2.5
    x = np.array([1.0, 4.0, -3.0, 1.0], dtype=np.float32)

    # act
    trits, scale = ternarize(x, TernaryRule.OPTIMAL)

    # assert
    assert trits.tolist() == [0, 1, -1, 0]
    assert scale == np.float32(3.5)
    assert _l2_error(x, trits, scale) == 2.5


def test_stochastic_rule_requires_a_generator() -> None:
    # prepare
    x = np.array([0.5, -1.0, 0.25], dtype=np.float32)

    # act / assert
    with pytest.raises(ValueError, match="Generator"):
        ternarize(x, TernaryRule.STOCHASTIC)


@settings(max_examples=30, deadline=None)
@given(x=f32_arrays(), seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_stochastic_rule_is_deterministic_for_the_same_seed(x: np.ndarray, seed: int) -> None:
    # act
    first = ternarize(x, TernaryRule.STOCHASTIC, make_rng(seed))
    second = ternarize(x, TernaryRule.STOCHASTIC, make_rng(seed))

    # assert
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]


def test_stochastic_rule_differs_across_seeds() -> None:
    # prepare
    x = np.linspace(-1, 1, 200, dtype=np.float32)

    # act
    draws = {ternarize(x, TernaryRule.STOCHASTIC, make_rng(s))[0].tobytes() for s in range(5)}

    # assert
    assert len(draws) > 1


def test_stochastic_rule_is_unbiased_on_average() -> None:
    # prepare
    x = np.array([1.0, -0.5, 0.25, -0.1, 0.0, 0.75], dtype=np.float32)
    rng = make_rng(3)
    draws = 4000

    # act
    total = np.zeros(x.size, dtype=np.float64)
    for _ in range(draws):
        trits, scale = ternarize(x, TernaryRule.STOCHASTIC, rng)
        total += float(scale) * trits

    # assert: standard error of each mean is at most 0.5 / sqrt(4000) ~ 0.008
    np.testing.assert_allclose(total / draws, x, atol=0.04)


@pytest.mark.parametrize("rule", DETERMINISTIC_RULES)
def test_deterministic_rules_ignore_the_generator(rule: TernaryRule) -> None:
    # prepare
    x = make_rng(5).standard_normal(64).astype(np.float32)

    # act
    without = ternarize(x, rule)
    with_rng = ternarize(x, rule, make_rng(99))

    # assert
    np.testing.assert_array_equal(without[0], with_rng[0])
    assert without[1] == with_rng[1]


# == tern.codecs: round trips ========================================================


@pytest.mark.parametrize("codec", all_codecs())
@settings(max_examples=60, deadline=None)
@given(x=f32_arrays(st.floats(min_value=-65504, max_value=65504, width=32), scalars=False))
def test_codec_roundtrip_through_cbor_adds_exactly_the_decoded_value(
    codec: Codec, x: np.ndarray
) -> None:
    # prepare
    wire, decoded = codec.encode(x)
    received = _wire_roundtrip(wire)
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
    got = decode(codec, _wire_roundtrip(wire), x.shape)

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
    got = decode(codec, _wire_roundtrip(wire), x.shape)

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
    got = decode(codec, _wire_roundtrip(wire), shape)

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
    wire = _wire_roundtrip(codec.encode(np.ones((4,), dtype=np.float32))[0])

    # act / assert
    with pytest.raises(ShapeMismatch):
        codec.check(wire, spec_shape, "t")


@pytest.mark.parametrize(("codec", "tag", "other"), DENSE)
def test_dense_check_rejects_the_other_float_tag(
    codec: Codec, tag: TypedArrayTag, other: TypedArrayTag
) -> None:
    # prepare
    wire = _wire_roundtrip(_dense_wire(np.ones(4, dtype=np.float32), other))

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
        codec.check(_wire_roundtrip(wire), (4,), "t")


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
        codec.check(_wire_roundtrip(wire), (4,), "t")


@pytest.mark.parametrize(("codec", "tag", "other"), DENSE)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("pos", [0, 3])
def test_dense_check_rejects_non_finite_inside_the_bytes(
    codec: Codec, tag: TypedArrayTag, other: TypedArrayTag, bad: float, pos: int
) -> None:
    # prepare
    values = np.ones(4, dtype=np.float32)
    values[pos] = bad
    wire = _wire_roundtrip(_dense_wire(values, tag))

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
    wire = _wire_roundtrip(_ternary_wire())

    # act
    got = decode(_ternary(), wire, (2, 3))

    # assert
    np.testing.assert_array_equal(got, [[0.5, 0, -0.5], [0, 0.5, 0.5]])


@pytest.mark.parametrize("spec_shape", [(6,), (3, 2), (2, 3, 1), (), (2, 4)])
def test_ternary_check_rejects_wrong_shape(spec_shape: tuple[int, ...]) -> None:
    # prepare
    wire = _wire_roundtrip(_ternary_wire())

    # act / assert
    with pytest.raises(ShapeMismatch):
        _ternary().check(wire, spec_shape, "t")


@pytest.mark.parametrize("bad", range(243, 256))
def test_ternary_check_rejects_byte_above_242(bad: int) -> None:
    # prepare
    wire = _wire_roundtrip(_ternary_wire(shape=[10], trits=CBORTag(64, bytes([121, bad]))))

    # act / assert
    with pytest.raises(InvalidTrits):
        _ternary().check(wire, (10,), "t")


@pytest.mark.parametrize("size", [0, 1, 3, 100])
def test_ternary_check_rejects_wrong_byte_length(size: int) -> None:
    # prepare: 6 trits need exactly 2 bytes
    wire = _wire_roundtrip(_ternary_wire(trits=CBORTag(64, bytes([121]) * size)))

    # act / assert
    with pytest.raises(InvalidTrits):
        _ternary().check(wire, (2, 3), "t")


def test_ternary_check_rejects_nonzero_padding() -> None:
    # prepare: 6 trits in 2 bytes; position 9 (byte 1's tail digit) is padding
    trits = bytearray(pack([1, 0, -1, 0, 1, 1]))
    trits[1] += 81
    wire = _wire_roundtrip(_ternary_wire(trits=CBORTag(64, bytes(trits))))

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
    wire = _wire_roundtrip(_ternary_wire(scale=scale))

    # act / assert
    with pytest.raises(error):
        _ternary().check(wire, (2, 3), "t")


def test_ternary_check_rejects_bignum_scale_with_a_tern_error() -> None:
    # prepare: CBOR bignum (tag 2) decodes to a Python int too large for a float
    wire = _wire_roundtrip(_ternary_wire(scale=10**400))

    # act / assert: like 10**39, this is not finite in float32
    with pytest.raises(TernError):
        _ternary().check(wire, (2, 3), "t")


@pytest.mark.parametrize("scale", [0, 0.0, -0.0, 2, 1e-45, 3.4e38])
def test_ternary_check_accepts_edge_scales(scale: float) -> None:
    # prepare
    wire = _wire_roundtrip(_ternary_wire(scale=scale))

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
        _ternary().check(_wire_roundtrip(wire), (2, 3), "t")


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
    wire = _wire_roundtrip(_ternary_wire(trits=trits))

    # act / assert
    with pytest.raises(MalformedMessage):
        _ternary().check(wire, (2, 3), "t")


@pytest.mark.parametrize("shape", [[2, -3], [2.0, 3], "23", None, [True, 3], [1] * 9], ids=repr)
def test_ternary_check_rejects_malformed_shape(shape: object) -> None:
    # prepare
    wire = _wire_roundtrip(_ternary_wire(shape=shape))

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
        checked = codec.check(_wire_roundtrip(wire), (2, 3), "t")
    except TernError:
        return
    acc = np.zeros(6, dtype=np.float32)
    checked.add_to(acc)
    assert np.all(np.isfinite(acc))


# == codec_for ======================================================================


@pytest.mark.parametrize("name", list(CodecName))
def test_codec_for_returns_the_named_codec(name: CodecName) -> None:
    # act
    codec = codec_for(str(name))

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
