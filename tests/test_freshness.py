"""Freshness (tern.freshness, tern.feed): models and schedules ordered by (run, version)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from nacl.signing import SigningKey

from tern.codecs import CodecName
from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.feed import CoordinatorFeed
from tern.fleet import COORDINATOR, Fleet, GatewayEntry
from tern.freshness import Order, Stamp, Watermarks, compare
from tern.messages import GlobalModel, RoundSchedule
from tern.spec import ModelSpec

SPEC = ModelSpec.of({"w": (2, 2)})
KEY = SigningKey(bytes(range(32)))
DEV = SigningKey(bytes(range(1, 33)))
FLEET = Fleet("plant-7", KEY.verify_key, {"gw-1": GatewayEntry(DEV.verify_key, COORDINATOR, {})})


def model(run: int, version: int, *, key: SigningKey = KEY) -> bytes:
    body = GlobalModel(SPEC, np.full(SPEC.size, version, np.float32)).to_body()
    return seal(
        Envelope(Kind.MODEL, "plant-7", version + 1, version, COORDINATOR, body, run=run), key
    )


def schedule(run: int, round: int, deadline: float = 100.0) -> bytes:
    s = RoundSchedule(round, round - 1, CodecName.TERNARY, deadline, 1)
    env = Envelope(Kind.SCHEDULE, "plant-7", round, round - 1, COORDINATOR, s.to_body(), run=run)
    return seal(env, KEY)


@pytest.mark.parametrize(
    ("stamp", "mark", "order"),
    [
        (Stamp(5, 3), None, Order.NEWER),
        (Stamp(5, 4), Stamp(5, 3), Order.NEWER),
        (Stamp(5, 3), Stamp(5, 3), Order.SAME),
        (Stamp(5, 2), Stamp(5, 3), Order.OLDER),
        (Stamp(6, 0), Stamp(5, 30), Order.NEWER),  # a new run, versions from 0 again
        (Stamp(4, 99), Stamp(5, 0), Order.OLDER),  # an old run's model, never again
        (Stamp(5, 3, 20.0), Stamp(5, 3, 10.0), Order.NEWER),  # a round opened again
    ],
)
def test_stamps_order_by_run_then_version_then_deadline(
    stamp: Stamp, mark: Stamp | None, order: Order
) -> None:
    assert compare(stamp, mark) is order


def test_a_feed_takes_newer_models_and_moves_its_mark() -> None:
    feed = CoordinatorFeed(FLEET)

    first = feed.take_model(model(5, 0))
    second = feed.take_model(model(5, 1))

    assert (first.order, second.order) == (Order.NEWER, Order.NEWER)
    assert feed.marks.model == Stamp(5, 1)


def test_a_replayed_older_model_is_refused_as_stale_and_counted() -> None:
    feed = CoordinatorFeed(FLEET)
    old = model(5, 0)
    feed.take_model(old)
    feed.take_model(model(5, 15))

    with pytest.raises(TernError) as info:
        feed.take_model(old)

    assert info.value.reason == "stale"
    assert feed.rejected == {"model_stale": 1}
    assert feed.marks.model == Stamp(5, 15)


def test_the_model_held_again_is_the_same_not_a_refusal() -> None:
    feed = CoordinatorFeed(FLEET)
    feed.take_model(model(5, 3))

    again = feed.take_model(model(5, 3))

    assert again.order is Order.SAME and not feed.rejected


def test_a_new_run_is_taken_at_once_and_the_old_run_never_again() -> None:
    feed = CoordinatorFeed(FLEET)
    feed.take_model(model(5, 30))

    taken = feed.take_model(model(6, 0))

    assert taken.order is Order.NEWER
    with pytest.raises(TernError):
        feed.take_model(model(5, 31))


def test_schedules_order_by_run_round_and_deadline() -> None:
    feed = CoordinatorFeed(FLEET)
    feed.take_schedule(schedule(5, 4))

    reopened = feed.take_schedule(schedule(5, 4, deadline=200.0))

    assert reopened.order is Order.NEWER
    with pytest.raises(TernError) as info:
        feed.take_schedule(schedule(5, 3))
    assert info.value.reason == "stale"
    assert feed.rejected == {"schedule_stale": 1}


def test_a_forged_model_is_counted_by_its_reason() -> None:
    feed = CoordinatorFeed(FLEET)

    with pytest.raises(TernError):
        feed.take_model(model(5, 1, key=DEV))

    assert feed.rejected == {"model_bad_signature": 1}
    assert feed.marks.model is None


def test_marks_survive_a_round_trip_through_json_and_refuse_garbage() -> None:
    marks = Watermarks(Stamp(2**64 - 1, 3), Stamp(5, 4, 1.5))

    assert Watermarks.from_json(marks.to_json()) == marks
    for text in ("[]", '{"model": [1, 2], "schedule": null}', "{" * 5000, '{"model": null}'):
        with pytest.raises(TernError):
            Watermarks.from_json(text)


def test_a_feed_resumed_from_marks_refuses_what_it_refused_before_the_restart() -> None:
    first = CoordinatorFeed(FLEET)
    first.take_model(model(5, 15))

    resumed = CoordinatorFeed(FLEET, Watermarks.from_json(first.marks.to_json()))

    with pytest.raises(TernError):
        resumed.take_model(model(5, 0))
    assert resumed.take_model(model(5, 15)).order is Order.SAME


def test_a_schedule_whose_body_disagrees_with_its_envelope_is_refused() -> None:
    s = RoundSchedule(4, 3, CodecName.TERNARY, 100.0, 1)
    env = Envelope(Kind.SCHEDULE, "plant-7", 9, 3, COORDINATOR, s.to_body(), run=5)
    feed = CoordinatorFeed(FLEET)

    with pytest.raises(TernError) as info:
        feed.take_schedule(seal(replace(env), KEY))

    assert info.value.reason == "malformed"
