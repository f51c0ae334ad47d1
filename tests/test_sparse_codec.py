"""The sparse ternary codec (tern.sparse, tern.codecs.SparseTernaryCodec): what it keeps,
its documented bytes, its strict decoder, its caps, and differential privacy with it."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from nacl.signing import SigningKey

from tern.aggregate import Partial
from tern.caps import contribution_caps
from tern.codecs import CodecName, SparseTernaryCodec, codec_for, decode
from tern.envelope import Envelope, Kind, canonical, loads_bounded, seal
from tern.errors import (
    InvalidSparse,
    MalformedMessage,
    NonFiniteValue,
    ShapeMismatch,
    TernError,
    UnknownCodec,
)
from tern.messages import Update, encode_update
from tern.policy import Policy
from tern.privacy.clip import dp_update, sent_norm
from tern.privacy.terms import DpTerms
from tern.schedule import RoundSchedule, privacy_conflict
from tern.secagg.terms import SecAggTerms
from tern.sparse import gaps_bytes_bound, max_count, rice_parameter, sparse_payload_bound
from tern.spec import ModelSpec
from tests.codec_strategies import finite_f32, shapes, wire_roundtrip

densities = st.sampled_from([1e-3, 0.01, 1 / 32, 0.1, 0.3, 0.5, 1.0])


def _received(codec: SparseTernaryCodec, wire: object, shape: tuple[int, ...]) -> np.ndarray:
    return decode(codec, wire_roundtrip(wire), shape)


# == what encode keeps ===============================================================


@settings(max_examples=150, deadline=None)
@given(x=hnp.arrays(np.float32, shapes, elements=finite_f32), density=densities)
def test_sparse_round_trip_decodes_exactly_what_encode_returned(
    x: np.ndarray, density: float
) -> None:
    codec = SparseTernaryCodec(density)

    wire, decoded = codec.encode(x)

    got = _received(codec, wire, x.shape)
    assert got.shape == decoded.shape == x.shape
    assert got.tobytes() == decoded.tobytes()


@settings(max_examples=150, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(0, 300), elements=finite_f32), density=densities)
def test_sparse_keeps_the_k_largest_magnitudes_as_their_mean_with_their_signs(
    x: np.ndarray, density: float
) -> None:
    k = min(max_count(density, x.size), int(np.count_nonzero(x)))

    wire, decoded = SparseTernaryCodec(density).encode(x)

    kept = np.flatnonzero(decoded)
    assert kept.size == k == wire["count"]  # type: ignore[index]
    if k:
        mags = np.abs(x).astype(np.float64)
        assert mags[kept].min() >= np.delete(mags, kept).max(initial=0.0)
        assert np.all(np.sign(decoded[kept]) == np.sign(x[kept]))
        scale = np.float32(mags[kept].mean())
        assert np.all(np.abs(decoded[kept]) == scale)


def test_sparse_ties_go_to_the_lowest_positions_and_the_same_input_gives_the_same_bytes() -> None:
    x = np.array([1.0, -2.0, 2.0, 0.5, -2.0, 2.0], dtype=np.float32)
    codec = SparseTernaryCodec(0.5)  # k = 3 of 4 tied at 2

    first, decoded = codec.encode(x)
    again, _ = codec.encode(x.copy())

    assert decoded.tolist() == [0.0, -2.0, 2.0, 0.0, -2.0, 0.0]
    assert canonical(first) == canonical(again)


def test_sparse_encodes_an_all_zero_tensor_as_no_entries() -> None:
    wire, decoded = SparseTernaryCodec(0.1).encode(np.zeros((3, 4), dtype=np.float32))

    assert wire == {"shape": [3, 4], "scale": 0.0, "count": 0, "rice": 0, "gaps": b"",
                    "signs": b""}  # fmt: skip
    assert not decoded.any()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_sparse_encode_refuses_non_finite_values(bad: float) -> None:
    with pytest.raises(NonFiniteValue):
        SparseTernaryCodec(0.5).encode(np.array([1.0, bad], dtype=np.float32))


# == the documented bytes (topics.md "Sparse tensors") ===============================

EXAMPLE = np.array([0, 1.5, 0, -2, 0, 0, 1, 0, 0, -0.25], dtype=np.float32)
EXAMPLE_BYTES = bytes.fromhex(
    "a6" "6467617073" "41da" "6472696365" "01" "65636f756e74" "03"
    "657363616c65" "f93e00" "657368617065" "810a" "657369676e73" "4140"
)  # fmt: skip


def test_sparse_wire_of_the_documented_example_is_its_bytes() -> None:
    # k = ceil(0.3 * 10) = 3: positions 1, 3, 6, gaps 1, 1, 2; r = bit_length(48120 //
    # 30000) = 1; remainders 1 1 0, quotients 0 0 1 -> "110" "1" "1" "01" + 0 = 0xDA;
    # signs + - + -> 010 + 00000 = 0x40; scale (1.5 + 2 + 1) / 3 = 1.5, a half float.
    wire, decoded = SparseTernaryCodec(0.3).encode(EXAMPLE)

    assert canonical(wire) == EXAMPLE_BYTES
    assert decoded.tolist() == [0, 1.5, 0, -1.5, 0, 0, 1.5, 0, 0, 0]
    back = SparseTernaryCodec(0.3).check(loads_bounded(EXAMPLE_BYTES, 64), (10,), "t")
    acc = np.zeros(10, dtype=np.float32)
    back.add_to(acc)
    assert acc.tolist() == decoded.tolist()
    assert back.sq_norm() == 3 * 1.5**2


def test_rice_parameter_is_sattlers_golomb_parameter_in_integers() -> None:
    for n, k in [(10, 3), (15_210, 153), (1_000_000, 10_000), (1_000_000, 31_250), (64, 2)]:
        p = k / n
        sattler = 1 + math.floor(math.log2(math.log((math.sqrt(5) - 1) / 2) / math.log1p(-p)))
        assert rice_parameter(k, n) == max(0, sattler)


def test_rice_parameter_is_the_best_one_for_random_positions() -> None:
    rng = np.random.default_rng(3)
    n, k = 100_000, 1_000
    pos = np.sort(rng.choice(n, k, replace=False))
    gaps = np.diff(pos, prepend=-1) - 1

    bits = {r: int((gaps >> r).sum()) + k * (r + 1) for r in range(16)}

    assert bits[rice_parameter(k, n)] == min(bits.values())


# == the strict decoder ==============================================================


def _valid(density: float = 0.25, n: int = 40, seed: int = 0) -> tuple[dict[str, Any], int]:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    wire, _ = SparseTernaryCodec(density).encode(x)
    return dict(wire), n  # type: ignore[call-overload]


def _refused(wire: object, n: int, density: float = 0.25) -> TernError:
    with pytest.raises(TernError) as info:
        SparseTernaryCodec(density).check(wire, (n,), "t")
    return info.value


def test_sparse_check_refuses_more_entries_than_the_density_allows() -> None:
    wire, n = _valid(density=0.5)

    err = _refused(wire, n, density=0.25)

    assert isinstance(err, InvalidSparse) and err.reason == "invalid_sparse"


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("rice", 0, InvalidSparse),
        ("rice", 2**40, InvalidSparse),
        ("count", 2**64 - 1, InvalidSparse),
        ("count", -1, MalformedMessage),
        ("count", True, MalformedMessage),
        ("count", 1.0, MalformedMessage),
        ("scale", -1.0, MalformedMessage),
        ("scale", math.nan, NonFiniteValue),
        ("scale", 1e39, NonFiniteValue),
        ("scale", 10**400, NonFiniteValue),
        ("scale", 0.0, InvalidSparse),
        ("scale", "1", MalformedMessage),
        ("shape", [41], ShapeMismatch),
        ("shape", [-1], MalformedMessage),
        ("gaps", bytearray(b"x"), MalformedMessage),
        ("signs", [0], MalformedMessage),
    ],
)  # fmt: skip
def test_sparse_check_refuses_a_bad_field(field: str, value: object, error: type) -> None:
    wire, n = _valid()
    wire[field] = value

    err = _refused(wire, n)

    assert isinstance(err, error)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_sparse_check_refuses_any_other_key_set(change: str) -> None:
    wire, n = _valid()
    if change == "missing":
        del wire["signs"]
    else:
        wire["trits"] = b""

    assert isinstance(_refused(wire, n), MalformedMessage)


def test_sparse_check_refuses_trailing_bytes_and_set_padding_bits() -> None:
    wire, n = _valid()

    for field, data in [
        ("gaps", wire["gaps"] + b"\0"),
        ("signs", wire["signs"] + b"\0"),
        ("signs", wire["signs"][:-1] + bytes([wire["signs"][-1] | 1])),  # count % 8 != 0
        ("gaps", wire["gaps"][:-1] + bytes([wire["gaps"][-1] | 1])),  # one code too many
    ]:
        assert isinstance(_refused({**wire, field: data}, n), InvalidSparse), field


def test_sparse_check_refuses_a_position_past_the_end() -> None:
    # one entry, r = bit_length(0.4812 * 8) = 2: remainder 11, quotient 1 -> gap 7 is
    # position 7 (valid); quotient 2 -> gap 11 -> position 11 >= 8
    ok = {"shape": [8], "scale": 1.0, "count": 1, "rice": 2, "gaps": bytes([0b11010000]),
          "signs": b"\0"}  # fmt: skip
    past = {**ok, "gaps": bytes([0b11001000])}

    assert SparseTernaryCodec(1 / 8).check(ok, (8,), "t").positions.tolist() == [7]
    assert isinstance(_refused(past, 8, 1 / 8), InvalidSparse)


def test_sparse_check_bounds_the_gap_bytes_before_decoding() -> None:
    wire, n = _valid()
    longest = gaps_bytes_bound(wire["count"], n)

    err = _refused({**wire, "gaps": bytes(longest + 1)}, n)

    assert isinstance(err, InvalidSparse) and "do not fit" in str(err)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), density=densities)
def test_any_mutation_of_a_sparse_wire_is_refused_or_decodes_finite_of_its_shape(
    data: st.DataObject, density: float
) -> None:
    n = data.draw(st.integers(1, 200))
    wire, _ = _valid(density, n, data.draw(st.integers(0, 5)))
    field = data.draw(st.sampled_from(sorted(wire)))
    if isinstance(wire[field], bytes) and wire[field]:
        raw = bytearray(wire[field])
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
        wire[field] = bytes(raw)
    else:
        wire[field] = data.draw(
            st.integers(-5, 2**70) | st.floats() | st.binary(max_size=40) | st.none()
            | st.lists(st.integers(0, 300), max_size=3)
        )  # fmt: skip
    codec = SparseTernaryCodec(density)

    try:
        checked = codec.check(wire, (n,), "t")
    except TernError:
        return
    acc = np.zeros(n, dtype=np.float32)
    checked.add_to(acc)
    assert np.isfinite(acc).all()
    assert math.isfinite(checked.sq_norm())
    assert int(np.count_nonzero(acc)) <= max_count(density, n)


@settings(max_examples=300, deadline=None)
@given(
    wire=st.dictionaries(
        st.sampled_from(["shape", "scale", "count", "rice", "gaps", "signs", "x"]),
        st.integers(-3, 2**66) | st.floats() | st.binary(max_size=64) | st.none()
        | st.lists(st.integers(-1, 70), max_size=3) | st.text(max_size=4),
    )
    | st.binary(max_size=20) | st.integers() | st.none(),
    density=densities,
)  # fmt: skip
def test_sparse_check_raises_only_tern_errors_on_arbitrary_values(
    wire: object, density: float
) -> None:
    with contextlib.suppress(TernError):
        SparseTernaryCodec(density).check(wire, (64,), "t")


# == codec_for and the caps ==========================================================


def test_codec_for_sparse_needs_a_density_in_range() -> None:
    assert isinstance(codec_for("sparse", density=0.01), SparseTernaryCodec)
    assert codec_for(CodecName.SPARSE, density=0.5).name is CodecName.SPARSE
    with pytest.raises(UnknownCodec) as info:  # an update naming sparse in a round without
        codec_for("sparse")
    assert info.value.reason == "unknown_codec"
    for bad in (0.0, -0.1, 1.5, math.nan):  # a schedule refuses these: a programming error
        with pytest.raises(ValueError):
            codec_for("sparse", density=bad)
    assert codec_for("ternary", density=0.01).name is CodecName.TERNARY  # ignored


SPEC = ModelSpec.of({"w": (3000, 40), "b": (40,), "s": ()})


@pytest.mark.parametrize("density", [0.01, 1 / 32, 1 / 16, 0.5, 1.0])
def test_the_largest_sparse_update_fits_its_caps_and_a_denser_one_does_not_decode(
    density: float,
) -> None:
    # worst case for the gap codes: the k entries at the end of every tensor
    key = SigningKey(bytes(range(32)))
    tensors = []
    for t in SPEC.tensors:
        k = max_count(density, t.size)
        x = np.zeros(t.size, dtype=np.float32)
        x[t.size - k :] = -np.arange(1, k + 1, dtype=np.float32)
        tensors.append(SparseTernaryCodec(density).encode(x.reshape(t.shape))[0])
    update = Update(CodecName.SPARSE, 1e30, 2**32 - 1, tuple(tensors), {"x" * 64: 2**32 - 1})
    env = Envelope(Kind.PARTIAL, "f" * 64, 2**32 - 1, 2**32 - 1, "g" * 64, update.to_body(),
                   run=2**64 - 1)  # fmt: skip
    data = seal(env, key)

    caps = contribution_caps(SPEC, CodecName.SPARSE, partial=True, density=density)

    assert len(data) <= caps.max_bytes
    # never above a float32 update, which tern.caps.largest_message relies on
    assert caps.max_bytes <= contribution_caps(SPEC, CodecName.FLOAT32, partial=True).max_bytes
    body = Update.from_body(loads_bounded(data, caps.max_bytes)["body"])
    body.check(SPEC, density=density)
    with pytest.raises(InvalidSparse):
        body.check(SPEC, density=density / 2)


def test_sparse_caps_need_a_density_and_grow_with_it() -> None:
    with pytest.raises(ValueError):
        contribution_caps(SPEC, CodecName.SPARSE, partial=False)
    sizes = [
        contribution_caps(SPEC, CodecName.SPARSE, partial=False, density=d).max_bytes
        for d in (0.001, 0.01, 0.1, 1.0)
    ]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    plain = contribution_caps(SPEC, CodecName.FLOAT32, partial=False)
    assert contribution_caps(SPEC, CodecName.FLOAT32, partial=False, density=0.1) == plain


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), data=st.data())
def test_sparse_payload_bound_covers_every_count_and_placement(n: int, data: st.DataObject) -> None:
    most = data.draw(st.integers(1, n))
    count = data.draw(st.integers(1, most))
    pos = np.sort(
        np.random.default_rng(data.draw(st.integers(0, 99))).choice(n, count, replace=False)
    )
    x = np.zeros(n, dtype=np.float32)
    x[pos] = 1.0
    wire, _ = SparseTernaryCodec(count / n).encode(x)
    if wire["count"] != count:  # type: ignore[index]
        return  # count / n rounded to another k: nothing to check for this draw

    size = len(wire["gaps"]) + len(wire["signs"])  # type: ignore[index, arg-type]

    assert size <= sparse_payload_bound(n, most)


# == privacy =========================================================================

PSPEC = ModelSpec.of({"w": (7, 4), "b": (4,)})


@settings(max_examples=80, deadline=None)
@given(
    delta=hnp.arrays(np.float32, (PSPEC.size,), elements=st.floats(-1e4, 1e4, width=32)),
    residual=hnp.arrays(np.float32, (PSPEC.size,), elements=st.floats(-100, 100, width=32)),
    samples=st.integers(0, 5000),
    clip=st.floats(min_value=1e-3, max_value=1e3),
    density=st.sampled_from([0.05, 0.25, 1.0]),
)
def test_sparse_dp_update_decodes_within_the_clip(
    delta: np.ndarray, residual: np.ndarray, samples: int, clip: float, density: float
) -> None:
    dp = DpTerms(clip=clip, multiplier=1.0, weight_cap=1000.0)
    codec = codec_for("sparse", density=density)

    update, left = dp_update(codec, PSPEC, delta, samples, residual, dp, 10, None)

    body = wire_roundtrip(update.to_body())
    received = Update.from_body(body).check(PSPEC, density=density).to_partial().weighted_sum
    assert sent_norm(received) <= clip
    assert np.linalg.norm(left) <= clip * (1 + 1e-6)


def test_secure_aggregation_refuses_a_sparse_schedule_with_its_sentence() -> None:
    sa = SecAggTerms((0.02, 0.03))
    schedule = RoundSchedule(3, 2, CodecName.SPARSE, 100.0, 1, secagg=sa, density=0.01)

    why = schedule.privacy_conflict()

    assert why is not None
    assert "the codec sparse (sparse or float) cannot be masked in its ring" in why
    assert privacy_conflict(CodecName.SPARSE, Policy(), None, None) is None


# == error feedback ==================================================================


def test_sparse_error_feedback_sends_everything_asked_and_its_residual_stays_bounded() -> None:
    spec = ModelSpec.of({"w": (50, 20)})
    codec = SparseTernaryCodec(0.02)
    target = np.random.default_rng(9).standard_normal(spec.size).astype(np.float32)
    residual = np.zeros(spec.size, dtype=np.float32)
    sent_total = np.zeros(spec.size, dtype=np.float64)
    norms = []

    rounds = 400
    for _ in range(rounds):
        update, residual = encode_update(codec, spec, Partial(target, 1.0, 1), residual)
        body = wire_roundtrip(update.to_body())
        sent_total += Update.from_body(body).check(spec, density=0.02).to_partial().weighted_sum
        norms.append(float(np.linalg.norm(residual)))

    # what was sent plus what is still owed is what was asked, every coordinate
    asked = rounds * target.astype(np.float64)
    assert np.allclose(sent_total + residual, asked, rtol=1e-3, atol=1e-2)
    # and what is owed stops growing: feedback drains it (without, it grows 400-fold)
    assert norms[-1] < 1.2 * norms[rounds // 2]
    assert norms[-1] < 0.1 * float(np.linalg.norm(asked))
