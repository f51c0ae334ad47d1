"""Trit packing: the wire layout of tern.trits, its validation and the fast decode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tern.errors import InvalidTrits, TernError
from tern.trits import (
    MAX_BYTE,
    accumulate_packed,
    pack,
    pack_cut,
    packed_size,
    unpack,
    validate_packed,
)

trit_arrays = hnp.arrays(
    np.int8,
    st.integers(min_value=0, max_value=200),
    elements=st.integers(min_value=-1, max_value=1),
)


def _random_trits(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(-1, 2, size=n).astype(np.int8)


def _slot(pos: int, n: int) -> tuple[int, int]:
    """(byte, base-3 digit) that carries padded position `pos`, per the documented layout."""
    nb = -(-n // 5)
    if pos < 4 * nb:
        return pos // 4, pos % 4
    return pos - 4 * nb, 4


# -- exact bytes, computed by hand from the documented layout -----------------------
#
# byte[i] = (h[4i]+1) + 3(h[4i+1]+1) + 9(h[4i+2]+1) + 27(h[4i+3]+1) + 81(t[i]+1),
# head h = the first 4*nb padded values, tail t = the last nb, padding is trit 0.

PACKING_VECTORS = [
    pytest.param([], b"", id="0-trits"),
    # one trit: head [+1, pad, pad, pad], tail [pad] -> 2 + 3 + 9 + 27 + 81
    pytest.param([1], bytes([122]), id="1-trit-plus"),
    # 0 + 3 + 9 + 27 + 81
    pytest.param([-1], bytes([120]), id="1-trit-minus"),
    # every digit 1
    pytest.param([0], bytes([121]), id="1-trit-zero"),
    # topics.md example: head [+1, 0, -1, +1], tail [+1] -> 2 + 3 + 0 + 54 + 162
    pytest.param([1, 0, -1, 1, 1], bytes([0xDD]), id="5-trits-topics-example"),
    # head [+1, -1, 0, +1], tail [-1] -> 2 + 0 + 9 + 54 + 0
    pytest.param([1, -1, 0, 1, -1], bytes([65]), id="5-trits"),
    pytest.param([-1] * 5, bytes([0]), id="5-trits-all-minus"),
    pytest.param([1] * 5, bytes([242]), id="5-trits-all-plus"),
    # nb = 2: head = t0..t5, pad, pad; tail = [pad, pad]. The sixth trit goes to byte 1,
    # digit 1, not to byte 0's tail digit as five neighbours per byte would put it.
    # byte 0: 2+6+18+54 + 81 = 161; byte 1: 2 + 6 + 9 + 27 + 81 = 125
    pytest.param([1] * 6, bytes([161, 125]), id="6-trits"),
    # nb = 2: head = t0..t6, pad; tail = [pad, pad]
    # byte 0: t0..t3 = +1, 0, -1, +1 -> 2 + 3 + 0 + 54 + 81 = 140
    # byte 1: t4..t6 = 0, +1, -1, pad -> 1 + 6 + 0 + 27 + 81 = 115
    pytest.param([1, 0, -1, 1, 0, 1, -1], bytes([140, 115]), id="7-trits"),
    # nb = 2: head = t0..t7, tail = [t8, t9]
    # byte 0: t0..t3 = 0, +1, -1, 0 -> 1 + 6 + 0 + 27, tail t8 = -1 -> 0: 34
    # byte 1: t4..t7 = +1, 0, 0, -1 -> 2 + 3 + 9 + 0, tail t9 = +1 -> 162: 176
    pytest.param([0, 1, -1, 0, 1, 0, 0, -1, -1, 1], bytes([34, 176]), id="10-trits"),
    # byte 0: head all +1 -> 80, tail t8 = +1 -> 162; byte 1: all -1 -> 0
    pytest.param([1, 1, 1, 1, -1, -1, -1, -1, 1, -1], bytes([242, 0]), id="10-trits-extremes"),
    # nb = 3: head = t0..t11, tail = [t12, pad, pad]
    # byte 0: 0 + 81 * 2 = 162; bytes 1 and 2: 0 + 81 * 1 = 81
    pytest.param([-1] * 12 + [1], bytes([162, 81, 81]), id="13-trits"),
]


@pytest.mark.parametrize(("values", "expected"), PACKING_VECTORS)
def test_pack_produces_documented_bytes(values: list[int], expected: bytes) -> None:
    # prepare
    trits = np.array(values, dtype=np.int8)

    # act
    packed = pack(trits)

    # assert
    assert packed == expected


@pytest.mark.parametrize(("values", "expected"), PACKING_VECTORS)
def test_unpack_reads_documented_bytes(values: list[int], expected: bytes) -> None:
    # prepare
    n = len(values)

    # act
    trits = unpack(expected, n)

    # assert
    assert trits.dtype == np.int8
    assert trits.tolist() == values


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("n", range(51))
def test_pack_then_unpack_returns_the_trits_for_every_length_up_to_50(n: int) -> None:
    # prepare
    trits = _random_trits(np.random.default_rng(n), n)

    # act
    packed = pack(trits)
    got = unpack(packed, n)

    # assert
    assert len(packed) == packed_size(n) == -(-n // 5)
    np.testing.assert_array_equal(got, trits)


@settings(max_examples=150, deadline=None)
@given(trits=trit_arrays)
def test_pack_then_unpack_returns_any_trit_array(trits: np.ndarray) -> None:
    # act
    packed = pack(trits)
    got = unpack(packed, trits.size)

    # assert
    assert len(packed) == packed_size(trits.size)
    assert max(packed, default=0) <= MAX_BYTE
    np.testing.assert_array_equal(got, trits)


@settings(max_examples=100, deadline=None)
@given(packed=st.binary(min_size=0, max_size=40).map(lambda b: bytes(x % 243 for x in b)))
def test_unpack_then_pack_returns_the_bytes_when_length_is_a_multiple_of_five(
    packed: bytes,
) -> None:
    # prepare: with n = 5 * nb there is no padding, so every byte 0..242 is valid
    n = 5 * len(packed)

    # act
    repacked = pack(unpack(packed, n))

    # assert
    assert repacked == packed


def test_pack_rejects_values_outside_minus_one_to_one() -> None:
    # act / assert
    with pytest.raises(ValueError, match="trits"):
        pack(np.array([0, 2, -1], dtype=np.int8))
    with pytest.raises(ValueError, match="trits"):
        pack(np.array([-2], dtype=np.int8))


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", range(MAX_BYTE + 1, 256))
def test_validate_packed_rejects_byte_above_242(bad: int) -> None:
    # prepare: a valid 15-trit buffer with the bad byte in the middle
    packed = bytearray(pack(np.zeros(15, dtype=np.int8)))
    packed[1] = bad

    # act / assert
    with pytest.raises(InvalidTrits, match="above 242") as info:
        validate_packed(bytes(packed), 15)
    assert info.value.reason == "invalid_trits"


def test_validate_packed_accepts_byte_242() -> None:
    # act
    got = validate_packed(bytes([MAX_BYTE]), 5)

    # assert
    assert got.tolist() == [MAX_BYTE]


@pytest.mark.parametrize(
    ("n", "size"),
    [(0, 1), (1, 0), (5, 0), (5, 2), (6, 1), (10, 3), (11, 2), (50, 9), (50, 11)],
)
def test_validate_packed_rejects_wrong_length(n: int, size: int) -> None:
    # prepare
    packed = bytes([121]) * size  # all-zero trits, so only the length is wrong

    # act / assert
    with pytest.raises(InvalidTrits, match="bytes"):
        validate_packed(packed, n)


@pytest.mark.parametrize(
    ("n", "pos", "trit"),
    [
        (n, pos, trit)
        for n in (1, 2, 3, 4, 6, 7, 8, 9, 11, 13, 14, 21, 49)
        for pos in range(n, 5 * -(-n // 5))
        for trit in (-1, 1)
    ],
)
def test_validate_packed_rejects_nonzero_padding_trit(n: int, pos: int, trit: int) -> None:
    # prepare: pack zeros, then set the padding position's digit by hand
    packed = bytearray(pack(np.zeros(n, dtype=np.int8)))
    byte, digit = _slot(pos, n)
    packed[byte] += 3**digit * trit  # digit 1 (trit 0) becomes 0 or 2

    # act / assert
    with pytest.raises(InvalidTrits, match="padding"):
        validate_packed(bytes(packed), n)


@pytest.mark.parametrize("n", [1, 4, 6, 9, 13])
def test_unpack_rejects_nonzero_padding_trit(n: int) -> None:
    # prepare
    packed = bytearray(pack(np.ones(n, dtype=np.int8)))
    byte, digit = _slot(5 * -(-n // 5) - 1, n)  # the last padded position
    packed[byte] += 3**digit

    # act / assert
    with pytest.raises(InvalidTrits):
        unpack(bytes(packed), n)


@settings(max_examples=200, deadline=None)
@given(packed=st.binary(min_size=1, max_size=12), short=st.integers(min_value=0, max_value=4))
def test_validate_packed_accepts_exactly_what_pack_produces(packed: bytes, short: int) -> None:
    # prepare: a length that matches, so only range and padding decide
    n = 5 * len(packed) - short

    # act
    try:
        got = validate_packed(packed, n)
    except InvalidTrits:
        valid = False
    else:
        valid = True
        assert got.tobytes() == packed

    # assert: valid exactly when every byte is in range and the padding digits are 1
    in_range = max(packed) <= MAX_BYTE
    padding_zero = in_range and all(
        packed[b] // 3**d % 3 == 1 for b, d in (_slot(pos, n) for pos in range(n, 5 * len(packed)))
    )
    assert valid == (in_range and padding_zero)
    if valid:
        assert pack(unpack(packed, n)) == packed


def test_invalid_trits_is_a_tern_error() -> None:
    # act / assert
    with pytest.raises(TernError):
        validate_packed(bytes([255]), 5)


# -- accumulate_packed ---------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 17, 20, 99, 1001])
def test_accumulate_packed_adds_scale_times_trits(n: int) -> None:
    # prepare
    rng = np.random.default_rng(1000 + n)
    trits = _random_trits(rng, n)
    acc = rng.standard_normal(n).astype(np.float32)
    scale = np.float32(rng.uniform(0.01, 10.0))
    packed = validate_packed(pack(trits), n)
    expected = acc + scale * trits.astype(np.float32)

    # act
    accumulate_packed(acc, packed, scale)

    # assert: trit * scale is exact, so the sums must match bit for bit
    np.testing.assert_array_equal(acc.view(np.uint32), expected.view(np.uint32))


@settings(max_examples=100, deadline=None)
@given(
    trits=trit_arrays,
    scale=st.floats(min_value=0.0, max_value=2.0**100, width=32),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_accumulate_packed_matches_unpack_for_any_size(
    trits: np.ndarray, scale: float, seed: int
) -> None:
    # prepare
    n = trits.size
    acc = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    s = np.float32(scale)
    expected = acc + s * unpack(pack(trits), n).astype(np.float32)
    packed = validate_packed(pack(trits), n)

    # act
    accumulate_packed(acc, packed, s)

    # assert
    np.testing.assert_array_equal(acc, expected)


def test_accumulate_packed_touches_only_the_tensor_view() -> None:
    # prepare: a view into a larger buffer, as CheckedUpdate.add_to passes
    n = 7
    trits = np.array([1, -1, 0, 1, 1, -1, 1], dtype=np.int8)
    buffer = np.full(20, 5.0, dtype=np.float32)
    view = buffer[3 : 3 + n]

    # act
    accumulate_packed(view, validate_packed(pack(trits), n), np.float32(2.0))

    # assert
    np.testing.assert_array_equal(buffer[3:10], 5.0 + 2.0 * trits)
    np.testing.assert_array_equal(buffer[:3], 5.0)
    np.testing.assert_array_equal(buffer[10:], 5.0)


# -- the fast paths (issue 13): int8 input, small and large tensors, pack_cut ----------


@settings(max_examples=200, deadline=None)
@given(trits=hnp.arrays(np.int8, st.integers(0, 6000), elements=st.integers(-1, 1)))
def test_pack_of_int8_trits_is_the_bytes_of_any_integer_dtype(trits: np.ndarray) -> None:
    # act
    fast = pack(trits)

    # assert: the int8 fast path and the generic path (int64, lists) agree, at every size
    assert fast == pack(trits.astype(np.int64)) == pack(trits.tolist())
    np.testing.assert_array_equal(unpack(fast, trits.size), trits)


@pytest.mark.parametrize("bad", [2, -2, 127, -128])
def test_pack_refuses_an_int8_value_that_is_not_a_trit(bad: int) -> None:
    with pytest.raises(ValueError, match="trits"):
        pack(np.array([0, bad, 1], dtype=np.int8))


@settings(max_examples=200, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.integers(0, 6000), elements=st.floats(-4, 4, width=32)),
    cut=st.floats(min_value=0.125, max_value=5, width=32),
)
def test_pack_cut_packs_the_trits_of_its_threshold(x: np.ndarray, cut: float) -> None:
    c = np.float32(cut)
    trits = (x >= c).astype(np.int8) - (x <= -c).astype(np.int8)

    packed, digits = pack_cut(x, c)

    assert packed == pack(trits)
    np.testing.assert_array_equal(digits.astype(np.int8) - 1, trits)
