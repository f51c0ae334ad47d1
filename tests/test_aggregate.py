"""Partial aggregates: fold, the in-place Accumulator, fold_sorted and mean."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.aggregate import Accumulator, Partial, fold, fold_sorted, mean
from tern.errors import ShapeMismatch

SIZE = 9

values = st.floats(min_value=-1e6, max_value=1e6, width=32)
weights = st.floats(min_value=0.0, max_value=1e4)


def partials(size: int = SIZE) -> st.SearchStrategy[Partial]:
    return st.builds(
        lambda ws, w, c: Partial(np.array(ws, dtype=np.float32), w, c),
        st.lists(values, min_size=size, max_size=size),
        weights,
        st.integers(min_value=0, max_value=1000),
    )


def _random_partial(rng: np.random.Generator, size: int = SIZE) -> Partial:
    return Partial(
        (rng.standard_normal(size) * 10.0 ** rng.integers(-3, 4)).astype(np.float32),
        float(rng.uniform(0.5, 50.0)),
        int(rng.integers(1, 20)),
    )


def _copy(p: Partial) -> Partial:
    return Partial(p.weighted_sum.copy(), p.total_weight, p.count)


def _same_bits(a: Partial, b: Partial) -> bool:
    return (
        a.weighted_sum.dtype == b.weighted_sum.dtype
        and a.weighted_sum.tobytes() == b.weighted_sum.tobytes()
        and a.total_weight == b.total_weight
        and a.count == b.count
    )


def _fold_all(parts: list[Partial], size: int = SIZE) -> Partial:
    out = Partial.zero(size)
    for p in parts:
        out = fold(out, p)
    return out


# -- fold ----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(a=partials(), b=partials())
def test_fold_leaves_its_inputs_unchanged(a: Partial, b: Partial) -> None:
    # prepare
    a_before, b_before = _copy(a), _copy(b)

    # act
    out = fold(a, b)

    # assert
    assert _same_bits(a, a_before)
    assert _same_bits(b, b_before)
    assert out.weighted_sum is not a.weighted_sum
    assert out.weighted_sum is not b.weighted_sum


@settings(max_examples=100, deadline=None)
@given(a=partials(), b=partials())
def test_fold_adds_sums_weights_and_counts(a: Partial, b: Partial) -> None:
    # act
    out = fold(a, b)

    # assert
    assert out.weighted_sum.dtype == np.float32
    np.testing.assert_array_equal(out.weighted_sum, a.weighted_sum + b.weighted_sum)
    assert out.total_weight == a.total_weight + b.total_weight
    assert out.count == a.count + b.count


@settings(max_examples=100, deadline=None)
@given(a=partials(), b=partials())
def test_fold_of_two_is_commutative(a: Partial, b: Partial) -> None:
    # act
    ab = fold(a, b)
    ba = fold(b, a)

    # assert: IEEE addition of two operands is commutative, bit for bit
    assert _same_bits(ab, ba)


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(partials(), min_size=2, max_size=6), data=st.data())
def test_fold_is_commutative_in_value_for_any_order(parts: list[Partial], data: Any) -> None:
    # prepare
    shuffled = data.draw(st.permutations(parts))
    scale = sum(float(np.abs(p.weighted_sum).max()) for p in parts)

    # act
    forward = _fold_all(parts)
    other = _fold_all(list(shuffled))

    # assert
    np.testing.assert_allclose(
        forward.weighted_sum, other.weighted_sum, rtol=1e-5, atol=scale * 1e-6
    )
    assert forward.total_weight == pytest.approx(other.total_weight)
    assert forward.count == other.count


def test_fold_rejects_partials_of_different_sizes() -> None:
    # prepare
    a, b = Partial.zero(3), Partial.zero(4)

    # act / assert
    with pytest.raises(ShapeMismatch):
        fold(a, b)


def test_zero_partial_is_the_identity_of_fold() -> None:
    # prepare
    p = _random_partial(np.random.default_rng(0))

    # act
    out = fold(Partial.zero(SIZE), p)

    # assert
    assert _same_bits(out, p)


# -- Accumulator ---------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(partials(), max_size=8))
def test_accumulator_add_is_bit_identical_to_fold_in_the_same_order(parts: list[Partial]) -> None:
    # prepare
    acc = Accumulator(SIZE)
    expected = _fold_all(parts)

    # act
    for p in parts:
        acc.add(p)

    # assert
    assert _same_bits(acc.result(), expected)


@pytest.mark.parametrize("seed", range(5))
def test_accumulator_matches_fold_on_large_mixed_magnitude_partials(seed: int) -> None:
    # prepare: magnitudes from 1e-3 to 1e3, where order matters for the bits
    rng = np.random.default_rng(seed)
    parts = [_random_partial(rng, 4096) for _ in range(25)]
    acc = Accumulator(4096)

    # act
    for p in parts:
        acc.add(p)

    # assert
    assert _same_bits(acc.result(), _fold_all(parts, 4096))


def test_accumulator_add_leaves_the_partial_unchanged() -> None:
    # prepare
    p = _random_partial(np.random.default_rng(1))
    before = _copy(p)
    acc = Accumulator(SIZE)
    acc.add(_random_partial(np.random.default_rng(2)))

    # act
    acc.add(p)

    # assert
    assert _same_bits(p, before)


def test_accumulator_result_is_a_copy() -> None:
    # prepare
    acc = Accumulator(SIZE)
    acc.add(_random_partial(np.random.default_rng(3)))
    first = acc.result()
    snapshot = _copy(first)

    # act
    acc.add(_random_partial(np.random.default_rng(4)))

    # assert
    assert _same_bits(first, snapshot)
    assert not _same_bits(acc.result(), snapshot)


def test_accumulator_rejects_partial_of_another_size_and_stays_unchanged() -> None:
    # prepare
    acc = Accumulator(SIZE)
    acc.add(_random_partial(np.random.default_rng(5)))
    before = acc.result()

    # act / assert
    with pytest.raises(ShapeMismatch):
        acc.add(Partial.zero(SIZE + 1))
    assert _same_bits(acc.result(), before)


def test_new_accumulator_holds_the_zero_partial() -> None:
    # act
    result = Accumulator(SIZE).result()

    # assert
    assert _same_bits(result, Partial.zero(SIZE))


# -- fold_sorted ---------------------------------------------------------------------

sender_ids = st.text(alphabet="abcdefghij-0123456789", min_size=1, max_size=6)


@settings(max_examples=80, deadline=None)
@given(
    named=st.lists(st.tuples(sender_ids, partials()), max_size=7, unique_by=lambda t: t[0]),
    data=st.data(),
)
def test_fold_sorted_is_independent_of_input_order(
    named: list[tuple[str, Partial]], data: Any
) -> None:
    # prepare
    shuffled = data.draw(st.permutations(named))

    # act
    a = fold_sorted(named, SIZE)
    b = fold_sorted(shuffled, SIZE)

    # assert
    assert _same_bits(a, b)


@settings(max_examples=80, deadline=None)
@given(named=st.lists(st.tuples(sender_ids, partials()), max_size=7, unique_by=lambda t: t[0]))
def test_fold_sorted_folds_in_ascending_sender_id_order(named: list[tuple[str, Partial]]) -> None:
    # prepare
    in_order = [p for _, p in sorted(named, key=lambda t: t[0])]

    # act
    got = fold_sorted(named, SIZE)

    # assert
    assert _same_bits(got, _fold_all(in_order))


def test_fold_sorted_bits_do_not_depend_on_arrival_order_where_plain_fold_does() -> None:
    # prepare: values whose float32 sum depends on the order of addition
    big, small = np.float32(1e8), np.float32(3.0)
    named = [
        ("dev-a", Partial(np.array([big], dtype=np.float32), 1.0, 1)),
        ("dev-b", Partial(np.array([small], dtype=np.float32), 1.0, 1)),
        ("dev-c", Partial(np.array([-big], dtype=np.float32), 1.0, 1)),
        ("dev-d", Partial(np.array([small], dtype=np.float32), 1.0, 1)),
    ]
    orders = list(itertools.permutations(named))
    plain = {_fold_all([p for _, p in o], 1).weighted_sum.tobytes() for o in orders}

    # act
    sorted_bits = {fold_sorted(list(o), 1).weighted_sum.tobytes() for o in orders}

    # assert
    assert len(plain) > 1
    assert len(sorted_bits) == 1


def test_fold_sorted_of_nothing_is_zero() -> None:
    # act
    got = fold_sorted([], SIZE)

    # assert
    assert _same_bits(got, Partial.zero(SIZE))


def test_fold_sorted_leaves_its_inputs_unchanged() -> None:
    # prepare
    rng = np.random.default_rng(6)
    named = [(f"dev-{i}", _random_partial(rng)) for i in range(4)]
    before = [_copy(p) for _, p in named]

    # act
    fold_sorted(named, SIZE)

    # assert
    assert all(_same_bits(p, b) for (_, p), b in zip(named, before, strict=True))


# -- mean ----------------------------------------------------------------------------


def test_mean_weights_each_contribution() -> None:
    # prepare: device deltas 1 (weight 1) and 4 (weight 3): mean (1 + 12) / 4
    a = Partial(np.array([1.0, -2.0], dtype=np.float32) * 1.0, 1.0, 1)
    b = Partial(np.array([4.0, 2.0], dtype=np.float32) * 3.0, 3.0, 1)

    # act
    got = mean(fold(a, b))

    # assert
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [13.0 / 4.0, 4.0 / 4.0], rtol=1e-7)


@settings(max_examples=80, deadline=None)
@given(
    deltas=st.lists(
        st.tuples(
            st.lists(
                st.floats(min_value=-100, max_value=100, width=32), min_size=SIZE, max_size=SIZE
            ),
            st.floats(min_value=0.01, max_value=100),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_mean_is_the_weighted_average_of_device_deltas(
    deltas: list[tuple[list[float], float]],
) -> None:
    # prepare
    parts = [
        Partial((np.array(d, dtype=np.float32) * np.float32(w)).astype(np.float32), w, 1)
        for d, w in deltas
    ]
    expected = sum(np.array(d, dtype=np.float64) * w for d, w in deltas) / sum(w for _, w in deltas)

    # act
    got = mean(_fold_all(parts))

    # assert
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_mean_is_the_same_for_a_hierarchy_of_partials() -> None:
    # prepare: four devices under two gateways, versus all four at the coordinator
    rng = np.random.default_rng(7)
    devices = [_random_partial(rng) for _ in range(4)]
    gateways = [_fold_all(devices[:2]), _fold_all(devices[2:])]

    # act
    flat = mean(_fold_all(devices))
    nested = mean(_fold_all(gateways))

    # assert
    np.testing.assert_allclose(nested, flat, rtol=1e-5, atol=1e-6)
    assert _fold_all(gateways).count == sum(d.count for d in devices)


@pytest.mark.parametrize("size", [0, 1, SIZE])
def test_mean_of_zero_partial_is_zero(size: int) -> None:
    # act
    got = mean(Partial.zero(size))

    # assert
    assert got.shape == (size,)
    assert got.dtype == np.float32
    assert not got.any()


def test_mean_is_zero_when_nothing_arrived_even_if_the_sum_is_not() -> None:
    # prepare: a partial with no contributors, or with no weight, says nothing
    no_count = Partial(np.ones(SIZE, dtype=np.float32), 2.0, 0)
    no_weight = Partial(np.ones(SIZE, dtype=np.float32), 0.0, 3)

    # act
    got = [mean(no_count), mean(no_weight)]

    # assert
    assert all(g.shape == (SIZE,) and not g.any() for g in got)
