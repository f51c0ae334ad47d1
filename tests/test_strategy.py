"""The coordinator's strategy module: seeded sampling, and tern's strategies re-exported."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import coordinator.strategy
import tern.strategies
from coordinator.strategy import sample_participants

DEVICES = [f"dev-{i:02d}" for i in range(10)]


def test_the_coordinator_uses_the_protocol_layers_strategies() -> None:
    # FedAvg's arithmetic and FedAdam are tested in tests/test_strategies.py
    assert coordinator.strategy.FedAvg is tern.strategies.FedAvg
    assert coordinator.strategy.strategy_from is tern.strategies.strategy_from


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
