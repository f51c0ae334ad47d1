"""JSON status, metrics and telemetry payloads (tern.reports)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.errors import MalformedMessage, PayloadTooLarge, TernError
from tern.reports import MAX_STATUS_BYTES, RoundMetrics, State, Status, Telemetry


def test_status_round_trips_and_serves_as_last_will() -> None:
    will = Status("gw-1", "gateway", State.OFFLINE, "0.1.0", "connection lost")

    assert Status.from_json(will.to_json()) == will
    assert json.loads(will.to_json())["state"] == "offline"


def test_metrics_round_trip_with_rejections_and_failures_by_reason() -> None:
    m = RoundMetrics(
        "coordinator", 3, 3, 5, 1, {"bad_signature": 2, "non_finite": 1}, 10, 20, 0.8, 0.5, 1.2,
        failed={"kernel_unsigned": 1},
    )  # fmt: skip

    assert RoundMetrics.from_json(m.to_json()) == m


def test_metrics_accept_missing_optional_fields() -> None:
    data = b'{"component":"gw-1","round":1,"model_version":1,"contributors":2,"dropped":0}'

    m = RoundMetrics.from_json(data)

    assert m.accuracy is None and m.rejected == {} and m.failed == {}


@pytest.mark.parametrize(
    "data",
    [
        b'{"component":"c","round":-1,"model_version":1,"contributors":2,"dropped":0}',
        b'{"component":"c","round":true,"model_version":1,"contributors":2,"dropped":0}',
        b'{"component":"c","round":1,"model_version":1,"contributors":2,"dropped":0,"x":1}',
        b'{"component":"c","round":1,"model_version":1,"contributors":2,"dropped":0,"accuracy":"hi"}',
        b'{"component":"c","round":1,"model_version":1,"contributors":2,"dropped":0,"accuracy":NaN}',
        b'{"component":"c","round":1,"model_version":1,"contributors":2,"dropped":0,"rejected":[1]}',
        b'{"component":"c","round":1,"model_version":1,"contributors":2}',
        b"[1, 2]",
        b"\xff\xfe",
    ],
)
def test_metrics_reject_wrong_fields_and_non_json(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        RoundMetrics.from_json(data)


def test_telemetry_round_trips_and_rejects_confidence_outside_unit_interval() -> None:
    t = Telemetry("esp-4", 12, 881, 3, 0.93, 5120)
    bad = t.to_json().replace(b"0.93", b"1.5")

    assert Telemetry.from_json(t.to_json()) == t
    with pytest.raises(MalformedMessage):
        Telemetry.from_json(bad)


def test_oversize_json_is_rejected_before_parsing() -> None:
    with pytest.raises(PayloadTooLarge):
        Status.from_json(b" " * (MAX_STATUS_BYTES + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_json_decoders_raise_only_tern_errors_on_random_bytes(data: bytes) -> None:
    for decode in (Status.from_json, RoundMetrics.from_json, Telemetry.from_json):
        with contextlib.suppress(TernError):
            decode(data)
