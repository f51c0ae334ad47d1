"""Differential privacy (tern.privacy): the discrete Gaussian, central noise, a device's
clipped update with the plain codecs, and the coordinator's ledger."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tern.aggregate import Partial
from tern.codecs import codec_for
from tern.errors import MalformedMessage
from tern.messages import Update
from tern.privacy.clip import dp_update, sent_norm
from tern.privacy.ledger import PrivacyLedger, calibrate, gaussian_epsilon
from tern.privacy.noise import central_noise, discrete_gaussian, discrete_laplace
from tern.privacy.terms import DpTerms, Noise
from tern.spec import ModelSpec
from tests.codec_strategies import wire_roundtrip
from tests.helpers import make_rng

SPEC = ModelSpec.of({"w": (7, 4), "b": (4,)})
CODECS = ["ternary", "float32", "float16"]


# == the discrete Gaussian ==============================================================


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.7, 40.0])
def test_discrete_gaussian_is_centred_with_variance_sigma_squared(sigma: float) -> None:
    x = discrete_gaussian(sigma, 400_000, make_rng(11))

    # below sigma ~ 1 the discrete variance is smaller than sigma^2: compare with the pmf's
    ys = np.arange(-60 * math.ceil(sigma), 60 * math.ceil(sigma) + 1)
    pmf = np.exp(-(ys**2) / (2 * sigma**2))
    var = float((ys**2 * pmf).sum() / pmf.sum())
    assert x.dtype == np.int64
    assert abs(x.mean()) < 5 * math.sqrt(var / x.size)
    assert x.var() == pytest.approx(var, rel=0.01)


def test_discrete_gaussian_is_symmetric_and_follows_its_pmf() -> None:
    sigma = 1.3
    x = discrete_gaussian(sigma, 300_000, make_rng(12))

    counts = Counter(x.tolist())
    ys = np.arange(-12, 13)
    pmf = np.exp(-(ys**2) / (2 * sigma**2))
    pmf /= pmf.sum()
    for y, p in zip(ys.tolist(), pmf.tolist(), strict=True):
        if p > 1e-3:
            expected = p * x.size
            assert abs(counts[y] - expected) < 5 * math.sqrt(expected)
            assert abs(counts[y] - counts[-y]) < 5 * math.sqrt(2 * expected)


def test_discrete_gaussian_of_zero_sigma_is_zeros_and_a_seed_repeats() -> None:
    assert not discrete_gaussian(0.0, 5, make_rng()).any()
    assert np.array_equal(
        discrete_gaussian(2.0, 50, make_rng(5)), discrete_gaussian(2.0, 50, make_rng(5))
    )
    with pytest.raises(ValueError):
        discrete_gaussian(-1.0, 5, make_rng())


def test_discrete_laplace_halves_every_t_log_2_steps() -> None:
    t = 2.0
    x = discrete_laplace(t, 400_000, make_rng(13))

    counts = Counter(x.tolist())
    assert counts[1] / counts[0] == pytest.approx(math.exp(-1 / t), rel=0.02)
    assert counts[-2] / counts[0] == pytest.approx(math.exp(-2 / t), rel=0.03)


# == central noise =======================================================================


def test_central_noise_scales_with_each_contributors_weight() -> None:
    dp = DpTerms(clip=0.5, multiplier=2.0)
    partial = Partial(np.ones(100_000, dtype=np.float32), 8.0 * 50, 50)  # weight 8 each

    noisy = central_noise(partial, dp, make_rng(14))

    assert np.std(noisy.weighted_sum - 1.0) == pytest.approx(dp.sigma * 8, rel=0.02)
    assert (noisy.total_weight, noisy.count) == (400.0, 50)
    assert np.all(partial.weighted_sum == 1.0)


def test_central_noise_leaves_an_empty_partial_alone() -> None:
    empty = Partial.zero(10)

    assert central_noise(empty, DpTerms(clip=1.0, multiplier=1.0), make_rng()) is empty


# == a device's update with the plain codecs ==================================================


def _received(update: Update) -> np.ndarray:
    """What a receiver decodes from the update's CBOR."""
    body = wire_roundtrip(update.to_body())
    return Update.from_body(body).check(SPEC).to_partial().weighted_sum


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=80, deadline=None)
@given(
    delta=hnp.arrays(np.float32, (SPEC.size,), elements=st.floats(-1e4, 1e4, width=32)),
    residual=hnp.arrays(np.float32, (SPEC.size,), elements=st.floats(-100, 100, width=32)),
    samples=st.integers(0, 5000),
    clip=st.floats(min_value=1e-3, max_value=1e3),
)
def test_decoded_update_norm_is_within_the_clip_residual_and_quantization_included(
    name: str, delta: np.ndarray, residual: np.ndarray, samples: int, clip: float
) -> None:
    dp = DpTerms(clip=clip, multiplier=1.0, weight_cap=1000.0)

    update, left = dp_update(codec_for(name), SPEC, delta, samples, residual, dp, 10, None)

    received = _received(update)
    assert sent_norm(received) <= clip
    assert (update.weight, update.count) == (1.0, 1)
    own = delta.astype(np.float64) * dp.share(samples)
    target = own * min(1.0, clip / max(float(np.linalg.norm(own)), 1e-300)) + residual
    left_over = target - received
    expected = left_over * min(1.0, clip / max(float(np.linalg.norm(left_over)), 1e-300))
    assert np.allclose(left, expected, rtol=1e-5, atol=1e-3 * (1 + abs(target).max()))
    assert np.linalg.norm(left) <= clip * (1 + 1e-6)


def test_update_below_the_clip_is_the_weighted_delta() -> None:
    dp = DpTerms(clip=10.0, multiplier=1.0, weight_cap=100.0)
    delta = make_rng(15).normal(0, 0.1, SPEC.size).astype(np.float32)

    update, left = dp_update(codec_for("float32"), SPEC, delta, 50, None, dp, 1, None)

    assert np.allclose(_received(update), delta * 0.5, atol=1e-7)
    assert np.allclose(left, 0.0, atol=1e-7)


def test_distributed_noise_is_added_but_never_fed_back() -> None:
    spec = ModelSpec.of({"w": (100, 100)})
    dp = DpTerms(clip=1.0, multiplier=3.0, noise=Noise.DISTRIBUTED, weight_cap=100.0)
    delta = np.zeros(spec.size, dtype=np.float32)
    delta[0] = 5.0  # clipped to 1, so only the clip's margin is left over

    update, left = dp_update(codec_for("float32"), spec, delta, 100, None, dp, 9, make_rng(16))

    sent = Update.from_body(update.to_body()).check(spec).to_partial().weighted_sum
    assert np.std(sent[1:]) == pytest.approx(3.0 / 3, rel=0.03)  # sigma / sqrt(9)
    assert abs(left[0]) < 1e-3 and not left[1:].any()


@pytest.mark.parametrize("name", CODECS)
def test_residual_does_not_pile_up_under_a_persistent_clip(name: str) -> None:
    dp = DpTerms(clip=0.5, multiplier=1.0, weight_cap=100.0)
    delta = make_rng(17).normal(0, 1.0, SPEC.size).astype(np.float32)  # norm ~6
    residual = None
    norms = []

    for _ in range(30):
        _, residual = dp_update(codec_for(name), SPEC, delta, 100, residual, dp, 1, None)
        norms.append(float(np.linalg.norm(residual)))

    assert max(norms) <= dp.clip * (1 + 1e-6)


# == the ledger ===========================================================================


def test_one_gaussian_round_costs_what_dp_accounting_says() -> None:
    ledger = PrivacyLedger(1e-5)

    ledger.record(1.0)

    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(dp_accounting.GaussianDpEvent(1.0))
    assert ledger.epsilon() == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
    pld = dp_accounting.get_epsilon_gaussian(1.0, 1e-5)  # the tight value, ~4.38
    assert pld <= ledger.epsilon() <= 1.15 * pld


def test_rdp_and_pld_agree_loosely_over_many_rounds() -> None:
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(5.0), 100))

    ours = gaussian_epsilon(Counter({5.0: 100}), 1e-5)

    assert pld.get_epsilon(1e-5) <= ours <= 1.3 * pld.get_epsilon(1e-5)


def test_epsilon_grows_with_rounds_and_mixed_multipliers_compose() -> None:
    ledger = PrivacyLedger(1e-5)
    assert ledger.epsilon() == 0.0

    first = ledger.record(4.0)
    second = ledger.record(2.0)

    assert 0 < first < second == pytest.approx(gaussian_epsilon(Counter({4.0: 1, 2.0: 1}), 1e-5))
    assert ledger.rounds == 2


def test_a_round_without_noise_spends_everything() -> None:
    ledger = PrivacyLedger(1e-5, budget=8.0)

    assert ledger.would_exceed(0.0)
    assert ledger.record(0.0) == math.inf


def test_ledger_says_when_one_more_round_would_pass_the_budget() -> None:
    z = calibrate(2.0, 1e-5, 10)
    ledger = PrivacyLedger(1e-5, budget=2.0)

    for _ in range(10):
        assert not ledger.would_exceed(z)
        ledger.record(z)

    assert ledger.epsilon() == pytest.approx(2.0, rel=1e-3)
    assert ledger.would_exceed(z)
    assert not PrivacyLedger(1e-5).would_exceed(z)  # no budget, never


def test_calibrated_multiplier_is_the_smallest_that_fits() -> None:
    z = calibrate(8.0, 1e-5, 50)

    assert gaussian_epsilon(Counter({z: 50}), 1e-5) <= 8.0
    assert gaussian_epsilon(Counter({z * 0.99: 50}), 1e-5) > 8.0


def test_ledger_survives_a_json_round_trip() -> None:
    ledger = PrivacyLedger(1e-6, budget=4.0)
    for z in (3.0, 2.5, 3.0):
        ledger.record(z)

    back = PrivacyLedger.from_json(ledger.to_json())

    assert back == ledger and back.epsilon() == ledger.epsilon()


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        "not json",
        '{"delta": 1e-5, "budget": null}',
        '{"delta": 1e-5, "budget": null, "history": [-1.0]}',
        '{"delta": 2.0, "budget": null, "history": []}',
        '{"delta": 1e-5, "budget": "x", "history": []}',
        '{"delta": 1e-5, "budget": null, "history": [true]}',
    ],
)
def test_ledger_refuses_a_damaged_file(text: str) -> None:
    with pytest.raises(MalformedMessage):
        PrivacyLedger.from_json(text)


def test_devices_never_load_the_accountant() -> None:
    code = (
        "import sys, tern.privacy, tern.privacy.clip, tern.secagg.ring, tern.messages;"
        "print('dp_accounting' in sys.modules)"
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "False"
