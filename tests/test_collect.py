"""A round's collection at a receiver (tern.collect.Collector)."""

from __future__ import annotations

import numpy as np
from nacl.signing import SigningKey

from tern.aggregate import Partial, fold_sorted
from tern.codecs import Float32Codec, TernaryCodec
from tern.collect import Collector, Outcome
from tern.envelope import Envelope, Kind, loads_bounded, seal
from tern.messages import Update, encode_update
from tern.spec import ModelSpec

SPEC = ModelSpec.of({"w": (4, 3), "b": (3,)})
FLEET = "plant-7"
KEYS = {f"dev-{i}": SigningKey(bytes([i]) * 32) for i in range(1, 4)}
VERIFY = {d: k.verify_key for d, k in KEYS.items()}


def _update(
    device: str, seed: int, *, round: int = 5, fleet: str = FLEET, kind: Kind = Kind.UPDATE
) -> bytes:
    delta = np.random.default_rng(seed).standard_normal(SPEC.size).astype(np.float32)
    update, _ = encode_update(TernaryCodec(), SPEC, Partial(delta * 10, 10.0, 1))
    return seal(Envelope(kind, fleet, round, 4, device, update.to_body()), KEYS[device])


def _collector() -> Collector:
    return Collector(fleet=FLEET, round=5, spec=SPEC, keys=VERIFY, expected=set(KEYS))


def test_collector_completes_when_every_expected_sender_reported() -> None:
    c = _collector()

    outcomes = [c.offer(_update(d, i), topic_sender=d) for i, d in enumerate(sorted(KEYS))]

    assert all(o.outcome is Outcome.ACCEPTED for o in outcomes)
    assert c.complete and not c.missing
    assert c.result().count == 3 and c.result().total_weight == 30.0


def test_collector_result_does_not_depend_on_arrival_order() -> None:
    first, second = _collector(), _collector()
    messages = {d: _update(d, i) for i, d in enumerate(sorted(KEYS))}

    for d in sorted(KEYS):
        first.offer(messages[d], d)
    for d in sorted(KEYS, reverse=True):
        second.offer(messages[d], d)

    assert first.result().weighted_sum.tobytes() == second.result().weighted_sum.tobytes()


def test_collector_result_is_the_sorted_fold_of_the_decoded_updates() -> None:
    c = _collector()
    messages = {d: _update(d, i) for i, d in enumerate(sorted(KEYS))}
    for d, m in messages.items():
        c.offer(m, d)

    expected = fold_sorted(
        (
            (d, Update.from_body(loads_bounded(m, 1 << 20)["body"]).check(SPEC).to_partial())
            for d, m in messages.items()
        ),
        SPEC.size,
    )
    assert c.result().weighted_sum.tobytes() == expected.weighted_sum.tobytes()


def test_collector_counts_each_rejection_by_reason_and_keeps_the_good_ones() -> None:
    c = _collector()
    other = SigningKey(bytes([9]) * 32)
    forged = seal(Envelope(Kind.UPDATE, FLEET, 5, 4, "dev-1", {"x": 1}), other)
    nan_update, _ = encode_update(
        Float32Codec(), SPEC, Partial(np.ones(SPEC.size, np.float32), 1.0, 1)
    )
    body = nan_update.to_body()
    tensor = body["tensors"][0]
    raw = bytearray(tensor.value[1].value)
    raw[0:4] = np.array([np.nan], dtype="<f4").tobytes()
    tensor.value[1] = type(tensor.value[1])(85, bytes(raw))
    nan = seal(Envelope(Kind.UPDATE, FLEET, 5, 4, "dev-2", body), KEYS["dev-2"])

    c.offer(b"\x00garbage", "dev-1")
    c.offer(forged, "dev-1")
    c.offer(_update("dev-1", 0, round=4), "dev-1")
    c.offer(_update("dev-1", 0, fleet="other"), "dev-1")
    c.offer(nan, "dev-2")
    c.offer(_update("dev-3", 2), "dev-1")  # valid, but on another device's topic
    c.offer(_update("dev-1", 0), "dev-1")
    c.offer(_update("dev-1", 1), "dev-1")  # a second one

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


def test_collector_refuses_a_sender_outside_the_round_and_a_device_claiming_many() -> None:
    c = Collector(fleet=FLEET, round=5, spec=SPEC, keys=VERIFY, expected={"dev-1"})
    update, _ = encode_update(Float32Codec(), SPEC, Partial(np.ones(SPEC.size, np.float32), 3.0, 3))
    inflated = seal(Envelope(Kind.UPDATE, FLEET, 5, 4, "dev-1", update.to_body()), KEYS["dev-1"])

    assert c.offer(_update("dev-2", 1), "dev-2").reason == "unexpected_sender"
    assert c.offer(inflated, "dev-1").reason == "malformed"
    assert not c.accepted
