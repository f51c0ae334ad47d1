"""Update bodies and Update.check: round trips, malformed bodies refused, and a checked update
that adds to an accumulator exactly, or leaves it untouched when its last tensor is bad.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from cbor2 import CBORTag
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.aggregate import Accumulator, Partial
from tern.codecs import Codec, Float16Codec, Float32Codec, TernaryCodec
from tern.errors import (
    InvalidTrits,
    MalformedMessage,
    NonFiniteValue,
    ShapeMismatch,
    TernError,
    UnknownCodec,
)
from tern.messages import CheckedUpdate, Update, encode_update
from tern.quantize import TernaryRule
from tern.spec import ModelSpec
from tern.tensors import TypedArrayTag, encode_array
from tests.helpers import all_codecs, make_rng
from tests.message_helpers import (
    SPEC,
    canonical_cbor,
    random_partial,
    received,
    via_cbor,
    without_key,
)


def _update(codec: Codec, seed: int = 0, spec: ModelSpec = SPEC) -> Update:
    return encode_update(codec, spec, random_partial(seed, spec))[0]


def _filled_accumulator(size: int = SPEC.size) -> Accumulator:
    acc = Accumulator(size)
    acc.add(Partial(make_rng(99).standard_normal(size).astype(np.float32), 5.0, 4))
    return acc


def _state(acc: Accumulator) -> tuple[bytes, float, int]:
    return acc.sum.tobytes(), acc.total_weight, acc.count


# == Update: body ===================================================================


@pytest.mark.parametrize("codec", all_codecs())
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1), weight=st.floats(0.01, 1e4))
def test_update_roundtrips_through_canonical_cbor(codec: Codec, seed: int, weight: float) -> None:
    # prepare
    update = encode_update(codec, SPEC, random_partial(seed, weight=weight))[0]

    # act
    got = received(update)

    # assert
    assert got.codec == update.codec == codec.name
    assert got.weight == update.weight == weight
    assert got.count == update.count
    assert canonical_cbor(got.to_body()) == canonical_cbor(update.to_body())


def _update_body(**override: object) -> dict[str, object]:
    body = _update(Float32Codec()).to_body()
    body.update(override)
    return body


@pytest.mark.parametrize(
    ("body", "error"),
    [
        *[
            pytest.param(without_key(_update_body(), k), MalformedMessage, id=f"missing-{k}")
            for k in ("codec", "weight", "count", "tensors")
        ],
        pytest.param(_update_body(round=1), MalformedMessage, id="extra-key"),
        pytest.param([], MalformedMessage, id="array"),
        pytest.param(None, MalformedMessage, id="null"),
        pytest.param(_update_body(weight=True), MalformedMessage, id="bool-weight"),
        pytest.param(_update_body(weight=0), MalformedMessage, id="zero-weight"),
        pytest.param(_update_body(weight=0.0), MalformedMessage, id="zero-float-weight"),
        pytest.param(_update_body(weight=-0.0), MalformedMessage, id="minus-zero-weight"),
        pytest.param(_update_body(weight=-1.5), MalformedMessage, id="negative-weight"),
        pytest.param(_update_body(weight=float("nan")), NonFiniteValue, id="nan-weight"),
        pytest.param(_update_body(weight=float("inf")), NonFiniteValue, id="inf-weight"),
        pytest.param(_update_body(weight="1.0"), MalformedMessage, id="string-weight"),
        pytest.param(_update_body(weight=None), MalformedMessage, id="null-weight"),
        pytest.param(_update_body(count=0), MalformedMessage, id="count-0"),
        pytest.param(_update_body(count=True), MalformedMessage, id="bool-count"),
        pytest.param(_update_body(count=-1), MalformedMessage, id="negative-count"),
        pytest.param(_update_body(count=2**32), MalformedMessage, id="count-too-large"),
        pytest.param(_update_body(count=1.0), MalformedMessage, id="float-count"),
        pytest.param(_update_body(codec="int8"), UnknownCodec, id="unknown-codec"),
        pytest.param(_update_body(codec="Float32"), UnknownCodec, id="codec-case"),
        pytest.param(_update_body(codec=None), UnknownCodec, id="null-codec"),
        pytest.param(_update_body(tensors={}), MalformedMessage, id="tensors-map"),
        pytest.param(_update_body(tensors=b"\x00"), MalformedMessage, id="tensors-bytes"),
        pytest.param(_update_body(tensors=None), MalformedMessage, id="tensors-null"),
    ],
)
def test_update_from_body_rejects_malformed_body(body: object, error: type[TernError]) -> None:
    # act / assert
    with pytest.raises(error):
        Update.from_body(via_cbor(body))


def test_update_from_body_accepts_an_integer_weight() -> None:
    # act
    got = Update.from_body(via_cbor(_update_body(weight=3)))

    # assert
    assert got.weight == 3.0
    assert isinstance(got.weight, float)


# == Update.check ===================================================================


@pytest.mark.parametrize("codec", all_codecs())
@pytest.mark.parametrize("keep", [0, 2, 4], ids=["none", "fewer", "more"])
def test_update_check_rejects_a_tensor_count_unlike_the_spec(codec: Codec, keep: int) -> None:
    # prepare
    update = _update(codec)
    tensors = (*update.tensors, update.tensors[0])[:keep]
    bad = received(Update(update.codec, update.weight, update.count, tensors))

    # act / assert
    with pytest.raises(ShapeMismatch):
        bad.check(SPEC)


def _bad_last_tensors() -> list[Any]:
    """(codec, corrupt the wire of the spec's last tensor, expected error)."""

    def ternary_byte_243(w: dict[str, Any]) -> object:
        return {**w, "trits": CBORTag(64, bytes([243]) + w["trits"].value[1:])}

    def ternary_padding(w: dict[str, Any]) -> object:
        data = bytearray(w["trits"].value)
        data[-1] -= 81  # bias: 7 trits in 2 bytes; byte 1's tail digit is padding position 9
        return {**w, "trits": CBORTag(64, bytes(data))}

    def dense_nan(w: CBORTag) -> object:
        values = np.zeros(7, np.float32)
        values[-1] = np.nan
        return encode_array(values, TypedArrayTag.FLOAT32_LE)

    return [
        pytest.param(
            TernaryCodec(rule=TernaryRule.OPTIMAL),
            ternary_byte_243,
            InvalidTrits,
            id="ternary-byte-243",
        ),
        pytest.param(
            TernaryCodec(rule=TernaryRule.OPTIMAL),
            ternary_padding,
            InvalidTrits,
            id="ternary-padding",
        ),
        pytest.param(
            TernaryCodec(rule=TernaryRule.OPTIMAL),
            lambda w: {**w, "scale": float("nan")},
            NonFiniteValue,
            id="ternary-nan",
        ),
        pytest.param(
            TernaryCodec(rule=TernaryRule.OPTIMAL),
            lambda w: {**w, "scale": -1.0},
            MalformedMessage,
            id="ternary-negative",
        ),
        pytest.param(
            TernaryCodec(rule=TernaryRule.OPTIMAL),
            lambda w: {**w, "shape": [8]},
            ShapeMismatch,
            id="ternary-shape",
        ),
        pytest.param(
            TernaryCodec(rule=TernaryRule.OPTIMAL),
            lambda w: {**w, "extra": 0},
            MalformedMessage,
            id="ternary-extra-key",
        ),
        pytest.param(Float32Codec(), dense_nan, NonFiniteValue, id="float32-nan"),
        pytest.param(
            Float32Codec(),
            lambda w: encode_array(np.zeros(8, np.float32), TypedArrayTag.FLOAT32_LE),
            ShapeMismatch,
            id="float32-shape",
        ),
        pytest.param(
            Float32Codec(),
            lambda w: encode_array(np.zeros(7, np.float16), TypedArrayTag.FLOAT16_LE),
            MalformedMessage,
            id="float32-gets-float16",
        ),
        pytest.param(
            Float16Codec(),
            lambda w: encode_array(np.zeros(7, np.float32), TypedArrayTag.FLOAT32_LE),
            MalformedMessage,
            id="float16-gets-float32",
        ),
        pytest.param(Float16Codec(), lambda w: None, MalformedMessage, id="float16-null"),
    ]


@pytest.mark.parametrize(("codec", "corrupt", "error"), _bad_last_tensors())
def test_update_with_bad_last_tensor_leaves_the_accumulator_untouched(
    codec: Codec, corrupt: Any, error: type[TernError]
) -> None:
    # prepare: the first tensors are valid, only the spec's last one is bad
    good = _update(codec)
    tensors = (*good.tensors[:-1], corrupt(good.tensors[-1]))
    update = received(Update(good.codec, good.weight, good.count, tensors))
    head_spec = ModelSpec(SPEC.tensors[:-1])
    Update(good.codec, good.weight, good.count, update.tensors[:-1]).check(head_spec)
    acc = _filled_accumulator()
    before = _state(acc)

    # act
    with pytest.raises(error):
        update.check(SPEC).add_to(acc)

    # assert
    assert _state(acc) == before


@pytest.mark.parametrize("codec", all_codecs())
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_checked_update_add_to_is_bit_identical_to_adding_its_partial(
    codec: Codec, seed: int
) -> None:
    # prepare
    checked = received(_update(codec, seed)).check(SPEC)
    direct, via_partial = _filled_accumulator(), _filled_accumulator()

    # act
    checked.add_to(direct)
    via_partial.add(checked.to_partial())

    # assert
    assert _state(direct) == _state(via_partial)


@pytest.mark.parametrize("codec", all_codecs())
def test_checked_update_to_partial_carries_weight_count_and_decoded_values(codec: Codec) -> None:
    # prepare
    partial = random_partial(5)
    update, residual = encode_update(codec, SPEC, partial)
    sent = partial.weighted_sum - residual * np.float32(partial.total_weight)

    # act
    got = received(update).check(SPEC).to_partial()

    # assert
    assert got.total_weight == partial.total_weight
    assert got.count == partial.count
    np.testing.assert_allclose(got.weighted_sum, sent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "codec",
    [
        pytest.param(Float32Codec(), id="float32"),
        pytest.param(TernaryCodec(rule=TernaryRule.OPTIMAL), id="ternary"),
    ],
)
@pytest.mark.parametrize("size", [SPEC.size - 1, SPEC.size + 5], ids=["shorter", "longer"])
def test_checked_update_add_to_rejects_an_accumulator_unlike_the_spec(
    codec: Codec, size: int
) -> None:
    # prepare: acc.add(update.to_partial()) would raise ShapeMismatch here
    checked = received(_update(codec)).check(SPEC)
    acc = _filled_accumulator(size)
    before = _state(acc)

    # act / assert
    with pytest.raises(ShapeMismatch):
        checked.add_to(acc)
    assert _state(acc) == before


def test_update_check_returns_a_checked_update_for_the_spec() -> None:
    # act
    checked = received(_update(Float32Codec())).check(SPEC)

    # assert
    assert isinstance(checked, CheckedUpdate)
    assert checked.spec == SPEC
    assert len(checked.tensors) == len(SPEC.tensors)
