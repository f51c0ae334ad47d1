"""Secure aggregation's ring (tern.secagg.ring): its size, bit packing, and contributions as
integers whose cohort sum is exact, with error feedback and the DP clip."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tern.aggregate import fold_sorted
from tern.errors import MalformedMessage, NonFiniteValue, ShapeMismatch
from tern.privacy.terms import DpTerms, Noise
from tern.secagg.ring import (
    RingOverflow,
    decode_sum,
    encode_contribution,
    from_ring,
    pack,
    packed_size,
    ring_bits,
    scale_vector,
    to_ring,
    trits_under_scale,
    unpack,
)
from tern.secagg.terms import SecAggTerms
from tern.spec import ModelSpec
from tests.helpers import make_rng

SPEC = ModelSpec.of({"w": (6, 5), "b": (5,)})
TERMS = SecAggTerms(scales=(0.1, 0.02), weight_levels=8, weight_cap=100.0)
moderate = st.floats(min_value=-5.0, max_value=5.0, width=32)


def _vector(values: st.SearchStrategy[float] = moderate) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, (SPEC.size,), elements=values)


# == the ring's size ==================================================================


def test_ring_for_a_cohort_of_100_at_8_levels_has_11_bits() -> None:
    assert ring_bits(100, 8) == 11  # 2 * 800 + 1 = 1601 < 2048


@given(devices=st.integers(1, 10_000), levels=st.integers(1, 255), noise=st.floats(0, 1e5))
def test_ring_bits_are_the_smallest_that_hold_the_sum(
    devices: int, levels: int, noise: float
) -> None:
    bound = 2 * (devices * levels + 10 * noise) + 1

    bits = ring_bits(devices, levels, noise_sigma_int=noise)

    assert 2**bits > bound
    assert bits == 2 or 2 ** (bits - 1) <= bound


def test_ring_too_large_for_32_bits_is_refused() -> None:
    with pytest.raises(RingOverflow) as err:
        ring_bits(10_000_000, 255)
    assert err.value.reason == "ring_overflow"


@given(bits=st.integers(2, 32), data=st.data())
def test_centered_integers_survive_the_ring(bits: int, data: st.DataObject) -> None:
    half = 1 << (bits - 1)
    x = np.array(data.draw(st.lists(st.integers(-half, half - 1), max_size=20)), dtype=np.int64)

    assert np.array_equal(from_ring(to_ring(x, bits), bits), x)


# == packing =========================================================================


@settings(max_examples=80)
@given(bits=st.integers(2, 32), data=st.data())
def test_packed_ring_vector_unpacks_to_the_same_values(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=40))
    u = np.array(values, dtype=np.uint32)

    packed = pack(u, bits)

    assert len(packed) == packed_size(u.size, bits)
    assert np.array_equal(unpack(packed, u.size, bits), u)


def test_packing_is_little_endian_least_significant_bit_first() -> None:
    assert pack(np.array([1, 2, 3], dtype=np.uint32), 4) == bytes([0x21, 0x03])
    assert pack(np.array([0x1FF], dtype=np.uint32), 9) == bytes([0xFF, 0x01])


def test_unpack_refuses_a_vector_of_the_wrong_length() -> None:
    packed = pack(np.arange(10, dtype=np.uint32), 11)

    with pytest.raises(MalformedMessage):
        unpack(packed + b"\0", 10, 11)
    with pytest.raises(MalformedMessage):
        unpack(packed[:-1], 10, 11)


def test_unpack_refuses_set_padding_bits() -> None:
    packed = bytearray(pack(np.arange(3, dtype=np.uint32), 5))  # 15 bits in 2 bytes
    packed[-1] |= 0x80

    with pytest.raises(MalformedMessage):
        unpack(bytes(packed), 3, 5)


def test_pack_refuses_a_value_wider_than_the_ring() -> None:
    with pytest.raises(ValueError, match="fit"):
        pack(np.array([16], dtype=np.uint32), 4)


# == contributions ====================================================================


def test_contribution_holds_weighted_trits_then_weight_then_count() -> None:
    delta = np.zeros(SPEC.size, dtype=np.float32)
    delta[0], delta[1], delta[30] = 0.3, -0.06, 0.011  # scales 0.1 (w) and 0.02 (b)

    x, _ = encode_contribution(SPEC, delta, 50, None, TERMS, None, 10, None)

    q = TERMS.level(50)
    assert x.shape == (SPEC.size + 2,) and x.dtype == np.int64
    assert (x[0], x[1], x[30]) == (q, -q, q)
    assert np.count_nonzero(x[: SPEC.size]) == 3
    assert (x[SPEC.size], x[SPEC.size + 1]) == (q, 1)


def test_trits_round_to_nearest_under_the_scale() -> None:
    t = trits_under_scale([0.049, 0.051, -0.051, -0.05, 0.3, 0.0], 0.1)

    assert t.tolist() == [0, 1, -1, 0, 1, 0]


@given(delta=_vector(), residual=_vector(), samples=st.integers(0, 500))
def test_contribution_is_deterministic_and_its_error_never_grows(
    delta: np.ndarray, residual: np.ndarray, samples: int
) -> None:
    target = delta.astype(np.float64) + residual

    x, left = encode_contribution(SPEC, delta, samples, residual, TERMS, None, 10, None)
    again, left_again = encode_contribution(SPEC, delta, samples, residual, TERMS, None, 10, None)

    assert np.array_equal(x, again) and np.array_equal(left, left_again)
    trits = x[: SPEC.size] // TERMS.level(samples)
    sent = scale_vector(SPEC, TERMS) * trits
    assert np.allclose(left, target - sent, atol=1e-6)
    assert np.all(np.abs(target - sent) <= np.abs(target) + 1e-12)


def test_error_feedback_sends_a_small_delta_once_it_has_built_up() -> None:
    delta = np.full(SPEC.size, 0.015, dtype=np.float32)  # under half of the w scale 0.1
    residual = np.zeros(SPEC.size, dtype=np.float32)
    sent = np.zeros(SPEC.size, dtype=np.int64)

    for _ in range(10):
        x, residual = encode_contribution(SPEC, delta, 100, residual, TERMS, None, 1, None)
        sent += x[: SPEC.size]

    real = scale_vector(SPEC, TERMS) * sent / TERMS.level(100)
    assert np.allclose(real + residual, 10 * 0.015, atol=1e-5)
    assert np.all(np.abs(residual) <= np.array(scale_vector(SPEC, TERMS)) / 2 + 1e-6)


def test_masked_ring_sum_decodes_exactly_to_the_plain_sum_of_contributions() -> None:
    rng = make_rng(1)
    contributions = [
        encode_contribution(
            SPEC,
            rng.normal(0, 0.1, SPEC.size).astype(np.float32),
            int(n),
            None,
            TERMS,
            None,
            9,
            None,
        )[0]
        for n in rng.integers(1, 200, 9)
    ]
    bits = ring_bits(9, TERMS.weight_levels)
    masks = [rng.integers(0, 1 << bits, SPEC.size + 2) for _ in range(9)]
    cancel = (-np.sum(masks[:-1], axis=0)) % (1 << bits)  # the masks sum to 0 mod 2^bits
    masks[-1] = cancel

    ring_total = np.zeros(SPEC.size + 2, dtype=np.int64)
    for x, m in zip(contributions, masks, strict=True):
        ring_total += to_ring(x, bits).astype(np.int64) + m
    result = from_ring(ring_total % (1 << bits), bits)

    plain = np.sum(contributions, axis=0)
    assert np.array_equal(result, plain)
    exact, folded = decode_sum(SPEC, result, TERMS), decode_sum(SPEC, plain, TERMS)
    assert np.array_equal(exact.weighted_sum, folded.weighted_sum)
    assert (exact.total_weight, exact.count) == (folded.total_weight, folded.count) != (0, 0)
    floats = fold_sorted(
        [(f"d{i}", decode_sum(SPEC, x, TERMS)) for i, x in enumerate(contributions)], SPEC.size
    )
    assert np.allclose(exact.weighted_sum, floats.weighted_sum, rtol=1e-6, atol=1e-6)
    assert (floats.total_weight, floats.count) == (exact.total_weight, 9)


def test_contribution_refuses_non_finite_and_misshaped_input() -> None:
    bad = np.zeros(SPEC.size, dtype=np.float32)
    bad[3] = np.nan

    with pytest.raises(NonFiniteValue):
        encode_contribution(SPEC, bad, 10, None, TERMS, None, 1, None)
    with pytest.raises(ShapeMismatch):
        encode_contribution(SPEC, bad[:-1], 10, None, TERMS, None, 1, None)
    with pytest.raises(ShapeMismatch):
        scale_vector(SPEC, SecAggTerms(scales=(0.1,)))


# == under differential privacy =========================================================

DP = DpTerms(clip=0.5, multiplier=0.0, weight_cap=100.0)


@settings(max_examples=150)
@given(
    delta=_vector(st.floats(min_value=-100, max_value=100, width=32)),
    residual=_vector(),
    samples=st.integers(0, 1000),
    clip=st.floats(min_value=1e-3, max_value=10.0),
)
def test_private_contribution_norm_in_real_units_is_within_the_clip(
    delta: np.ndarray, residual: np.ndarray, samples: int, clip: float
) -> None:
    dp = DpTerms(clip=clip, multiplier=0.0, weight_cap=100.0)

    x, left = encode_contribution(SPEC, delta, samples, residual, TERMS, dp, 10, None)

    real = scale_vector(SPEC, TERMS) * x[: SPEC.size] / TERMS.weight_levels
    assert np.linalg.norm(real) <= clip
    assert (x[SPEC.size], x[SPEC.size + 1]) == (TERMS.weight_levels, 1)
    q = TERMS.level(samples)
    own = np.linalg.norm(delta.astype(np.float64)) * q / TERMS.weight_levels
    target = delta.astype(np.float64) * min(1.0, clip / own if own else 1.0) + residual
    left_over = target - scale_vector(SPEC, TERMS) * x[: SPEC.size] / q
    cap = clip * TERMS.weight_levels / q  # the residual's cap, per unit weight
    expected = left_over * min(1.0, cap / max(float(np.linalg.norm(left_over)), 1e-300))
    assert np.allclose(left, expected, rtol=1e-5, atol=1e-4)


def test_clip_drops_the_trits_of_smallest_target_into_the_residual() -> None:
    delta = np.zeros(SPEC.size, dtype=np.float32)
    delta[:4] = [0.08, -0.07, 0.06, 0.055]  # norm 0.13, each rounds to a trit of scale 0.1
    terms = SecAggTerms(scales=(0.1, 0.02), weight_levels=4, weight_cap=100.0)
    dp = DpTerms(clip=0.1 * (3**0.5) + 1e-6, multiplier=0.0, weight_cap=100.0)  # room for 3

    x, left = encode_contribution(SPEC, delta, 100, None, terms, dp, 1, None)

    assert x[:4].tolist() == [4, -4, 4, 0]
    assert left[3] == pytest.approx(0.055)
    assert np.allclose(left[:3], [-0.02, 0.03, -0.04])


def test_private_residual_does_not_pile_up_under_a_persistent_clip() -> None:
    delta = make_rng(5).normal(0, 1.0, SPEC.size).astype(np.float32)  # norm ~6, clip 0.5
    residual = None
    norms = []

    for _ in range(30):
        _, residual = encode_contribution(SPEC, delta, 100, residual, TERMS, DP, 1, None)
        norms.append(float(np.linalg.norm(residual)))

    assert max(norms) <= DP.clip * (1 + 1e-6)  # q = weight_levels at 100 samples


def test_distributed_noise_gives_each_member_its_share_in_integer_units() -> None:
    spec = ModelSpec.of({"w": (200, 100)})
    terms = SecAggTerms(scales=(0.01,), weight_levels=8, weight_cap=100.0)
    dp = DpTerms(clip=1.0, multiplier=2.0, noise=Noise.DISTRIBUTED, weight_cap=100.0)
    zero = np.zeros(spec.size, dtype=np.float32)

    x, _ = encode_contribution(spec, zero, 100, None, terms, dp, 25, make_rng(3))

    expected = dp.sigma * terms.weight_levels / (0.01 * 25**0.5)  # 320
    assert np.std(x[: spec.size]) == pytest.approx(expected, rel=0.03)
    assert (x[spec.size], x[spec.size + 1]) == (8, 1)
    with pytest.raises(ValueError, match="Generator"):
        encode_contribution(spec, zero, 100, None, terms, dp, 25, None)


def test_central_noise_adds_nothing_on_the_device() -> None:
    dp = DpTerms(clip=1.0, multiplier=2.0, noise=Noise.CENTRAL, weight_cap=100.0)
    delta = make_rng(4).normal(0, 0.05, SPEC.size).astype(np.float32)

    x, _ = encode_contribution(SPEC, delta, 100, None, TERMS, dp, 25, make_rng(3))

    assert np.all(np.abs(x[: SPEC.size]) <= TERMS.level(100))
