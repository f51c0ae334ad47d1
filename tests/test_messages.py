"""GlobalModel bodies, and open_model / open_schedule on sealed messages.

RoundSchedule is in test_messages_schedule.py, Update in test_messages_update.py, and
encode_update with its error feedback in test_messages_encode.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from cbor2 import CBORTag
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from nacl.signing import SigningKey

from tern.codecs import CodecName
from tern.envelope import Envelope, Kind, seal
from tern.errors import (
    BadSignature,
    MalformedMessage,
    NonFiniteValue,
    ShapeMismatch,
    TernError,
    UnexpectedMessage,
)
from tern.fleet import COORDINATOR, DEFAULT_MAX_PARAMS, Fleet
from tern.messages import GlobalModel, RoundSchedule, open_model, open_schedule
from tern.spec import ModelSpec
from tern.tensors import TypedArrayTag, encode_array
from tests.message_helpers import SPEC, canonical_cbor, tensor_names, via_cbor

# == GlobalModel ====================================================================

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
    got = GlobalModel.from_body(via_cbor(model.to_body()))

    # assert
    assert got.spec == model.spec
    assert got.weights.dtype == np.float32
    assert got.weights.tobytes() == model.weights.tobytes()
    assert canonical_cbor(got.to_body()) == canonical_cbor(model.to_body())


def test_global_model_roundtrips_a_scalar_tensor() -> None:
    # prepare: a 0-d tensor (shape []) is a valid spec entry, e.g. a learned temperature
    spec = ModelSpec.of({"w": (3,), "temperature": ()})
    model = GlobalModel(spec, np.array([1.0, 2.0, 3.0, 0.5], dtype=np.float32))

    # act
    got = GlobalModel.from_body(via_cbor(model.to_body()))

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
        GlobalModel.from_body(via_cbor(body))


# == open_model, open_schedule ======================================================


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
