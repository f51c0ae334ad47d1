"""A round's collection at a receiver (tern.collect.Collector)."""

from __future__ import annotations

import numpy as np
from nacl.signing import SigningKey

from tern.admit import Peer, Role, Terms
from tern.aggregate import Partial, fold_sorted
from tern.codecs import CodecName, Float32Codec, TernaryCodec
from tern.collect import MAX_ATTEMPTS, Collector, Outcome
from tern.envelope import Envelope, Kind, loads_bounded, seal
from tern.messages import Failure, Update, encode_update
from tern.spec import ModelSpec
from tern.topics import update as update_topic

SPEC = ModelSpec.of({"w": (4, 3), "b": (3,)})
FLEET, RUN, ROUND, MODEL = "plant-7", 9, 5, 4
KEYS = {f"dev-{i}": SigningKey(bytes([i]) * 32) for i in range(1, 4)}
PEERS = {d: Peer(d, Role.DEVICE, k.verify_key, 1, 1000.0) for d, k in KEYS.items()}
TERMS = Terms(FLEET, RUN, ROUND, MODEL, CodecName.TERNARY, SPEC, max_norm=100.0)


def topic(device: str) -> str:
    return update_topic(FLEET, "gw-1", device).path


def _update(
    device: str, seed: int, *, round: int = ROUND, fleet: str = FLEET, kind: Kind = Kind.UPDATE
) -> bytes:
    delta = np.random.default_rng(seed).standard_normal(SPEC.size).astype(np.float32)
    update, _ = encode_update(TernaryCodec(), SPEC, Partial(delta * 10, 10.0, 1))
    env = Envelope(kind, fleet, round, MODEL, device, update.to_body(), run=RUN)
    return seal(env, KEYS[device])


def _collector(**kwargs: object) -> Collector:
    return Collector(terms=TERMS, peers=PEERS, **kwargs)  # type: ignore[arg-type]


def test_collector_completes_when_every_expected_sender_reported() -> None:
    c = _collector()

    outcomes = [c.offer(_update(d, i), topic(d)) for i, d in enumerate(sorted(KEYS))]

    assert all(o.outcome is Outcome.ACCEPTED for o in outcomes)
    assert c.complete and not c.missing
    assert c.close().count == 3 and c.close().total_weight == 30.0


def test_collector_result_does_not_depend_on_arrival_order() -> None:
    first, second = _collector(), _collector()
    messages = {d: _update(d, i) for i, d in enumerate(sorted(KEYS))}

    for d in sorted(KEYS):
        first.offer(messages[d], topic(d))
    for d in sorted(KEYS, reverse=True):
        second.offer(messages[d], topic(d))

    assert first.close().weighted_sum.tobytes() == second.close().weighted_sum.tobytes()


def test_collector_result_is_the_sorted_fold_of_the_decoded_updates() -> None:
    c = _collector()
    messages = {d: _update(d, i) for i, d in enumerate(sorted(KEYS))}
    for d, m in messages.items():
        c.offer(m, topic(d))

    expected = fold_sorted(
        (
            (d, Update.from_body(loads_bounded(m, 1 << 20)["body"]).check(SPEC).to_partial())
            for d, m in messages.items()
        ),
        SPEC.size,
    )
    assert c.close().weighted_sum.tobytes() == expected.weighted_sum.tobytes()


def test_collector_counts_each_rejection_by_reason_and_keeps_the_good_ones() -> None:
    c = _collector(max_attempts=20)
    other = SigningKey(bytes([9]) * 32)
    forged = seal(Envelope(Kind.UPDATE, FLEET, ROUND, MODEL, "dev-1", {"x": 1}, run=RUN), other)
    ones = Partial(np.ones(SPEC.size, np.float32), 1.0, 1)
    tern = encode_update(TernaryCodec(), SPEC, ones)[0].to_body()
    tern["tensors"][0]["scale"] = float("nan")
    nan = seal(Envelope(Kind.UPDATE, FLEET, ROUND, MODEL, "dev-2", tern, run=RUN), KEYS["dev-2"])

    c.offer(b"\x00garbage", topic("dev-1"))
    c.offer(forged, topic("dev-1"))
    c.offer(_update("dev-1", 0, round=ROUND - 1), topic("dev-1"))
    c.offer(_update("dev-1", 0, fleet="other"), topic("dev-1"))
    c.offer(nan, topic("dev-2"))
    c.offer(_update("dev-3", 2), topic("dev-1"))  # valid, but on another device's topic
    c.offer(_update("dev-1", 0), topic("dev-1"))
    c.offer(_update("dev-1", 1), topic("dev-1"))  # a second one

    assert dict(c.rejected) == {
        "malformed": 1,
        "bad_signature": 1,
        "stale_round": 1,
        "wrong_fleet": 1,
        "non_finite": 1,
        "wrong_sender": 1,
        "duplicate": 1,
    }
    assert set(c.accepted) == {"dev-1"}
    assert c.missing == {"dev-2", "dev-3"}


def test_a_sender_outside_the_round_is_refused_without_a_signature_check() -> None:
    c = Collector(terms=TERMS, peers={"dev-1": PEERS["dev-1"]})

    offer = c.offer(b"not even cbor", topic("dev-2"))

    assert offer.reason == "unexpected_sender"


def test_a_redelivered_update_is_not_counted_but_another_one_is_a_duplicate() -> None:
    c = _collector()
    data = _update("dev-1", 0)
    c.offer(data, topic("dev-1"))

    again = c.offer(data, topic("dev-1"))
    other = c.offer(_update("dev-1", 1), topic("dev-1"))

    assert again.outcome is Outcome.REDELIVERED
    assert other.reason == "duplicate"
    assert dict(c.rejected) == {"duplicate": 1}


def test_a_redelivered_refused_message_is_counted_once() -> None:
    c = _collector()
    stale = _update("dev-1", 0, round=ROUND - 1)

    c.offer(stale, topic("dev-1"))
    c.offer(stale, topic("dev-1"))

    assert dict(c.rejected) == {"stale_round": 1}


def test_a_flooding_sender_gets_only_a_few_signature_checks_per_round() -> None:
    c = _collector()
    forged = [
        seal(
            Envelope(Kind.UPDATE, FLEET, ROUND, MODEL, "dev-1", {"n": i}, run=RUN),
            SigningKey(bytes([99]) * 32),
        )
        for i in range(MAX_ATTEMPTS + 10)
    ]

    for data in forged:
        c.offer(data, topic("dev-1"))
    late = c.offer(_update("dev-1", 0), topic("dev-1"))

    assert c.rejected["bad_signature"] == MAX_ATTEMPTS
    assert c.rejected["rate_limited"] == 10 + 1
    assert late.reason == "rate_limited"
    assert c.offer(_update("dev-2", 1), topic("dev-2")).outcome is Outcome.ACCEPTED


def test_a_retained_contribution_is_refused() -> None:
    c = _collector()

    offer = c.offer(_update("dev-1", 0), topic("dev-1"), retained=True)

    assert offer.reason == "retained" and not c.accepted


def test_a_failure_settles_its_sender_and_is_tallied() -> None:
    c = _collector()
    body = Failure({"kernel_fuel": 1}).to_body()
    data = seal(Envelope(Kind.FAILURE, FLEET, ROUND, MODEL, "dev-2", body, run=RUN), KEYS["dev-2"])

    offer = c.offer(data, topic("dev-2"))

    assert offer.outcome is Outcome.FAILED
    assert c.failed == {"kernel_fuel": 1}
    assert c.missing == {"dev-1", "dev-3"}


def test_a_fold_that_would_overflow_refuses_the_contributions_that_make_it_so() -> None:
    # The bounds of a real round make this impossible; the close still never hands out
    # a non-finite fold (tern.collect docstring).
    huge = Terms(FLEET, RUN, ROUND, MODEL, CodecName.FLOAT32, SPEC, max_norm=1e38)
    peers = {d: Peer(d, Role.DEVICE, k.verify_key, 1, 1e38) for d, k in KEYS.items()}
    c = Collector(terms=huge, peers=peers)
    for d in sorted(KEYS):
        p = Partial(np.full(SPEC.size, 3e38, np.float32), 1e38 / 4, 1)
        update, _ = encode_update(Float32Codec(), SPEC, p)
        env = Envelope(Kind.UPDATE, FLEET, ROUND, MODEL, d, update.to_body(), run=RUN)
        assert c.offer(seal(env, KEYS[d]), topic(d)).outcome is Outcome.ACCEPTED

    result = c.close()

    assert np.isfinite(result.weighted_sum).all()
    assert c.rejected == {"overflow": 2}
    assert result.count == 1 and list(c.accepted) == ["dev-1"]
    assert c.close() is result


def test_a_message_after_the_close_is_refused_as_late() -> None:
    c = _collector()
    c.close()

    assert c.offer(_update("dev-1", 0), topic("dev-1")).reason == "late"
