"""The compressed downlink (tern.downlink, tern.rounds.follow): the coordinator's deltas,
the model hash, and how a receiver follows them, fetches a full model when it cannot,
and refuses what it must."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from tern import topics
from tern.aggregate import Partial
from tern.codecs import CodecName, Float16Codec, Float32Codec, TernaryCodec
from tern.downlink import CheckedDelta, CompressedDownlink, compress, delta_caps, model_hash
from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.feed import CoordinatorFeed
from tern.fleet import COORDINATOR
from tern.freshness import Stamp
from tern.messages import GlobalModel, RoundSchedule
from tern.rounds.events import Link, Subscribe, Unsubscribe
from tern.rounds.follow import ModelFollower
from tern.rounds.opening import ServerModel
from tern.rounds.publishing import next_model, seal_delta
from tern.spec import ModelSpec
from tern.strategies import FedAdam, FedAvg
from tests.fleet_fixtures import build_fleet

SPEC = ModelSpec.of({"w": (8, 5), "b": (5,)})
KIT = build_fleet({"gw-1": (COORDINATOR, ["dev-1"])})
RUN = 1_800_000_000_000


def _weights(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=SPEC.size).astype(np.float32)


def _full(version: int, weights: np.ndarray, *, sender: str = COORDINATOR, run: int = RUN) -> bytes:
    body = GlobalModel(SPEC, weights).to_body()
    env = Envelope(Kind.MODEL, KIT.fleet.fleet, version, version, sender, body, run=run)
    return seal(env, KIT.keys[sender])


def _schedule(
    version: int, digest: bytes | None, downlink: CodecName | None = CodecName.TERNARY
) -> RoundSchedule:
    return RoundSchedule(version, version, CodecName.TERNARY, 1e12, 1, model_hash=digest,
                         downlink=downlink)  # fmt: skip


def _chain(n: int, seed: int = 0) -> tuple[list[GlobalModel], list[bytes]]:
    """n+1 models from the coordinator's side: v0 and n deltas (sealed), each the
    ternary step towards a random walk with error feedback."""
    rng = np.random.default_rng(seed)
    models = [GlobalModel(SPEC, _weights(seed))]
    sealed: list[bytes] = []
    residual = None
    for v in range(n):
        target = (models[-1].weights + rng.normal(scale=0.05, size=SPEC.size)).astype(np.float32)
        c = compress(TernaryCodec(), models[-1], v, target, residual)
        models.append(c.model)
        residual = c.residual
        sealed.append(seal_delta(c.delta, KIT.fleet.fleet, v + 1, v + 1, RUN, KIT.coordinator_key))
    return models, sealed


def _follower(parent: str = "gw-1") -> ModelFollower:
    return ModelFollower(CoordinatorFeed(KIT.fleet), parent, Link.DOWN)


# -- the coordinator's side -----------------------------------------------------------


def test_the_published_model_is_exactly_the_base_plus_the_decoded_delta() -> None:
    held = GlobalModel(SPEC, _weights(1))
    target = (held.weights + 0.1 * _weights(2)).astype(np.float32)

    c = compress(TernaryCodec(), held, 3, target, None)
    applied = CheckedDelta.from_body(c.delta.to_body(), SPEC).apply(held)

    assert applied.weights.tobytes() == c.model.weights.tobytes()
    assert c.delta.hash == model_hash(SPEC, c.model.weights)
    assert c.delta.base_hash == model_hash(SPEC, held.weights) and c.delta.base == 3


def test_error_feedback_keeps_the_published_model_near_the_servers_target() -> None:
    """The residual carries what quantization dropped: after many steps the published
    model lags the exact one by about one step, not by the sum of all errors."""
    rng = np.random.default_rng(0)
    exact = _weights(3)
    held, residual = GlobalModel(SPEC, exact.copy()), None
    lag_without = GlobalModel(SPEC, exact.copy())
    for _ in range(40):
        step = rng.normal(scale=0.02, size=SPEC.size).astype(np.float32) + 0.01
        target = (held.weights + step).astype(np.float32)
        c = compress(TernaryCodec(), held, 0, target, residual)
        held, residual = c.model, c.residual
        plain = compress(TernaryCodec(), lag_without, 0, lag_without.weights + step, None)
        lag_without = plain.model
        exact = (exact + step).astype(np.float32)

    with_ef = float(np.linalg.norm(exact - held.weights))
    without = float(np.linalg.norm(exact - lag_without.weights))
    assert with_ef < 0.5 * without
    assert np.allclose(exact, held.weights + residual, atol=1e-4)


@pytest.mark.parametrize("codec", [TernaryCodec(), Float16Codec(), Float32Codec()])
def test_a_delta_in_any_codec_round_trips_to_the_same_model_bytes(codec: object) -> None:
    held = GlobalModel(SPEC, _weights(4))
    target = (held.weights + 0.01 * _weights(5)).astype(np.float32)
    c = compress(codec, held, 0, target, None)  # type: ignore[arg-type]

    checked = CheckedDelta.from_body(c.delta.to_body(), SPEC)

    assert checked.codec is c.delta.codec
    assert model_hash(SPEC, checked.apply(held).weights) == c.delta.hash


@pytest.mark.parametrize("inner", [FedAvg(), FedAvg(server_lr=0.5, momentum=0.9), FedAdam()])
def test_a_compressed_downlink_wraps_any_strategy_and_keeps_its_residual_in_the_state(
    inner: object,
) -> None:
    strategy = CompressedDownlink(inner, TernaryCodec(), SPEC)  # type: ignore[arg-type]
    model = ServerModel(0, _weights(6), strategy.init_state(SPEC.size))
    partial = Partial(_weights(7) * 3, 3.0, 1)

    new, delta = next_model(model, strategy, partial)

    assert new is not None and delta is not None and new.version == 1
    assert "downlink" in new.state.buffers
    applied = CheckedDelta.from_body(delta.to_body(), SPEC).apply(GlobalModel(SPEC, model.weights))
    assert applied.weights.tobytes() == new.weights.tobytes()
    target, _ = inner.apply(model.weights, inner.init_state(SPEC.size), partial)  # type: ignore[attr-defined]
    assert np.allclose(new.weights + new.state.buffers["downlink"], target, atol=1e-5)


def test_a_step_that_would_not_be_finite_gives_no_model() -> None:
    strategy = CompressedDownlink(FedAvg(), TernaryCodec(), SPEC)
    model = ServerModel(0, _weights(8), strategy.init_state(SPEC.size))
    huge = np.full(SPEC.size, 3e38, dtype=np.float32)

    assert next_model(model, strategy, Partial(huge, 0.5, 1)) == (None, None)


def test_the_model_hash_covers_the_spec_and_every_weight_bit() -> None:
    w = _weights(9)
    flipped = w.copy()
    flipped.view(np.uint32)[7] ^= 1
    other = ModelSpec.of({"w": (5, 8), "b": (5,)})

    assert model_hash(SPEC, w) == model_hash(SPEC, w.copy())
    assert model_hash(SPEC, w) != model_hash(SPEC, flipped)
    assert model_hash(SPEC, w) != model_hash(other, w)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=400))
def test_a_mangled_delta_body_is_refused_with_a_reason_or_still_checks(
    junk: bytes, at: int
) -> None:
    models, _sealed = _chain(1)
    body = dict(compress(TernaryCodec(), models[0], 0, models[1].weights, None).delta.to_body())
    key = sorted(body)[at % len(body)]
    body[key] = junk if at % 3 else list(junk)
    try:
        checked = CheckedDelta.from_body(body, SPEC)
    except TernError as exc:
        assert exc.reason
        return
    assert checked.apply(models[0]).weights.shape == (SPEC.size,)


def test_delta_caps_hold_the_largest_delta_a_float32_one() -> None:
    held = GlobalModel(SPEC, _weights(10))
    c = compress(Float32Codec(), held, 0, held.weights + 1, None)
    data = seal_delta(c.delta, KIT.fleet.fleet, 1, 1, RUN, KIT.coordinator_key)

    assert len(data) <= delta_caps(SPEC).max_bytes


# -- the receiver's side ----------------------------------------------------------------


def test_a_receiver_takes_its_first_full_model_then_unsubscribes_and_follows_deltas() -> None:
    models, deltas = _chain(3)
    f = _follower()

    f.on_schedule(RUN, _schedule(0, model_hash(SPEC, models[0].weights)))
    asked = f.subscription()  # subscribed from the start: nothing to ask
    f.on_full(_full(0, models[0].weights))
    done = f.subscription()
    for v in (1, 2, 3):
        _, adopted = f.on_delta(deltas[v - 1])
        f.on_schedule(RUN, _schedule(v, model_hash(SPEC, models[v].weights)))
        assert [a.stamp for a in adopted] == [Stamp(RUN, v)] and not f.subscription()

    topic = topics.global_model(KIT.fleet.fleet)
    assert asked == [] and done == [Unsubscribe(Link.DOWN, topic)]
    held = f.model(Stamp(RUN, 3))
    assert held is not None and held.weights.tobytes() == models[3].weights.tobytes()
    assert (f.full_models, f.deltas) == (1, 3)
    assert f.feed.marks.model == Stamp(RUN, 3)


def test_a_receiver_that_missed_a_delta_fetches_the_full_model() -> None:
    models, deltas = _chain(3)
    f = _follower()
    f.on_full(_full(0, models[0].weights))
    f.on_delta(deltas[0])
    f.on_schedule(RUN, _schedule(1, model_hash(SPEC, models[1].weights)))
    assert f.subscription() == [Unsubscribe(Link.DOWN, topics.global_model("test-fleet"))]

    _, adopted = f.on_delta(deltas[2])  # v2's delta was lost
    f.on_schedule(RUN, _schedule(3, model_hash(SPEC, models[3].weights)))
    asked = f.subscription()
    taken = f.on_full(_full(3, models[3].weights, sender="gw-1"))

    assert adopted == [] and asked == [Subscribe(Link.DOWN, topics.global_model("test-fleet"))]
    assert [a.stamp for a in taken] == [Stamp(RUN, 3)]


def test_a_gateway_sealed_full_model_waits_for_the_coordinators_hash() -> None:
    models, _ = _chain(1)
    f = _follower()

    early = f.on_full(_full(1, models[1].weights, sender="gw-1"))
    named = f.on_schedule(RUN, _schedule(1, model_hash(SPEC, models[1].weights)))

    assert early == [] and [a.stamp for a in named] == [Stamp(RUN, 1)]


def test_a_gateway_cannot_pass_off_another_model_as_the_scheduled_one() -> None:
    models, _ = _chain(1)
    f = _follower()
    f.on_schedule(RUN, _schedule(1, model_hash(SPEC, models[1].weights)))

    with pytest.raises(TernError) as err:
        f.on_full(_full(1, models[0].weights, sender="gw-1"))

    assert err.value.reason == "hash_mismatch" and f.model(Stamp(RUN, 1)) is None
    assert f.feed.rejected["model_hash_mismatch"] == 1


def test_a_full_model_sealed_by_another_gateway_or_a_device_is_refused() -> None:
    kit = build_fleet({"gw-1": (COORDINATOR, ["dev-1"]), "gw-2": (COORDINATOR, ["dev-2"])})
    f = ModelFollower(CoordinatorFeed(kit.fleet), "gw-1", Link.DOWN)
    for sender in ("gw-2", "dev-2"):
        body = GlobalModel(SPEC, _weights(1)).to_body()
        env = Envelope(Kind.MODEL, kit.fleet.fleet, 1, 1, sender, body, run=RUN)
        with pytest.raises(TernError) as err:
            f.on_full(seal(env, kit.keys[sender]))
        assert err.value.reason == "bad_signature"


def test_a_forged_delta_is_refused_and_the_model_held_is_unchanged() -> None:
    models, deltas = _chain(2)
    f = _follower()
    f.on_full(_full(0, models[0].weights))
    held = f.model(Stamp(RUN, 0))
    forged = bytearray(deltas[0])
    forged[-70] ^= 0xFF

    with pytest.raises(TernError) as err:
        f.on_delta(bytes(forged))

    assert err.value.reason in {"bad_signature", "malformed"}
    assert f.model(Stamp(RUN, 0)) is held and f.model(Stamp(RUN, 1)) is None


def test_a_replayed_delta_is_stale_and_the_same_one_again_is_nothing() -> None:
    models, deltas = _chain(2)
    f = _follower()
    f.on_full(_full(0, models[0].weights))
    f.on_delta(deltas[0])
    f.on_delta(deltas[1])

    again = f.on_delta(deltas[1])[1]
    with pytest.raises(TernError) as err:
        f.on_delta(deltas[0])

    assert again == [] and err.value.reason == "stale"
    assert f.feed.rejected["delta_stale"] == 1


def test_a_delta_on_another_base_of_the_same_version_is_refused() -> None:
    """A coordinator's delta names its base by hash: a receiver holding a different v0
    (another run's leftovers, a corrupted copy) never applies it."""
    _models, deltas = _chain(1)
    f = _follower()
    f.on_full(_full(0, _weights(99)))

    with pytest.raises(TernError) as err:
        f.on_delta(deltas[0])

    assert err.value.reason == "base_mismatch" and f.model(Stamp(RUN, 1)) is None


def test_a_delta_that_does_not_give_its_signed_hash_is_refused() -> None:
    models, _ = _chain(1)
    c = compress(TernaryCodec(), models[0], 0, models[1].weights, None)
    lying = replace(c.delta, hash=bytes(32))
    data = seal_delta(lying, KIT.fleet.fleet, 1, 1, RUN, KIT.coordinator_key)
    f = _follower()
    f.on_full(_full(0, models[0].weights))

    with pytest.raises(TernError) as err:
        f.on_delta(data)

    assert err.value.reason == "hash_mismatch" and f.model(Stamp(RUN, 1)) is None


def test_a_receiver_stays_subscribed_to_full_models_when_the_coordinator_sends_no_deltas() -> None:
    models, _ = _chain(2)
    f = _follower()
    f.on_full(_full(0, models[0].weights))
    f.on_schedule(RUN, _schedule(0, model_hash(SPEC, models[0].weights), downlink=None))

    kept = f.subscription()
    taken = f.on_full(_full(1, models[1].weights))  # the last model, with no schedule after it

    assert kept == [] and f.subscribed and [a.stamp for a in taken] == [Stamp(RUN, 1)]


def test_a_receiver_keeps_the_current_model_and_the_one_before() -> None:
    models, deltas = _chain(4)
    f = _follower()
    f.on_full(_full(0, models[0].weights))
    for d in deltas:
        f.on_delta(d)

    assert sorted(f.held) == [Stamp(RUN, 3), Stamp(RUN, 4)]


def test_a_gateway_below_the_coordinator_takes_full_models_only_from_the_coordinator() -> None:
    models, _ = _chain(1)
    f = ModelFollower(CoordinatorFeed(KIT.fleet), COORDINATOR, Link.UP)

    taken = f.on_full(_full(1, models[1].weights))

    assert [a.stamp for a in taken] == [Stamp(RUN, 1)]
    with pytest.raises(TernError):
        f.on_full(_full(2, models[1].weights, sender="gw-1"))


def test_a_delta_is_refused_before_decoding_when_larger_than_any_delta_could_be() -> None:
    models, _ = _chain(1)
    f = _follower()
    f.on_full(_full(0, models[0].weights))
    big = Float32Codec().encode(np.zeros(SPEC.size * 40, dtype=np.float32))[0]
    body = {"base": 0, "base_hash": bytes(32), "hash": bytes(32), "codec": "float32",
            "tensors": [big, big]}  # fmt: skip
    env = Envelope(Kind.MODEL_DELTA, KIT.fleet.fleet, 1, 1, COORDINATOR, body, run=RUN)

    with pytest.raises(TernError) as err:
        f.on_delta(seal(env, KIT.coordinator_key))

    assert err.value.reason == "oversize"


def test_a_coordinator_key_is_needed_for_a_delta_even_from_the_parent() -> None:
    models, _ = _chain(1)
    c = compress(TernaryCodec(), models[0], 0, models[1].weights, None)
    env = Envelope(Kind.MODEL_DELTA, KIT.fleet.fleet, 1, 1, "gw-1", c.delta.to_body(), run=RUN)
    f = _follower()
    f.on_full(_full(0, models[0].weights))

    with pytest.raises(TernError) as err:
        f.on_delta(seal(env, KIT.keys["gw-1"]))

    assert err.value.reason == "bad_signature"


def test_signing_keys_of_the_kit_are_distinct() -> None:  # guards the tests above
    assert len({bytes(k) for k in KIT.keys.values() if isinstance(k, SigningKey)}) == len(KIT.keys)
