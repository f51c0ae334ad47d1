"""Message bodies (GlobalModel, RoundSchedule, Update) and encode_update's error feedback."""

from __future__ import annotations

import math
from typing import Any

import cbor2
import numpy as np
import pytest
from cbor2 import CBORTag
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from nacl.signing import SigningKey

from tern.aggregate import Accumulator, Partial
from tern.codecs import Codec, CodecName, Float16Codec, Float32Codec, TernaryCodec
from tern.envelope import Envelope, Kind, seal
from tern.errors import (
    BadSignature,
    InvalidTrits,
    MalformedMessage,
    NonFiniteValue,
    ShapeMismatch,
    TernError,
    UnexpectedMessage,
    UnknownCodec,
)
from tern.fleet import COORDINATOR, DEFAULT_MAX_PARAMS, Fleet
from tern.messages import (
    Bounds,
    CheckedUpdate,
    GlobalModel,
    KernelRef,
    RoundSchedule,
    TrainConfig,
    Update,
    encode_update,
    open_model,
    open_schedule,
)
from tern.quantize import TernaryRule
from tern.spec import ModelSpec
from tern.tensors import TypedArrayTag, encode_array
from tests.helpers import all_codecs, make_rng

SPEC = ModelSpec.of({"conv": (2, 3, 2), "dense": (4, 5), "bias": (7,)})  # 12 + 20 + 7


def _cbor(value: object) -> Any:
    """What a receiver decodes: canonical CBOR out, CBOR in."""
    return cbor2.loads(cbor2.dumps(value, canonical=True))


def _canonical(value: object) -> bytes:
    return cbor2.dumps(value, canonical=True)


def _partial(seed: int = 0, spec: ModelSpec = SPEC, weight: float = 3.0) -> Partial:
    values = (make_rng(seed).standard_normal(spec.size) * weight).astype(np.float32)
    return Partial(values, weight, 3)


def _update(codec: Codec, seed: int = 0, spec: ModelSpec = SPEC) -> Update:
    return encode_update(codec, spec, _partial(seed, spec))[0]


def _received(update: Update) -> Update:
    return Update.from_body(_cbor(update.to_body()))


def _filled_accumulator(size: int = SPEC.size) -> Accumulator:
    acc = Accumulator(size)
    acc.add(Partial(make_rng(99).standard_normal(size).astype(np.float32), 5.0, 4))
    return acc


def _state(acc: Accumulator) -> tuple[bytes, float, int]:
    return acc.sum.tobytes(), acc.total_weight, acc.count


# == GlobalModel ====================================================================

tensor_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789", min_size=1, max_size=12)
# 0-d tensors have their own test below (test_global_model_roundtrips_a_scalar_tensor).
tensor_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5)
specs = st.dictionaries(tensor_names, tensor_shapes, min_size=1, max_size=4).map(ModelSpec.of)


@st.composite
def global_models(draw: st.DrawFn) -> GlobalModel:
    spec = draw(specs)
    weights = draw(
        hnp.arrays(
            np.float32,
            (spec.size,),
            elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
        )
    )
    return GlobalModel(spec, weights)


@settings(max_examples=80, deadline=None)
@given(model=global_models())
def test_global_model_roundtrips_through_canonical_cbor(model: GlobalModel) -> None:
    # act
    got = GlobalModel.from_body(_cbor(model.to_body()))

    # assert
    assert got.spec == model.spec
    assert got.weights.dtype == np.float32
    assert got.weights.tobytes() == model.weights.tobytes()
    assert _canonical(got.to_body()) == _canonical(model.to_body())


def test_global_model_roundtrips_a_scalar_tensor() -> None:
    # prepare: a 0-d tensor (shape []) is a valid spec entry, e.g. a learned temperature
    spec = ModelSpec.of({"w": (3,), "temperature": ()})
    model = GlobalModel(spec, np.array([1.0, 2.0, 3.0, 0.5], dtype=np.float32))

    # act
    got = GlobalModel.from_body(_cbor(model.to_body()))

    # assert
    assert got.weights.tobytes() == model.weights.tobytes()


def test_global_model_body_is_spec_then_one_typed_array_per_tensor() -> None:
    # prepare
    spec = ModelSpec.of({"a": (2,), "b": (1, 2)})
    model = GlobalModel(spec, np.array([1, 2, 3, 4], dtype=np.float32))

    # act
    body = model.to_body()

    # assert
    assert body == {
        "spec": [["a", [2]], ["b", [1, 2]]],
        "weights": [
            CBORTag(40, [[2], CBORTag(85, np.array([1, 2], "<f4").tobytes())]),
            CBORTag(40, [[1, 2], CBORTag(85, np.array([3, 4], "<f4").tobytes())]),
        ],
    }


@pytest.mark.parametrize(
    "weights",
    [
        np.zeros(SPEC.size, dtype=np.float64),
        np.zeros(SPEC.size + 1, dtype=np.float32),
        np.zeros((SPEC.size, 1), dtype=np.float32),
    ],
    ids=["float64", "too-long", "2d"],
)
def test_global_model_rejects_weights_unlike_the_spec(weights: np.ndarray) -> None:
    # act / assert
    with pytest.raises(ShapeMismatch):
        GlobalModel(SPEC, weights)


def _model_body() -> dict[str, Any]:
    return GlobalModel(SPEC, np.arange(SPEC.size, dtype=np.float32)).to_body()


def _replace_weight(index: int, wire: object) -> dict[str, Any]:
    body = _model_body()
    body["weights"][index] = wire
    return body


@pytest.mark.parametrize(
    ("body", "error"),
    [
        pytest.param([], MalformedMessage, id="array"),
        pytest.param(None, MalformedMessage, id="null"),
        pytest.param({"spec": SPEC.to_cbor()}, MalformedMessage, id="missing-weights"),
        pytest.param({"weights": []}, MalformedMessage, id="missing-spec"),
        pytest.param({**_model_body(), "round": 1}, MalformedMessage, id="extra-key"),
        pytest.param({**_model_body(), "spec": []}, MalformedMessage, id="empty-spec"),
        pytest.param({**_model_body(), "spec": [["a"]]}, MalformedMessage, id="bad-spec-entry"),
        pytest.param(
            {**_model_body(), "spec": [["a", [1]], ["a", [1]]]}, ShapeMismatch, id="repeated-name"
        ),
        pytest.param(
            {**_model_body(), "weights": _model_body()["weights"][:2]},
            ShapeMismatch,
            id="too-few-weights",
        ),
        pytest.param(
            {**_model_body(), "weights": [*_model_body()["weights"], _model_body()["weights"][0]]},
            ShapeMismatch,
            id="too-many-weights",
        ),
        pytest.param({**_model_body(), "weights": {}}, ShapeMismatch, id="weights-map"),
        pytest.param(
            _replace_weight(2, encode_array(np.zeros(6, np.float32), TypedArrayTag.FLOAT32_LE)),
            ShapeMismatch,
            id="last-weight-wrong-shape",
        ),
        pytest.param(
            _replace_weight(
                2,
                encode_array(
                    np.array([0, 1, 2, np.nan, 4, 5, 6], np.float32), TypedArrayTag.FLOAT32_LE
                ),
            ),
            NonFiniteValue,
            id="nan-weight",
        ),
        pytest.param(
            _replace_weight(
                0, encode_array(np.zeros((2, 3, 2), np.float16), TypedArrayTag.FLOAT16_LE)
            ),
            MalformedMessage,
            id="float16-weights",
        ),
    ],
)
def test_global_model_from_body_rejects_malformed_body(
    body: object, error: type[TernError]
) -> None:
    # act / assert
    with pytest.raises(error):
        GlobalModel.from_body(_cbor(body))


# == RoundSchedule ==================================================================

u32 = st.integers(min_value=0, max_value=2**32 - 1)
schedules = st.builds(
    RoundSchedule,
    round=u32,
    model_version=u32,
    codec=st.sampled_from(list(CodecName)),
    deadline=st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    min_contributors=u32,
    participants=st.none() | st.lists(tensor_names, max_size=5, unique=True).map(tuple),
    seed=u32,
    train=st.builds(
        TrainConfig,
        epochs=st.integers(min_value=1, max_value=2**32 - 1),
        batch_size=st.integers(min_value=1, max_value=2**32 - 1),
        lr=st.floats(min_value=1e-12, max_value=1e6),
    ),
    kernel=st.none()
    | st.builds(
        KernelRef,
        sha256=st.binary(min_size=32, max_size=32).map(bytes.hex),
        abi=st.integers(min_value=1, max_value=2**32 - 1),
        fuel=st.integers(min_value=1, max_value=2**63 - 1),
        memory=st.integers(min_value=1, max_value=2**63 - 1),
    ),
    bounds=st.builds(
        Bounds,
        max_weight=st.floats(min_value=1.0, max_value=1e300),
        max_norm=st.floats(min_value=1e-300, max_value=1e300),
    ),
)


@settings(max_examples=100, deadline=None)
@given(schedule=schedules)
def test_round_schedule_roundtrips_through_canonical_cbor(schedule: RoundSchedule) -> None:
    # act
    got = RoundSchedule.from_body(_cbor(schedule.to_body()))

    # assert
    assert got == schedule
    assert isinstance(got.codec, CodecName)
    assert _canonical(got.to_body()) == _canonical(schedule.to_body())


def _schedule_body(**override: object) -> dict[str, object]:
    body = RoundSchedule(
        round=12,
        model_version=11,
        codec=CodecName.TERNARY,
        deadline=1_700_000_000.5,
        min_contributors=2,
        participants=("dev-01", "dev-03"),
        seed=7,
    ).to_body()
    body.update(override)
    return body


def _without(body: dict[str, object], key: str) -> dict[str, object]:
    return {k: v for k, v in body.items() if k != key}


def _train(**override: object) -> dict[str, object]:
    return {"epochs": 1, "batch_size": 32, "lr": 0.05, **override}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        *[
            pytest.param(_without(_schedule_body(), k), MalformedMessage, id=f"missing-{k}")
            for k in _schedule_body()
        ],
        pytest.param(_schedule_body(extra=1), MalformedMessage, id="extra-key"),
        pytest.param(_schedule_body(round=True), MalformedMessage, id="bool-round"),
        pytest.param(_schedule_body(model=False), MalformedMessage, id="bool-model"),
        pytest.param(_schedule_body(seed=True), MalformedMessage, id="bool-seed"),
        pytest.param(
            _schedule_body(min_contributors=True), MalformedMessage, id="bool-min-contributors"
        ),
        pytest.param(_schedule_body(round=-1), MalformedMessage, id="negative-round"),
        pytest.param(_schedule_body(round=2**32), MalformedMessage, id="round-too-large"),
        pytest.param(_schedule_body(round=1.0), MalformedMessage, id="float-round"),
        pytest.param(_schedule_body(seed="7"), MalformedMessage, id="string-seed"),
        pytest.param(_schedule_body(codec="int4"), UnknownCodec, id="unknown-codec"),
        pytest.param(_schedule_body(codec=1), UnknownCodec, id="int-codec"),
        pytest.param(_schedule_body(deadline=float("nan")), NonFiniteValue, id="nan-deadline"),
        pytest.param(_schedule_body(deadline=float("inf")), NonFiniteValue, id="inf-deadline"),
        pytest.param(_schedule_body(deadline=-1.0), MalformedMessage, id="negative-deadline"),
        pytest.param(_schedule_body(deadline=True), MalformedMessage, id="bool-deadline"),
        pytest.param(_schedule_body(deadline="soon"), MalformedMessage, id="string-deadline"),
        pytest.param(_schedule_body(participants="dev-01"), MalformedMessage, id="string-ids"),
        pytest.param(_schedule_body(participants=["dev-01", 3]), MalformedMessage, id="int-id"),
        pytest.param(_schedule_body(participants={}), MalformedMessage, id="map-ids"),
        pytest.param(
            _schedule_body(participants=["dev-01", "dev-01"]), MalformedMessage, id="repeated-id"
        ),
        pytest.param(_schedule_body(bounds=None), MalformedMessage, id="null-bounds"),
        pytest.param(
            _schedule_body(bounds={"max_weight": 0.5, "max_norm": 1.0}),
            MalformedMessage,
            id="max-weight-below-one",
        ),
        pytest.param(
            _schedule_body(bounds={"max_weight": 10.0, "max_norm": 0.0}),
            MalformedMessage,
            id="max-norm-zero",
        ),
        pytest.param(
            _schedule_body(bounds={"max_weight": 10.0, "max_norm": float("inf")}),
            NonFiniteValue,
            id="max-norm-inf",
        ),
        pytest.param(
            _schedule_body(bounds={"max_weight": 10.0}), MalformedMessage, id="bounds-missing"
        ),
        pytest.param(_schedule_body(train=[]), MalformedMessage, id="train-array"),
        pytest.param(_schedule_body(train=_train(extra=1)), MalformedMessage, id="train-extra"),
        pytest.param(
            _schedule_body(train=_without(_train(), "lr")), MalformedMessage, id="train-no-lr"
        ),
        pytest.param(_schedule_body(train=_train(epochs=0)), MalformedMessage, id="epochs-0"),
        pytest.param(
            _schedule_body(train=_train(batch_size=True)), MalformedMessage, id="bool-batch"
        ),
        pytest.param(_schedule_body(train=_train(lr=0.0)), MalformedMessage, id="lr-0"),
        pytest.param(_schedule_body(train=_train(lr=-0.1)), MalformedMessage, id="lr-negative"),
        pytest.param(_schedule_body(train=_train(lr=float("nan"))), NonFiniteValue, id="lr-nan"),
    ],
)
def test_round_schedule_from_body_rejects_malformed_body(
    body: object, error: type[TernError]
) -> None:
    # act / assert
    with pytest.raises(error):
        RoundSchedule.from_body(_cbor(body))


def test_round_schedule_accepts_null_participants_as_everyone() -> None:
    # act
    got = RoundSchedule.from_body(_cbor(_schedule_body(participants=None)))

    # assert
    assert got.participants is None


# == Update: body ===================================================================


@pytest.mark.parametrize("codec", all_codecs())
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1), weight=st.floats(0.01, 1e4))
def test_update_roundtrips_through_canonical_cbor(codec: Codec, seed: int, weight: float) -> None:
    # prepare
    update = encode_update(codec, SPEC, _partial(seed, weight=weight))[0]

    # act
    got = _received(update)

    # assert
    assert got.codec == update.codec == codec.name
    assert got.weight == update.weight == weight
    assert got.count == update.count
    assert _canonical(got.to_body()) == _canonical(update.to_body())


def _update_body(**override: object) -> dict[str, object]:
    body = _update(Float32Codec()).to_body()
    body.update(override)
    return body


@pytest.mark.parametrize(
    ("body", "error"),
    [
        *[
            pytest.param(_without(_update_body(), k), MalformedMessage, id=f"missing-{k}")
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
        Update.from_body(_cbor(body))


def test_update_from_body_accepts_an_integer_weight() -> None:
    # act
    got = Update.from_body(_cbor(_update_body(weight=3)))

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
    bad = _received(Update(update.codec, update.weight, update.count, tensors))

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
    update = _received(Update(good.codec, good.weight, good.count, tensors))
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
    checked = _received(_update(codec, seed)).check(SPEC)
    direct, via_partial = _filled_accumulator(), _filled_accumulator()

    # act
    checked.add_to(direct)
    via_partial.add(checked.to_partial())

    # assert
    assert _state(direct) == _state(via_partial)


@pytest.mark.parametrize("codec", all_codecs())
def test_checked_update_to_partial_carries_weight_count_and_decoded_values(codec: Codec) -> None:
    # prepare
    partial = _partial(5)
    update, residual = encode_update(codec, SPEC, partial)
    sent = partial.weighted_sum - residual * np.float32(partial.total_weight)

    # act
    got = _received(update).check(SPEC).to_partial()

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
    checked = _received(_update(codec)).check(SPEC)
    acc = _filled_accumulator(size)
    before = _state(acc)

    # act / assert
    with pytest.raises(ShapeMismatch):
        checked.add_to(acc)
    assert _state(acc) == before


def test_update_check_returns_a_checked_update_for_the_spec() -> None:
    # act
    checked = _received(_update(Float32Codec())).check(SPEC)

    # assert
    assert isinstance(checked, CheckedUpdate)
    assert checked.spec == SPEC
    assert len(checked.tensors) == len(SPEC.tensors)


# == encode_update ==================================================================


def test_encode_update_with_float32_is_lossless_and_leaves_no_residual() -> None:
    # prepare
    partial = _partial(8)

    # act
    update, residual = encode_update(Float32Codec(), SPEC, partial)

    # assert
    assert not residual.any()
    got = _received(update).check(SPEC).to_partial()
    assert got.weighted_sum.tobytes() == partial.weighted_sum.tobytes()


@pytest.mark.parametrize(
    "partial",
    [
        Partial(np.ones(SPEC.size, dtype=np.float32), 0.0, 1),
        Partial(np.ones(SPEC.size, dtype=np.float32), -1.0, 1),
        Partial(np.ones(SPEC.size, dtype=np.float32), 1.0, 0),
    ],
    ids=["zero-weight", "negative-weight", "no-contributors"],
)
def test_encode_update_rejects_an_empty_partial(partial: Partial) -> None:
    # act / assert
    with pytest.raises(ValueError, match="positive weight"):
        encode_update(Float32Codec(), SPEC, partial)


def test_encode_update_rejects_a_residual_of_another_shape() -> None:
    # act / assert
    with pytest.raises(ShapeMismatch):
        encode_update(Float32Codec(), SPEC, _partial(), np.zeros(SPEC.size + 1, np.float32))


@pytest.mark.parametrize("size", [SPEC.size - 1, SPEC.size + 2], ids=["shorter", "longer"])
def test_encode_update_rejects_a_partial_unlike_the_spec(size: int) -> None:
    # prepare
    partial = Partial(np.ones(size, dtype=np.float32), 1.0, 1)

    # act / assert
    with pytest.raises(ShapeMismatch):
        encode_update(TernaryCodec(rule=TernaryRule.OPTIMAL), SPEC, partial)


# -- error feedback ------------------------------------------------------------------

ROUNDS = 300
WEIGHT = 3.0


def _send(
    codec: Codec, partial: Partial, residual: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """What the receiver adds for this partial (through the wire), and the new residual."""
    update, new_residual = encode_update(codec, SPEC, partial, residual)
    sent = _received(update).check(SPEC).to_partial().weighted_sum
    return sent.astype(np.float64), new_residual


def _contraction_bound(targets: list[np.ndarray]) -> float:
    """Error-feedback bound for a compressor with ||x - C(x)||^2 <= (1 - 1/n)||x||^2.

    Per tensor: e_r <= q (g_r + e_{r-1}), so e <= q / (1 - q) * max_r ||g_r||, q = sqrt(1 - 1/n).
    """
    total = 0.0
    for t, o in zip(SPEC.tensors, SPEC.offsets, strict=True):
        q = math.sqrt(1 - 1 / t.size)
        g = max(float(np.linalg.norm(x[o : o + t.size])) for x in targets)
        total += (q / (1 - q) * g) ** 2
    return math.sqrt(total)


def _error_feedbackall_codecs() -> list[Any]:
    return [
        pytest.param(Float16Codec(), id="float16"),
        *[
            pytest.param(TernaryCodec(rule=r, rng=make_rng(11)), id=f"ternary-{r}")
            for r in TernaryRule
        ],
    ]


@pytest.mark.parametrize("codec", _error_feedbackall_codecs())
def test_error_feedback_sent_plus_final_residual_equals_the_sum_of_targets(codec: Codec) -> None:
    # prepare
    rng = make_rng(21)
    targets = [(rng.standard_normal(SPEC.size) * WEIGHT).astype(np.float32) for _ in range(ROUNDS)]
    residual = np.zeros(SPEC.size, dtype=np.float32)
    total_sent = np.zeros(SPEC.size, dtype=np.float64)

    # act
    for target in targets:
        sent, residual = _send(codec, Partial(target, WEIGHT, 3), residual)
        total_sent += sent

    # assert: sum sent = sum targets - final residual * weight (telescoping)
    total_target = np.sum(np.array(targets, dtype=np.float64), axis=0)
    recovered = total_sent + residual.astype(np.float64) * WEIGHT
    np.testing.assert_allclose(recovered, total_target, atol=1e-6 * ROUNDS * WEIGHT * 10)


@pytest.mark.parametrize("rule", [TernaryRule.OPTIMAL, TernaryRule.MAX_ROUND])
def test_error_feedback_residual_stays_within_the_contraction_bound(rule: TernaryRule) -> None:
    # prepare
    codec = TernaryCodec(rule=rule)
    rng = make_rng(22)
    targets = [(rng.standard_normal(SPEC.size) * WEIGHT).astype(np.float32) for _ in range(ROUNDS)]
    bound = _contraction_bound(targets)
    residual = np.zeros(SPEC.size, dtype=np.float32)
    largest = 0.0

    # act
    for target in targets:
        _, residual = _send(codec, Partial(target, WEIGHT, 3), residual)
        largest = max(largest, float(np.linalg.norm(residual.astype(np.float64) * WEIGHT)))

    # assert
    assert largest <= bound


@pytest.mark.parametrize("rule", [TernaryRule.OPTIMAL, TernaryRule.MAX_ROUND])
def test_without_error_feedback_the_tracking_error_grows(rule: TernaryRule) -> None:
    # prepare: the same delta every round, so quantization error adds up coherently
    codec = TernaryCodec(rule=rule)
    target = (make_rng(23).standard_normal(SPEC.size) * WEIGHT).astype(np.float32)
    bound = _contraction_bound([target])
    with_feedback = np.zeros(SPEC.size, dtype=np.float64)
    without_feedback = np.zeros(SPEC.size, dtype=np.float64)
    residual = np.zeros(SPEC.size, dtype=np.float32)

    # act
    for _ in range(ROUNDS):
        sent, residual = _send(codec, Partial(target, WEIGHT, 3), residual)
        with_feedback += sent
        sent_plain, _ = _send(codec, Partial(target, WEIGHT, 3), None)
        without_feedback += sent_plain

    # assert
    expected = target.astype(np.float64) * ROUNDS
    gap_with = float(np.linalg.norm(expected - with_feedback))
    gap_without = float(np.linalg.norm(expected - without_feedback))
    one_round = float(np.linalg.norm(target - _send(codec, Partial(target, WEIGHT, 3), None)[0]))
    assert gap_with <= bound
    assert gap_without == pytest.approx(ROUNDS * one_round, rel=1e-4)
    assert gap_without > bound
    assert gap_without > 10 * gap_with


def test_error_feedback_residual_is_per_unit_weight() -> None:
    # prepare: a residual of r per unit weight is worth r * w in the next target
    codec = Float32Codec()  # lossless: sent is exactly the target
    partial = Partial(np.zeros(SPEC.size, dtype=np.float32), 4.0, 2)
    residual = np.full(SPEC.size, 0.25, dtype=np.float32)

    # act
    sent, new_residual = _send(codec, partial, residual)

    # assert
    np.testing.assert_array_equal(sent, np.full(SPEC.size, 1.0))
    assert not new_residual.any()


def _fleet(key: SigningKey, max_params: int = DEFAULT_MAX_PARAMS) -> Fleet:
    return Fleet("f", key.verify_key, {}, max_params=max_params)


def test_open_model_and_schedule_return_the_coordinators_messages() -> None:
    key = SigningKey(bytes(range(32)))
    weights = np.arange(SPEC.size, dtype=np.float32)
    schedule = RoundSchedule(3, 2, CodecName.TERNARY, 1e9, 1)
    model_bytes = seal(
        Envelope(Kind.MODEL, "f", 3, 2, COORDINATOR, GlobalModel(SPEC, weights).to_body()), key
    )
    schedule_bytes = seal(Envelope(Kind.SCHEDULE, "f", 3, 2, COORDINATOR, schedule.to_body()), key)

    env, model = open_model(model_bytes, _fleet(key))
    _, opened = open_schedule(schedule_bytes, _fleet(key))

    assert env.model_version == 2 and model.weights.tobytes() == weights.tobytes()
    assert opened == schedule


def test_open_model_refuses_another_signer_another_fleet_and_a_schedule() -> None:
    key, other = SigningKey(bytes(range(32))), SigningKey(bytes(32))
    body = GlobalModel(SPEC, np.zeros(SPEC.size, dtype=np.float32)).to_body()
    forged = seal(Envelope(Kind.MODEL, "f", 1, 1, COORDINATOR, body), other)
    schedule = seal(
        Envelope(
            Kind.SCHEDULE,
            "f",
            1,
            1,
            COORDINATOR,
            RoundSchedule(1, 1, CodecName.FLOAT32, 1e9, 1).to_body(),
        ),
        key,
    )

    with pytest.raises(BadSignature):
        open_model(forged, _fleet(key))
    with pytest.raises(UnexpectedMessage, match="fleet"):
        open_model(seal(Envelope(Kind.MODEL, "g", 1, 1, COORDINATOR, body), key), _fleet(key))
    with pytest.raises(UnexpectedMessage) as info:
        open_model(schedule, _fleet(key))
    assert info.value.reason == "wrong_kind"


def test_open_model_refuses_a_model_larger_than_the_fleet_allows() -> None:
    key = SigningKey(bytes(range(32)))
    small = GlobalModel(SPEC, np.zeros(SPEC.size, dtype=np.float32)).to_body()
    big_spec = ModelSpec.of({"w": (300, 100)})
    big = GlobalModel(big_spec, np.zeros(big_spec.size, dtype=np.float32)).to_body()
    fleet = _fleet(key, max_params=SPEC.size - 1)

    with pytest.raises(TernError) as over_spec:
        open_model(seal(Envelope(Kind.MODEL, "f", 1, 1, COORDINATOR, small), key), fleet)
    with pytest.raises(TernError) as over_cap:
        open_model(seal(Envelope(Kind.MODEL, "f", 1, 1, COORDINATOR, big), key), fleet)

    assert over_spec.value.reason == "wrong_shape"  # within the byte cap, refused at its spec
    assert over_cap.value.reason == "oversize"  # refused before a byte is decoded


def test_open_schedule_refuses_a_body_for_another_round_than_its_envelope() -> None:
    key = SigningKey(bytes(range(32)))
    body = RoundSchedule(3, 2, CodecName.TERNARY, 1e9, 1).to_body()
    data = seal(Envelope(Kind.SCHEDULE, "f", 4, 2, COORDINATOR, body), key)

    with pytest.raises(MalformedMessage):
        open_schedule(data, _fleet(key))
