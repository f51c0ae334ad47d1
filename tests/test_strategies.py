"""Server strategies (tern.strategies): FedAvg bit for bit as before, FedAdam, their state."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tern.aggregate import Partial, mean
from tern.errors import ShapeMismatch, TernError
from tern.policy import KNOWN_STRATEGIES, STRATEGY_PARAMS, PolicyError, StrategySpec
from tern.strategies import FedAdam, FedAvg, ServerState, Strategy, strategy_from

F32 = np.float32


def _old_fedavg_apply(
    server_lr: float, momentum_coef: float, weights: np.ndarray, momentum: np.ndarray, p: Partial
) -> tuple[np.ndarray, np.ndarray]:
    """coordinator/strategy.py FedAvg.apply before tern.strategies, verbatim: the oracle
    every saved model and momentum buffer was made with."""
    delta = mean(p)
    if momentum_coef == 0:
        step = delta
    else:
        step = (np.float32(momentum_coef) * momentum + delta).astype(np.float32)
    if server_lr == 1.0:
        new = (weights + step).astype(np.float32)
    else:
        new = (weights + np.float32(server_lr) * step).astype(np.float32)
    return new, step.copy()


def _partial(values: list[float], weight: float, count: int = 2) -> Partial:
    return Partial(np.asarray(values, dtype=F32), weight, count)


def _fedavg_state(momentum: np.ndarray) -> ServerState:
    return ServerState(0, {"momentum": momentum})


@st.composite
def fedavg_cases(
    draw: st.DrawFn,
) -> tuple[float, float, np.ndarray, np.ndarray, Partial]:
    n = draw(st.integers(min_value=0, max_value=16))
    # every float32, NaN and infinity included: the old arithmetic defined them all
    arrays = hnp.arrays(F32, (n,), elements=st.floats(width=32))
    lr = draw(st.just(1.0) | st.floats(min_value=1e-6, max_value=100.0))
    momentum = draw(st.just(0.0) | st.floats(min_value=0.0, max_value=0.999))
    weight = draw(st.just(0.0) | st.floats(min_value=1e-6, max_value=1e12))
    count = draw(st.integers(min_value=0, max_value=50))
    return lr, momentum, draw(arrays), draw(arrays), Partial(draw(arrays), weight, count)


@settings(max_examples=300, deadline=None)
@given(case=fedavg_cases())
def test_fedavg_gives_the_same_bits_as_the_coordinators_old_fedavg(
    case: tuple[float, float, np.ndarray, np.ndarray, Partial],
) -> None:
    lr, momentum, w, m, p = case

    with np.errstate(all="ignore"):
        want_w, want_m = _old_fedavg_apply(lr, momentum, w, m, p)
        got_w, state = FedAvg(lr, momentum).apply(w, _fedavg_state(m), p)

    assert got_w.dtype == np.float32 and got_w.tobytes() == want_w.tobytes()
    assert state.buffers["momentum"].tobytes() == want_m.tobytes()
    assert state.step == 1


def test_fedavg_with_lr_one_and_no_momentum_is_weights_plus_mean_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal(50, dtype=F32)
    p = Partial(rng.standard_normal(50, dtype=F32), 7.0, 3)

    new, state = FedAvg().apply(w, FedAvg().init_state(50), p)

    assert new.tobytes() == (w + mean(p)).tobytes()
    assert state.buffers["momentum"].tobytes() == mean(p).tobytes()


def test_fedavg_scales_the_mean_by_the_server_learning_rate() -> None:
    new, _ = FedAvg(server_lr=0.5).apply(
        np.zeros(3, dtype=F32), FedAvg().init_state(3), _partial([2.0, -4.0, 6.0], 2.0)
    )

    np.testing.assert_array_equal(new, np.asarray([0.5, -1.0, 1.5], dtype=F32))


def test_fedavg_momentum_accumulates_over_rounds() -> None:
    strategy = FedAvg(server_lr=1.0, momentum=0.5)
    p = _partial([1.0, -2.0], 1.0)

    w1, s1 = strategy.apply(np.zeros(2, dtype=F32), strategy.init_state(2), p)
    w2, s2 = strategy.apply(w1, s1, p)

    np.testing.assert_array_equal(s1.buffers["momentum"], [1.0, -2.0])
    np.testing.assert_array_equal(s2.buffers["momentum"], [1.5, -3.0])  # 0.5 * m1 + mean
    np.testing.assert_array_equal(w2, [2.5, -5.0])
    assert s2.step == 2


@pytest.mark.parametrize("strategy", [FedAvg(2.0, 0.9), FedAdam(lr=0.1)], ids=["avg", "adam"])
def test_a_strategy_does_not_modify_its_inputs(strategy: Strategy) -> None:
    w = np.ones(2, dtype=F32)
    state = strategy.apply(w, strategy.init_state(2), _partial([1.0, 1.0], 1.0))[1]
    before = state.to_arrays()
    p = _partial([3.0, -1.0], 2.0)

    strategy.apply(w, state, p)

    np.testing.assert_array_equal(w, [1.0, 1.0])
    np.testing.assert_array_equal(p.weighted_sum, [3.0, -1.0])
    assert ServerState.from_arrays(before, state.step).same_as(state)


@pytest.mark.parametrize(("lr", "momentum"), [(0.0, 0.0), (-1.0, 0.0), (1.0, 1.0), (1.0, -0.1)])
def test_fedavg_refuses_bad_hyperparameters(lr: float, momentum: float) -> None:
    with pytest.raises(ValueError):
        FedAvg(server_lr=lr, momentum=momentum)


@pytest.mark.parametrize(
    "params",
    [{"lr": 0.0}, {"beta1": 1.0}, {"beta2": -0.1}, {"tau": 0.0}, {"lr": float("nan")}],
)
def test_fedadam_refuses_bad_hyperparameters(params: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FedAdam(**params)


def test_fedadam_takes_the_steps_of_the_paper() -> None:
    strategy = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    w0 = np.asarray([0.0, 1.0], dtype=F32)
    p = _partial([2.0, -4.0], 2.0)  # mean [1, -2]

    w1, s1 = strategy.apply(w0, strategy.init_state(2), p)
    w2, s2 = strategy.apply(w1, s1, p)

    # by hand: m1 = 0.1 d, v1 = 0.01 d^2; m2 = 0.19 d, v2 = 0.0199 d^2
    np.testing.assert_allclose(s1.buffers["m"], [0.1, -0.2], rtol=1e-6)
    np.testing.assert_allclose(s1.buffers["v"], [0.01, 0.04], rtol=1e-6)
    np.testing.assert_allclose(w1, [0.1 * 0.1 / 0.101, 1 - 0.1 * 0.2 / 0.201], rtol=1e-6)
    np.testing.assert_allclose(s2.buffers["m"], [0.19, -0.38], rtol=1e-6)
    np.testing.assert_allclose(s2.buffers["v"], [0.0199, 0.0796], rtol=1e-6)
    step2 = [0.19 / (0.0199**0.5 + 1e-3), -0.38 / (0.0796**0.5 + 1e-3)]
    np.testing.assert_allclose(
        w2, np.asarray(w1, dtype=np.float64) + 0.1 * np.asarray(step2), rtol=1e-6
    )
    assert w2.dtype == np.float32 and (s2.step, s1.step) == (2, 1)


def test_fedadam_on_an_empty_partial_leaves_weights_and_state_unchanged() -> None:
    strategy = FedAdam(lr=0.1)
    w = np.asarray([0.5, -0.5], dtype=F32)
    _, state = strategy.apply(w, strategy.init_state(2), _partial([1.0, 1.0], 1.0))

    new, after = strategy.apply(w, state, Partial.zero(2))

    assert new.tobytes() == w.tobytes()
    assert after.same_as(state)


finite32 = st.floats(min_value=-1e6, max_value=1e6, width=32)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=12),
    data=st.data(),
    lr=st.floats(min_value=1e-6, max_value=10.0),
    beta1=st.floats(min_value=0.0, max_value=0.999),
    beta2=st.floats(min_value=0.0, max_value=0.999),
    tau=st.floats(min_value=1e-9, max_value=1.0),
)
def test_fedadam_stays_finite_and_float32_for_finite_inputs(
    n: int, data: st.DataObject, lr: float, beta1: float, beta2: float, tau: float
) -> None:
    strategy = FedAdam(lr, beta1, beta2, tau)
    w = data.draw(hnp.arrays(F32, (n,), elements=finite32))
    state = strategy.init_state(n)
    for _ in range(3):
        s = data.draw(hnp.arrays(F32, (n,), elements=finite32))
        weight = data.draw(st.floats(min_value=1.0, max_value=1e4))
        w, state = strategy.apply(w, state, Partial(s, weight, 1))

        assert w.dtype == np.float32 and np.isfinite(w).all()
        assert all(np.isfinite(b).all() and b.dtype == np.float32 for b in state.buffers.values())


@pytest.mark.parametrize("strategy", [FedAvg(0.5, 0.9), FedAdam(lr=0.05)], ids=["avg", "adam"])
def test_a_state_saved_as_arrays_resumes_with_the_same_bits(strategy: Strategy) -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal(20, dtype=F32)
    p = Partial(rng.standard_normal(20, dtype=F32), 4.0, 2)
    w, state = strategy.apply(w, strategy.init_state(20), p)

    saved = {name: a.copy() for name, a in state.to_arrays().items()}  # as .npy files would
    resumed = ServerState.from_arrays(saved, step=state.step)

    assert resumed.same_as(state)
    a, sa = strategy.apply(w, state, p)
    b, sb = strategy.apply(w, resumed, p)
    assert a.tobytes() == b.tobytes() and sa.same_as(sb)


def test_fedavg_keeps_its_momentum_in_the_buffer_the_store_saves_as_m_npy() -> None:
    assert list(FedAvg().init_state(3).buffers) == ["momentum"]
    assert sorted(FedAdam().init_state(3).buffers) == ["m", "v"]


def test_a_server_state_is_a_value_its_sources_cannot_change() -> None:
    source = np.zeros(3, dtype=F32)
    state = ServerState(0, {"momentum": source})

    source[0] = 7.0
    out = state.to_arrays()
    out["momentum"][1] = 9.0

    np.testing.assert_array_equal(state.buffers["momentum"], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        state.buffers["momentum"][0] = 1.0


@pytest.mark.parametrize(
    ("step", "buffers", "error"),
    [
        (-1, {}, ValueError),
        (0, {"m": np.zeros(2, dtype=np.float64)}, ValueError),
        (0, {"M": np.zeros(2, dtype=F32)}, ValueError),
        (0, {"m": np.zeros((2, 2), dtype=F32)}, ShapeMismatch),
        (0, {"m": np.zeros(2, dtype=F32), "v": np.zeros(3, dtype=F32)}, ShapeMismatch),
    ],
    ids=["negative-step", "float64", "bad-name", "not-flat", "sizes-differ"],
)
def test_a_server_state_refuses_buffers_it_cannot_persist(
    step: int, buffers: dict[str, np.ndarray], error: type[Exception]
) -> None:
    with pytest.raises(error):
        ServerState(step, buffers)


def test_apply_refuses_another_strategys_state_or_another_size() -> None:
    w, p = np.zeros(3, dtype=F32), _partial([1.0, 2.0, 3.0], 1.0)

    with pytest.raises(ShapeMismatch):
        FedAvg().apply(w, FedAdam().init_state(3), p)
    with pytest.raises(ShapeMismatch):
        FedAdam().apply(w, FedAvg().init_state(3), p)
    with pytest.raises(ShapeMismatch):
        FedAvg().apply(w, FedAvg().init_state(4), p)
    with pytest.raises(ShapeMismatch):
        FedAvg().apply(np.zeros(4, dtype=F32), FedAvg().init_state(4), p)


def test_strategy_from_the_default_spec_is_plain_fedavg() -> None:
    assert strategy_from(StrategySpec()) == FedAvg(1.0, 0.0)


def test_strategy_from_passes_the_specs_parameters_and_defaults_the_rest() -> None:
    assert strategy_from(StrategySpec.of("fedavg", lr=0.5, momentum=0.9)) == FedAvg(0.5, 0.9)
    assert strategy_from(StrategySpec.of("fedadam", lr=0.2, tau=1e-4)) == FedAdam(
        lr=0.2, beta1=0.9, beta2=0.99, tau=1e-4
    )


@pytest.mark.parametrize("name", sorted(KNOWN_STRATEGIES))
def test_every_known_strategy_builds_under_its_name_with_its_parameters(name: str) -> None:
    strategy = strategy_from(StrategySpec(name))

    assert strategy.name == name
    assert strategy.init_state(2).step == 0
    assert set(STRATEGY_PARAMS[name]) == set(StrategySpec(name).values())


@pytest.mark.parametrize(
    "spec",
    [StrategySpec("fedprox"), StrategySpec("fedavg", (("mu", 0.01),))],
    ids=["unknown-strategy", "unknown-parameter"],
)
def test_strategy_from_refuses_what_this_build_cannot_run(spec: StrategySpec) -> None:
    with pytest.raises(PolicyError) as info:
        strategy_from(spec)

    assert isinstance(info.value, TernError)
    assert info.value.reason == "policy_unsupported"
