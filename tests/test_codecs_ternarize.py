"""Ternary quantization rules (tern.quantize): what each rule makes of a tensor, how close it
stays, and how the stochastic rule draws.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.quantize import TernaryRule, ternarize
from tests.codec_strategies import ALL_RULES, f32_arrays
from tests.helpers import make_rng

DETERMINISTIC_RULES = [r for r in TernaryRule if r is not TernaryRule.STOCHASTIC]
# Values whose squares do not overflow float64 sums and that are not subnormal, so
# error comparisons are about the rule, not about rounding at the edge of the range.
moderate_f32 = st.floats(min_value=-1e6, max_value=1e6, width=32, allow_subnormal=False) | st.just(
    0.0
)


def _l2_error(x: np.ndarray, trits: np.ndarray, scale: np.float32) -> float:
    x64 = x.astype(np.float64)
    return float(np.sum((x64 - float(scale) * trits.astype(np.float64)) ** 2))


# == tern.quantize ==================================================================


@pytest.mark.parametrize("rule", ALL_RULES)
@settings(max_examples=60, deadline=None)
@given(x=f32_arrays())
def test_ternarize_returns_trits_of_input_shape_and_finite_nonnegative_scale(
    rule: TernaryRule, x: np.ndarray
) -> None:
    # act
    trits, scale = ternarize(x, rule, make_rng())

    # assert
    assert trits.shape == x.shape
    assert trits.dtype == np.int8
    assert set(np.unique(trits).tolist()) <= {-1, 0, 1}
    assert isinstance(scale, np.float32)
    assert np.isfinite(scale)
    assert scale >= 0
    # a kept value never has the opposite sign of its input
    assert np.all(trits.astype(np.float64) * x.astype(np.float64) >= 0)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 4), ()])
def test_ternarize_maps_zeros_to_zero_trits_and_zero_scale(
    rule: TernaryRule, shape: tuple[int, ...]
) -> None:
    # prepare
    x = np.zeros(shape, dtype=np.float32)

    # act
    trits, scale = ternarize(x, rule, make_rng())

    # assert
    assert trits.shape == shape
    assert not trits.any()
    assert scale == 0.0


@pytest.mark.parametrize("rule", ALL_RULES)
def test_ternarize_keeps_the_largest_magnitude(rule: TernaryRule) -> None:
    # prepare
    x = np.array([0.1, -3.0, 0.2, 0.05], dtype=np.float32)

    # act
    trits, scale = ternarize(x, rule, make_rng())

    # assert
    assert trits[1] == -1
    assert scale > 0


@pytest.mark.parametrize("other", [TernaryRule.THRESHOLD, TernaryRule.MAX_ROUND])
@settings(max_examples=80, deadline=None)
@given(x=f32_arrays(moderate_f32))
def test_optimal_rule_error_is_at_most_other_deterministic_rules(
    other: TernaryRule, x: np.ndarray
) -> None:
    # act
    t_opt, s_opt = ternarize(x, TernaryRule.OPTIMAL)
    t_other, s_other = ternarize(x, other)

    # assert: exact minimiser over support sets; slack only for the float32 scale
    e_opt = _l2_error(x, t_opt, s_opt)
    e_other = _l2_error(x, t_other, s_other)
    assert e_opt <= e_other * (1 + 1e-6) + 1e-30


@pytest.mark.parametrize("seed", range(20))
def test_optimal_rule_error_is_at_most_threshold_and_max_round_on_random_tensors(
    seed: int,
) -> None:
    # prepare: heavy-tailed, like real gradient deltas
    rng = make_rng(seed)
    x = (rng.standard_t(df=3, size=int(rng.integers(1, 2000))) * 1e-3).astype(np.float32)

    # act
    errors = {rule: _l2_error(x, *ternarize(x, rule)) for rule in DETERMINISTIC_RULES}

    # assert
    best = errors[TernaryRule.OPTIMAL]
    assert best <= errors[TernaryRule.THRESHOLD] * (1 + 1e-6)
    assert best <= errors[TernaryRule.MAX_ROUND] * (1 + 1e-6)


@settings(max_examples=100, deadline=None)
@given(x=f32_arrays(moderate_f32).filter(lambda a: bool(np.any(a))))
def test_optimal_rule_is_contractive(x: np.ndarray) -> None:
    # act
    trits, scale = ternarize(x, TernaryRule.OPTIMAL)

    # assert
    assert _l2_error(x, trits, scale) < float(np.sum(x.astype(np.float64) ** 2))


def test_optimal_rule_picks_the_support_that_minimises_error() -> None:
    # prepare: sum of the k largest |x| is 4, 7, 8, 9, so S**2 / k is 16, 24.5, 21.3,
    # 20.25: keep {4, -3} at scale 3.5, error 1 + 0.25 + 0.25 + 1 = 2.5
    x = np.array([1.0, 4.0, -3.0, 1.0], dtype=np.float32)

    # act
    trits, scale = ternarize(x, TernaryRule.OPTIMAL)

    # assert
    assert trits.tolist() == [0, 1, -1, 0]
    assert scale == np.float32(3.5)
    assert _l2_error(x, trits, scale) == 2.5


def test_stochastic_rule_requires_a_generator() -> None:
    # prepare
    x = np.array([0.5, -1.0, 0.25], dtype=np.float32)

    # act / assert
    with pytest.raises(ValueError, match="Generator"):
        ternarize(x, TernaryRule.STOCHASTIC)


@settings(max_examples=30, deadline=None)
@given(x=f32_arrays(), seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_stochastic_rule_is_deterministic_for_the_same_seed(x: np.ndarray, seed: int) -> None:
    # act
    first = ternarize(x, TernaryRule.STOCHASTIC, make_rng(seed))
    second = ternarize(x, TernaryRule.STOCHASTIC, make_rng(seed))

    # assert
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]


def test_stochastic_rule_differs_across_seeds() -> None:
    # prepare
    x = np.linspace(-1, 1, 200, dtype=np.float32)

    # act
    draws = {ternarize(x, TernaryRule.STOCHASTIC, make_rng(s))[0].tobytes() for s in range(5)}

    # assert
    assert len(draws) > 1


def test_stochastic_rule_is_unbiased_on_average() -> None:
    # prepare
    x = np.array([1.0, -0.5, 0.25, -0.1, 0.0, 0.75], dtype=np.float32)
    rng = make_rng(3)
    draws = 4000

    # act
    total = np.zeros(x.size, dtype=np.float64)
    for _ in range(draws):
        trits, scale = ternarize(x, TernaryRule.STOCHASTIC, rng)
        total += float(scale) * trits

    # assert: standard error of each mean is at most 0.5 / sqrt(4000) ~ 0.008
    np.testing.assert_allclose(total / draws, x, atol=0.04)


@pytest.mark.parametrize("rule", DETERMINISTIC_RULES)
def test_deterministic_rules_ignore_the_generator(rule: TernaryRule) -> None:
    # prepare
    x = make_rng(5).standard_normal(64).astype(np.float32)

    # act
    without = ternarize(x, rule)
    with_rng = ternarize(x, rule, make_rng(99))

    # assert
    np.testing.assert_array_equal(without[0], with_rng[0])
    assert without[1] == with_rng[1]
