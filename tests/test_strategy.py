"""The coordinator's strategy: FedAvg with server lr and momentum, and seeded sampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.strategy import FedAvg, sample_participants
from tern.aggregate import Partial, mean

DEVICES = [f"dev-{i:02d}" for i in range(10)]


def _partial(values: list[float], weight: float, count: int = 2) -> Partial:
    return Partial(np.asarray(values, dtype=np.float32), weight, count)


def test_fedavg_with_lr_one_and_no_momentum_is_weights_plus_mean_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal(50, dtype=np.float32)
    p = Partial(rng.standard_normal(50, dtype=np.float32), 7.0, 3)

    new, m = FedAvg().apply(w, np.zeros(50, dtype=np.float32), p)

    assert new.dtype == np.float32
    assert new.tobytes() == (w + mean(p)).tobytes()
    assert m.tobytes() == mean(p).tobytes()


def test_fedavg_scales_the_mean_by_the_server_learning_rate() -> None:
    w = np.zeros(3, dtype=np.float32)
    p = _partial([2.0, -4.0, 6.0], 2.0)

    new, _ = FedAvg(server_lr=0.5).apply(w, np.zeros(3, dtype=np.float32), p)

    np.testing.assert_array_equal(new, np.asarray([0.5, -1.0, 1.5], dtype=np.float32))


def test_fedavg_momentum_accumulates_over_rounds() -> None:
    strategy = FedAvg(server_lr=1.0, momentum=0.5)
    w, m = np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.float32)
    p = _partial([1.0, -2.0], 1.0)

    w1, m1 = strategy.apply(w, m, p)
    w2, m2 = strategy.apply(w1, m1, p)

    np.testing.assert_array_equal(m1, [1.0, -2.0])
    np.testing.assert_array_equal(m2, [1.5, -3.0])  # 0.5 * m1 + mean
    np.testing.assert_array_equal(w2, [2.5, -5.0])


def test_fedavg_does_not_modify_its_inputs() -> None:
    w, m = np.ones(2, dtype=np.float32), np.ones(2, dtype=np.float32)
    p = _partial([1.0, 1.0], 1.0)

    FedAvg(server_lr=2.0, momentum=0.9).apply(w, m, p)

    np.testing.assert_array_equal(w, [1.0, 1.0])
    np.testing.assert_array_equal(m, [1.0, 1.0])


@pytest.mark.parametrize(("lr", "momentum"), [(0.0, 0.0), (-1.0, 0.0), (1.0, 1.0), (1.0, -0.1)])
def test_fedavg_refuses_bad_hyperparameters(lr: float, momentum: float) -> None:
    with pytest.raises(ValueError):
        FedAvg(server_lr=lr, momentum=momentum)


def test_sampling_with_a_seed_is_deterministic() -> None:
    a = sample_participants(DEVICES, 0.3, np.random.default_rng([7, 1]))
    b = sample_participants(list(reversed(DEVICES)), 0.3, np.random.default_rng([7, 1]))

    assert a == b


def test_sampling_everyone_returns_none() -> None:
    assert sample_participants(DEVICES, 1.0, np.random.default_rng(0)) is None


@given(
    n=st.integers(min_value=1, max_value=40),
    fraction=st.floats(min_value=0.01, max_value=0.99),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_sampling_respects_the_fraction(n: int, fraction: float, seed: int) -> None:
    devices = [f"d{i}" for i in range(n)]

    picked = sample_participants(devices, fraction, np.random.default_rng(seed))

    k = max(1, int(np.ceil(fraction * n)))
    if k >= n:
        assert picked is None
    else:
        assert picked is not None
        assert len(picked) == k == len(set(picked))
        assert list(picked) == sorted(picked)
        assert set(picked) <= set(devices)


def test_sampling_refuses_a_fraction_outside_zero_one() -> None:
    with pytest.raises(ValueError):
        sample_participants(DEVICES, 0.0, np.random.default_rng(0))
