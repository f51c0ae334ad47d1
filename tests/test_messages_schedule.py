"""RoundSchedule bodies: canonical CBOR round trips, and every malformed body refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.codecs import CodecName
from tern.errors import MalformedMessage, NonFiniteValue, TernError, UnknownCodec
from tern.messages import Bounds, KernelRef, Policy, RoundSchedule, StrategySpec, TrainConfig
from tests.message_helpers import canonical_cbor, tensor_names, via_cbor, without_key

# == RoundSchedule ==================================================================

u32 = st.integers(min_value=0, max_value=2**32 - 1)
schedules = st.builds(
    RoundSchedule,
    round=u32,
    model_version=u32,
    codec=st.sampled_from([c for c in CodecName if c is not CodecName.SPARSE]),  # no density
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
    # the policy's own properties are in tests/test_policy.py
    policy=st.sampled_from(
        [
            Policy(),
            Policy(cohort="median"),
            Policy(strategy=StrategySpec.of("fedadam", lr=0.1)),
            Policy(strategy=StrategySpec.of("fedavg", momentum=0.9)),
        ]
    ),
)


@settings(max_examples=100, deadline=None)
@given(schedule=schedules)
def test_round_schedule_roundtrips_through_canonical_cbor(schedule: RoundSchedule) -> None:
    # act
    got = RoundSchedule.from_body(via_cbor(schedule.to_body()))

    # assert
    assert got == schedule
    assert isinstance(got.codec, CodecName)
    assert canonical_cbor(got.to_body()) == canonical_cbor(schedule.to_body())


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


def _train(**override: object) -> dict[str, object]:
    return {"epochs": 1, "batch_size": 32, "lr": 0.05, **override}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        *[
            pytest.param(without_key(_schedule_body(), k), MalformedMessage, id=f"missing-{k}")
            for k in _schedule_body()
        ],
        pytest.param(_schedule_body(extra=1), MalformedMessage, id="extra-key"),
        pytest.param(_schedule_body(policy=None), MalformedMessage, id="null-policy"),
        pytest.param(
            _schedule_body(policy={"cohort": "sum", "top": "sum"}),
            MalformedMessage,
            id="policy-without-strategy",
        ),
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
            _schedule_body(train=without_key(_train(), "lr")), MalformedMessage, id="train-no-lr"
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
        RoundSchedule.from_body(via_cbor(body))


def test_round_schedule_accepts_null_participants_as_everyone() -> None:
    # act
    got = RoundSchedule.from_body(via_cbor(_schedule_body(participants=None)))

    # assert
    assert got.participants is None
