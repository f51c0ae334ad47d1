"""Hostile input as values: arbitrary CBOR-shaped Python values and near-valid bodies, fed to
every body decoder and check of the protocol layer, fail only with a TernError.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from cbor2 import CBORTag
from hypothesis import given
from hypothesis import strategies as st

from tern import topics, trits
from tern.codecs import CodecName, codec_for
from tern.envelope import Kind
from tern.errors import InvalidTrits
from tern.messages import GlobalModel, RoundSchedule
from tern.tensors import TypedArrayTag
from tests.hostile_helpers import (
    FUZZ,
    check_update,
    decode_body,
    decode_bytes,
    dense_wire,
    only_tern_errors,
)

if TYPE_CHECKING:
    from conftest import ProtocolKit


# -- strategies: CBOR-shaped Python values ---------------------------------------------

SEMANTIC_TAGS = [0, 1, 2, 3, 4, 5, 24, 25, 28, 29, 30, 35, 36, 37, 256, 258, 260, 261, 55799]
ARRAY_TAGS = [40, 64, 84, 85]
WORDS = [
    "float32", "float16", "ternary", "shape", "scale", "trits", "spec", "weights", "codec",
    "weight", "count", "tensors", "round", "model", "deadline", "min_contributors",
    "participants", "seed", "train", "epochs", "batch_size", "lr", "w", "b",
    "kernel", "sha256", "abi", "fuel", "memory", "wasm", "failed",
]  # fmt: skip

tags = st.sampled_from(ARRAY_TAGS + SEMANTIC_TAGS) | st.integers(0, 2**64 - 1)
ints = st.integers() | st.sampled_from(
    [-1, 0, 2**31, 2**32 - 1, 2**32, 2**63, 2**64, -(2**64) - 1, 2**1100, -(2**1100)]
)
floats = st.floats() | st.sampled_from(
    [math.nan, math.inf, -math.inf, -0.0, 65504.0, 65520.0, 3.5e38, 1e308, 5e-324]
)
words = st.sampled_from(WORDS)
leaves = st.one_of(
    st.none(), st.booleans(), ints, floats, st.binary(max_size=24), st.text(max_size=12), words
)


def _containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(words | st.text(max_size=6) | st.integers(-3, 3), children, max_size=5),
        st.builds(CBORTag, tags, children),
    )


cbor_values = st.recursive(leaves, _containers, max_leaves=16)
numbers = ints | floats | cbor_values


def mostly(
    good: st.SearchStrategy[object], junk: st.SearchStrategy[object]
) -> st.SearchStrategy[object]:
    """`good` four times in five: deep checks are only reached past the shallow ones."""
    # Not st.one_of(good, good, good, good, junk): one_of flattens a junk that is itself
    # a one_of, and the many junk branches would then win most draws.
    return st.integers(0, 4).flatmap(lambda i: junk if i == 0 else good)


dims = st.integers(0, 4) | st.sampled_from([2**28, 2**40, 2**62, 2**63, 2**64, 2**70]) | leaves
shapes = st.sampled_from([[2, 3], [3], (2, 3), [6], [], [0], [0, 2**63]]) | st.lists(
    dims, max_size=9
)
payloads = st.binary(max_size=40) | st.sampled_from([0, 6, 12, 24, 36]).flatmap(
    lambda n: st.binary(min_size=n, max_size=n)
)


dense_wires = st.builds(dense_wire, shapes, st.sampled_from([64, 84, 85]) | tags, payloads)
ternary_wires = st.fixed_dictionaries(
    {
        "shape": shapes,
        "scale": numbers,
        "trits": st.builds(CBORTag, st.sampled_from([64, 85]), st.binary(max_size=3)) | cbor_values,
    }
)
wires = dense_wires | ternary_wires | cbor_values


def _elements(shape: object) -> int | None:
    """The element count of a well-formed shape, None for junk."""
    if not isinstance(shape, list | tuple):
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return None
    return math.prod(shape)


def wire_for(codec: CodecName, shape: object) -> st.SearchStrategy[object]:
    """Mostly a well-formed wire tensor of `shape` for `codec`, with junk in any part."""
    n = _elements(shape)
    small = n is not None and n <= 64
    exact_shape = mostly(st.just(list(shape)), shapes) if n is not None else shapes  # type: ignore[arg-type]
    if codec is CodecName.TERNARY:
        packed = (
            mostly(
                st.lists(st.integers(-1, 1), min_size=n, max_size=n).map(trits.pack),
                st.binary(min_size=trits.packed_size(n), max_size=trits.packed_size(n)),
            )
            if small
            else st.binary(max_size=3)
        )
        good = st.fixed_dictionaries(
            {
                "shape": exact_shape,
                "scale": mostly(st.floats(0, 10), numbers),
                "trits": mostly(st.builds(CBORTag, st.just(64), packed), cbor_values),
            }
        )
    else:
        tag = TypedArrayTag.FLOAT16_LE if codec is CodecName.FLOAT16 else TypedArrayTag.FLOAT32_LE
        size = (n or 0) * (2 if codec is CodecName.FLOAT16 else 4)
        data = st.binary(min_size=size, max_size=size) if small else payloads
        good = st.builds(
            dense_wire, exact_shape, mostly(st.just(int(tag)), tags), mostly(data, payloads)
        )
    return mostly(good, wires)


@st.composite
def update_bodies(
    draw: st.DrawFn, spec_shapes: tuple[tuple[int, ...], ...] = ((2, 3), (3,))
) -> dict[str, object]:
    """Updates for the kit's spec (w: 2x3, b: 3), mostly well-formed down to the bytes."""
    codec = draw(st.sampled_from(CodecName))
    tensors = [draw(wire_for(codec, list(s))) for s in spec_shapes]
    return {
        "codec": draw(mostly(st.just(str(codec)), st.sampled_from(list(CodecName)) | cbor_values)),
        "weight": draw(mostly(st.floats(0.001, 1e6), numbers)),
        "count": draw(mostly(st.integers(1, 100), numbers)),
        "tensors": draw(mostly(st.just(tensors), st.lists(wires, max_size=3))),
    }


@st.composite
def model_bodies(draw: st.DrawFn) -> dict[str, object]:
    """A spec and float32 weights drawn from the same shapes, so the shape checks can pass."""
    entry = st.tuples(
        mostly(st.sampled_from(["w", "b", "c"]), leaves),
        mostly(st.lists(st.integers(0, 4), max_size=3), shapes),
    )
    entries = draw(
        mostly(
            st.lists(entry, min_size=1, max_size=3, unique_by=lambda e: repr(e[0])),
            st.lists(entry, max_size=3),
        )
    )
    weights = [draw(wire_for(CodecName.FLOAT32, shape)) for _, shape in entries]
    return {
        "spec": draw(mostly(st.just([list(e) for e in entries]), cbor_values)),
        "weights": draw(mostly(st.just(weights), st.lists(wires, max_size=2))),
    }


schedule_bodies = st.fixed_dictionaries(
    {
        "round": mostly(st.integers(0, 2**32 - 1), numbers),
        "model": mostly(st.integers(0, 2**32 - 1), numbers),
        "codec": mostly(st.sampled_from([str(c) for c in CodecName]), cbor_values),
        "deadline": mostly(st.floats(0, 2e9), numbers),
        "min_contributors": mostly(st.integers(0, 100), numbers),
        "participants": st.none() | st.lists(mostly(st.text(max_size=5), leaves), max_size=3),
        "seed": mostly(st.integers(0, 2**32 - 1), numbers),
        "train": mostly(
            st.fixed_dictionaries(
                {
                    "epochs": mostly(st.integers(1, 5), numbers),
                    "batch_size": mostly(st.integers(1, 64), numbers),
                    "lr": mostly(st.floats(0.001, 1), numbers),
                }
            ),
            cbor_values,
        ),
    }
)

bodies = cbor_values | update_bodies() | model_bodies() | schedule_bodies


# -- values ----------------------------------------------------------------------------


@FUZZ
@given(value=bodies)
def test_any_cbor_value_raises_only_tern_errors_in_every_body_decoder(
    kit: ProtocolKit, value: object
) -> None:
    decode_body(value, kit.spec)


@FUZZ
@given(body=update_bodies())
def test_any_near_valid_update_raises_only_tern_errors_when_checked(
    kit: ProtocolKit, body: dict[str, object]
) -> None:
    only_tern_errors(check_update, body, kit.spec)


@FUZZ
@given(body=model_bodies())
def test_any_near_valid_model_raises_only_tern_errors(body: dict[str, object]) -> None:
    only_tern_errors(GlobalModel.from_body, body)


@FUZZ
@given(body=schedule_bodies)
def test_any_near_valid_schedule_raises_only_tern_errors(body: dict[str, object]) -> None:
    only_tern_errors(RoundSchedule.from_body, body)


@FUZZ
@given(wire=wires, shape=st.sampled_from([(2, 3), (3,), (0,), (), (5,), (7, 1)]))
def test_every_codec_check_raises_only_tern_errors_for_any_wire_value(
    wire: object, shape: tuple[int, ...]
) -> None:
    for codec in CodecName:
        only_tern_errors(codec_for(codec, density=0.5).check, wire, shape, "t")


@FUZZ
@given(body=bodies, kind=st.sampled_from(Kind))
def test_a_correctly_signed_envelope_with_any_body_raises_only_tern_errors(
    kit: ProtocolKit, body: object, kind: Kind
) -> None:
    # Semantic tags (dates, bignums, shared references, ...) must be refused by the strict
    # decoder before anything is built from them, and what it lets through checked.
    try:
        data = kit.seal(kind, body)
    except Exception:  # cbor2 cannot encode this Python value; not a wire question
        return

    decode_bytes(data, kit)


@FUZZ
@given(data=st.binary(max_size=80), n=st.integers(0, 500))
def test_packed_trits_of_any_bytes_and_length_raise_only_invalid_trits(data: bytes, n: int) -> None:
    try:
        values = trits.unpack(data, n)
    except InvalidTrits:
        return

    assert values.shape == (n,)
    assert set(np.unique(values)) <= {-1, 0, 1}
    assert trits.pack(values) == data


@FUZZ
@given(text=st.text(max_size=120), raw=st.binary(max_size=60))
def test_parse_of_any_text_raises_only_topic_errors(text: str, raw: bytes) -> None:
    for topic in (text, raw.decode("latin-1"), "tern/" + text, "tern/plant-7/" + text):
        only_tern_errors(topics.parse, topic)
