"""Hostile input: whatever arrives, every decoder of the protocol layer fails with a TernError.

A component counts rejections by ``reason`` and carries on; any other exception
(OverflowError, ValueError from numpy, RecursionError, ...) would end its loop. So each
test here feeds garbage to every decoder and lets anything but a TernError fail it:
random bytes, truncations, bit flips, arbitrary CBOR-shaped Python values, near-valid
bodies, deep nesting, huge declared lengths, indefinite lengths and duplicate keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import cbor2
import numpy as np
import pytest
from cbor2 import CBORTag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tern import topics, trits
from tern.cbor import Caps, decode
from tern.codecs import CodecName, codec_for
from tern.envelope import Kind, canonical, loads_bounded, open_envelope
from tern.errors import (
    InvalidTrits,
    MalformedMessage,
    NonFiniteValue,
    ShapeMismatch,
    TernError,
)
from tern.fleet import Fleet
from tern.freshness import Watermarks
from tern.messages import (
    Failure,
    GlobalModel,
    KernelFile,
    KernelRef,
    RoundSchedule,
    TrainConfig,
    Update,
    open_kernel,
)
from tern.reports import RoundMetrics, Status, Telemetry
from tern.spec import ModelSpec
from tern.tensors import TypedArrayTag, encode_array

if TYPE_CHECKING:
    from conftest import ProtocolKit

SLUG = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
LIMIT = 1 << 20
EMPTY_MODULE = KernelFile(1, b"\0asm\1\0\0\0")  # the smallest valid WebAssembly module
EMPTY_MODULE_SHA256 = EMPTY_MODULE.sha256
REJECTED = object()

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def only_tern_errors(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
    """``fn(...)``, or REJECTED if it raised a TernError; any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except TernError as exc:
        assert SLUG.fullmatch(exc.reason), f"{type(exc).__name__} reason {exc.reason!r}"
        return REJECTED


def must_reject(fn: Callable[..., object], *args: object, **kwargs: object) -> TernError:
    with pytest.raises(TernError) as info:
        fn(*args, **kwargs)
    assert SLUG.fullmatch(info.value.reason)
    return info.value


def check_update(body: object, spec: ModelSpec) -> object:
    update = Update.from_body(body)
    return update.check(spec)


def decode_body(value: object, spec: ModelSpec) -> None:
    """Every body-level decoder, on `value` as a body and as each codec's tensors."""
    only_tern_errors(GlobalModel.from_body, value)
    only_tern_errors(RoundSchedule.from_body, value)
    only_tern_errors(KernelRef.from_cbor, value)
    only_tern_errors(KernelFile.from_body, value)
    only_tern_errors(Failure.from_body, value)
    only_tern_errors(TrainConfig.from_cbor, value)
    only_tern_errors(ModelSpec.from_cbor, value)
    only_tern_errors(check_update, value, spec)
    for codec in CodecName:
        as_tensors = {"codec": str(codec), "weight": 1.0, "count": 1, "tensors": [value, value]}
        only_tern_errors(check_update, as_tensors, spec)
        for t in spec.tensors:
            only_tern_errors(codec_for(codec).check, value, t.shape, t.name)


def decode_bytes(data: bytes, kit: ProtocolKit) -> object:
    """Every decoder that takes bytes (or text) from the network; returns open_envelope's result."""
    env = only_tern_errors(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))
    if env is not REJECTED:
        decode_body(env.body, kit.spec)  # type: ignore[attr-defined]
    value = only_tern_errors(loads_bounded, data, LIMIT)
    if value is not REJECTED:
        decode_body(value, kit.spec)
    for n in sorted({0, 1, 4, 5, 6, 5 * len(data) - 1, 5 * len(data)}):
        if n >= 0:
            only_tern_errors(trits.validate_packed, data, n)
            only_tern_errors(trits.unpack, data, n)
    only_tern_errors(topics.parse, data.decode("utf-8", "surrogateescape"))
    only_tern_errors(open_kernel, data, kit_fleet(kit), EMPTY_MODULE_SHA256)
    only_tern_errors(decode, data, Caps(LIMIT, LIMIT))
    only_tern_errors(lambda: Watermarks.from_json(data.decode("utf-8", "replace")))
    for report in (Status, RoundMetrics, Telemetry):
        only_tern_errors(report.from_json, data)
    return env


def kit_fleet(kit: ProtocolKit) -> Fleet:
    """A fleet whose coordinator signs with the kit's key."""
    return Fleet(kit.fleet, kit.key.verify_key, {})


def sealed_messages(kit: ProtocolKit) -> dict[str, bytes]:
    return {
        "model": kit.seal(Kind.MODEL, kit.global_model().to_body()),
        "schedule": kit.seal(Kind.SCHEDULE, kit.schedule().to_body()),
        **{f"update-{c}": kit.sealed_update(c) for c in CodecName},
        "partial-ternary": kit.sealed_update(CodecName.TERNARY, Kind.PARTIAL),
        "kernel": kit.seal(Kind.KERNEL, EMPTY_MODULE.to_body()),
        "failure": kit.seal(Kind.FAILURE, Failure({"kernel_trap": 1}).to_body()),
    }


MESSAGE_NAMES = [
    "model",
    "schedule",
    *(f"update-{c}" for c in CodecName),
    "partial-ternary",
    "kernel",
    "failure",
]


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


def dense_wire(shape: object, tag: int, data: bytes) -> CBORTag:
    return CBORTag(40, [shape, CBORTag(tag, data)])


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


# -- bytes -----------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_tern_errors_in_every_decoder(
    kit: ProtocolKit, data: bytes
) -> None:
    decode_bytes(data, kit)


@FUZZ
@given(
    head=st.sampled_from([b"\xa8", b"\xbf", b"\x9f", b"\xd8\x28\x82", b"\xa4dspec", b"\xa1"]),
    tail=st.binary(max_size=200),
)
def test_random_bytes_under_a_container_header_raise_only_tern_errors(
    kit: ProtocolKit, head: bytes, tail: bytes
) -> None:
    decode_bytes(head + tail, kit)


@pytest.mark.parametrize("name", MESSAGE_NAMES)
def test_every_truncation_of_a_sealed_message_is_rejected(kit: ProtocolKit, name: str) -> None:
    data = sealed_messages(kit)[name]

    opened = [n for n in range(len(data)) if decode_bytes(data[:n], kit) is not REJECTED]

    assert opened == [], "truncated lengths that still opened"


@pytest.mark.parametrize("codec", list(CodecName))
def test_every_bit_flip_of_a_small_sealed_update_is_rejected(
    kit: ProtocolKit, codec: CodecName
) -> None:
    data = kit.sealed_update(codec)

    opened = []
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        if decode_bytes(bytes(flipped), kit) is not REJECTED:
            opened.append(bit)

    assert opened == [], "bit positions whose flip still opened"


@pytest.mark.parametrize("name", MESSAGE_NAMES)
def test_every_bit_flip_of_a_message_body_raises_only_tern_errors(
    kit: ProtocolKit, name: str
) -> None:
    # Below the signature: what a decoder sees if a signer was compromised or buggy.
    body = cbor2.loads(sealed_messages(kit)[name])["body"]
    data = canonical(body)

    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        value = only_tern_errors(loads_bounded, bytes(flipped), LIMIT)
        if value is not REJECTED:
            decode_body(value, kit.spec)


@pytest.fixture(scope="module")
def large_model(kit: ProtocolKit) -> bytes:
    spec = ModelSpec.of({"w": (40, 50), "b": (50,)})
    weights = np.linspace(-1.0, 1.0, spec.size, dtype=np.float32)
    return kit.seal(Kind.MODEL, GlobalModel(spec, weights).to_body())


@settings(max_examples=120, deadline=None)
@given(bits=st.lists(st.integers(0, 2**40), min_size=1, max_size=6, unique=True))
def test_random_bit_flips_of_a_large_sealed_model_are_rejected(
    kit: ProtocolKit, large_model: bytes, bits: list[int]
) -> None:
    flipped = bytearray(large_model)
    for bit in {b % (8 * len(large_model)) for b in bits}:
        flipped[bit // 8] ^= 1 << (bit % 8)

    err = must_reject(open_envelope, bytes(flipped), kit.keys, fleet=kit.fleet, kinds={Kind.MODEL})

    assert err.reason in {"malformed", "bad_signature", "wrong_fleet", "unknown_version",
                          "wrong_kind", "oversize"}  # fmt: skip


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
        only_tern_errors(codec_for(codec).check, wire, shape, "t")


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


# -- pathological CBOR -----------------------------------------------------------------

DEEP = [
    b"\x81" * 10000,  # [[[[...
    b"\xa1\x00" * 10000,  # {0: {0: ...
    b"\x9f" * 10000,  # indefinite arrays
    b"\xbf\x00" * 10000,  # indefinite maps
    b"\xc6" * 100000,  # nested tags
    b"\xd8\x28" * 50000,  # nested tag 40
    b"\xd8\x1c" * 50000,  # nested shareable
    b"\xa8" + b"\x81" * 10000,  # an envelope-sized map, deep inside
    b"\x81" * 17 + b"\x00",  # one level past the bound
]


@pytest.mark.parametrize("data", DEEP, ids=lambda d: f"{d[:4].hex()}x{len(d)}")
def test_deep_nesting_is_rejected_as_malformed(kit: ProtocolKit, data: bytes) -> None:
    loads_err = must_reject(loads_bounded, data, LIMIT)
    open_err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))

    assert isinstance(loads_err, MalformedMessage)
    assert isinstance(open_err, MalformedMessage)


def test_a_signed_envelope_nested_past_the_depth_bound_is_rejected(kit: ProtocolKit) -> None:
    body: object = 0
    for _ in range(20):
        body = [body]
    data = kit.seal(Kind.UPDATE, body)

    err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))

    assert isinstance(err, MalformedMessage)


HUGE_LENGTHS = [
    b"\x5b" + b"\xff" * 8,  # byte string of 2**64-1 bytes
    b"\x7b" + b"\xff" * 8,  # text string
    b"\x9b" + b"\xff" * 8,  # array of 2**64-1 items
    b"\xbb" + b"\xff" * 8,  # map
    b"\x5a\xff\xff\xff\xff" + b"\x00" * 16,  # 4 GiB byte string, 16 bytes present
    b"\x9a\xff\xff\xff\xff\x00",  # array of 4 Gi items, one present
    b"\xa1\x64spec\x9b" + b"\x7f" + b"\xff" * 7,  # inside a map
    b"\x5f\x5b" + b"\xff" * 8,  # as a chunk of an indefinite byte string
]


@pytest.mark.parametrize("data", HUGE_LENGTHS, ids=lambda d: d[:6].hex())
def test_a_huge_declared_length_is_rejected_without_allocating_it(
    kit: ProtocolKit, data: bytes
) -> None:
    err = must_reject(loads_bounded, data, LIMIT)
    decode_bytes(data, kit)

    assert isinstance(err, MalformedMessage)


@pytest.mark.parametrize(
    "data",
    [
        b"\x9f\x01\x02",  # indefinite array, no break
        b"\xbf\x01",  # indefinite map, key without value
        b"\x5f\x41a\x61b\xff",  # indefinite byte string with a text chunk
        b"\x7f\x61a\x5f\xff\xff",  # indefinite text string with a nested indefinite chunk
        b"\xff",  # a lone break
        b"\x82\x01\xff",  # a break inside a definite array
        b"\x1c",  # reserved additional information
        b"\xf8\x10",  # simple value below 32 in two bytes
    ],
    ids=lambda d: d.hex(),
)
def test_broken_indefinite_lengths_and_reserved_forms_are_malformed(data: bytes) -> None:
    err = must_reject(loads_bounded, data, LIMIT)

    assert isinstance(err, MalformedMessage)


def _indefinite(value: object) -> bytes:
    """`value` encoded with indefinite lengths for maps, arrays and strings."""
    if isinstance(value, dict):
        items = b"".join(_indefinite(k) + _indefinite(v) for k, v in value.items())
        return b"\xbf" + items + b"\xff"
    if isinstance(value, list | tuple):
        return b"\x9f" + b"".join(_indefinite(v) for v in value) + b"\xff"
    if isinstance(value, str) and value:
        half = len(value) // 2
        return b"\x7f" + cbor2.dumps(value[:half]) + cbor2.dumps(value[half:]) + b"\xff"
    if isinstance(value, bytes) and value:
        return b"\x5f" + cbor2.dumps(value[:1]) + cbor2.dumps(value[1:]) + b"\xff"
    if isinstance(value, CBORTag):
        return cbor2.dumps(CBORTag(value.tag, None))[:-1] + _indefinite(value.value)
    return cbor2.dumps(value)


@pytest.mark.parametrize("name", MESSAGE_NAMES)
def test_an_indefinite_length_encoding_is_rejected(kit: ProtocolKit, name: str) -> None:
    sealed = sealed_messages(kit)[name]
    data = _indefinite(cbor2.loads(sealed))
    assert data != sealed

    env = decode_bytes(data, kit)

    assert env is REJECTED


def test_duplicate_keys_in_a_cbor_map_are_malformed() -> None:
    err = must_reject(loads_bounded, b"\xa2\x01\x02\x01\x03", LIMIT)

    assert isinstance(err, MalformedMessage)


@pytest.mark.parametrize("key", ["round", "sender", "body", "sig"])
def test_an_envelope_with_a_duplicated_key_is_malformed(kit: ProtocolKit, key: str) -> None:
    # A second value for a signed field would let a receiver read one and verify the other.
    m = cbor2.loads(kit.sealed_update(CodecName.FLOAT32))
    entries = b"".join(canonical(k) + canonical(v) for k, v in m.items())
    data = bytes([0xA0 + len(m) + 1]) + entries + canonical(key) + canonical(m[key])

    err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))

    assert isinstance(err, MalformedMessage)


def test_an_envelope_whose_body_is_a_cyclic_shared_reference_is_malformed(
    kit: ProtocolKit,
) -> None:
    m = cbor2.loads(kit.sealed_update(CodecName.FLOAT32))
    cyclic_body = b"\xd8\x1c\x81\xd8\x1d\x00"  # shareable([sharedref(0)]): a list holding itself
    entries = b"".join(
        canonical(k) + (cyclic_body if k == "body" else canonical(v)) for k, v in m.items()
    )
    data = bytes([0xA0 + len(m)]) + entries

    err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))
    loads_err = must_reject(loads_bounded, data, LIMIT)

    assert isinstance(err, MalformedMessage) and isinstance(loads_err, MalformedMessage)


def test_open_envelope_rejects_bytes_after_the_envelope_map(kit: ProtocolKit) -> None:
    # The wire form is one CBOR map. Junk after it makes a second byte string that
    # verifies as the same signed message, so a receiver cannot treat bytes as identity.
    data = kit.sealed_update(CodecName.FLOAT32) + b"\x00"

    err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))

    assert isinstance(err, MalformedMessage)


# -- bad tensors inside correctly signed updates ---------------------------------------


def _dense(tag: TypedArrayTag, w: object, b: object) -> list[object]:
    dtype = np.float16 if tag is TypedArrayTag.FLOAT16_LE else np.float32
    return [encode_array(np.asarray(w, dtype=dtype), tag), encode_array(np.asarray(b, dtype), tag)]


def _ternary(shape: list[int], scale: object, packed: bytes) -> dict[str, object]:
    return {"shape": shape, "scale": scale, "trits": CBORTag(64, packed)}


ZERO_W = trits.pack(np.zeros(6))  # 6 trits: 2 bytes, 4 padding trits
ZERO_B = trits.pack(np.zeros(3))
F32, F16 = TypedArrayTag.FLOAT32_LE, TypedArrayTag.FLOAT16_LE
NAN_W = [[0.0, math.nan, 0.0], [0.0, 0.0, 0.0]]

BAD_TENSORS = [
    pytest.param(CodecName.FLOAT32, _dense(F32, NAN_W, [0, 0, 0]), NonFiniteValue, id="f32-nan"),
    pytest.param(
        CodecName.FLOAT32, _dense(F32, np.zeros((2, 3)), [0, math.inf, 0]), NonFiniteValue,
        id="f32-inf",
    ),
    pytest.param(CodecName.FLOAT16, _dense(F16, NAN_W, [0, 0, 0]), NonFiniteValue, id="f16-nan"),
    pytest.param(
        CodecName.FLOAT16, _dense(F16, np.zeros((2, 3)), [-math.inf, 0, 0]), NonFiniteValue,
        id="f16-minus-inf",
    ),
    pytest.param(
        CodecName.FLOAT32, _dense(F32, np.zeros((3, 2)), [0, 0, 0]), ShapeMismatch,
        id="f32-transposed",
    ),
    pytest.param(
        CodecName.FLOAT16, _dense(F16, np.zeros((2, 3)), [0, 0]), ShapeMismatch, id="f16-short",
    ),
    pytest.param(
        CodecName.FLOAT32, [dense_wire([2, 3], 85, b"\x00" * 20), _dense(F32, [], [0, 0, 0])[1]],
        ShapeMismatch, id="f32-bytes-short-of-shape",
    ),
    pytest.param(
        CodecName.FLOAT32, _dense(F32, np.zeros((2, 3)), [0, 0, 0])[:1], ShapeMismatch,
        id="f32-one-tensor-missing",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([6], 1.0, ZERO_W), _ternary([3], 1.0, ZERO_B)],
        ShapeMismatch, id="ternary-flattened",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([2, 3], 1.0, bytes([243]) + ZERO_W[1:]),
                            _ternary([3], 1.0, ZERO_B)],
        InvalidTrits, id="ternary-byte-243",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([2, 3], 1.0, bytes([121, 202])), _ternary([3], 1.0, ZERO_B)],
        InvalidTrits, id="ternary-nonzero-padding",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([2, 3], 1.0, ZERO_W + b"\x79"), _ternary([3], 1.0, ZERO_B)],
        InvalidTrits, id="ternary-extra-byte",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([2, 3], math.nan, ZERO_W), _ternary([3], 1.0, ZERO_B)],
        NonFiniteValue, id="ternary-nan-scale",
    ),
    pytest.param(
        CodecName.TERNARY, [_ternary([2, 3], 1e39, ZERO_W), _ternary([3], 1.0, ZERO_B)],
        NonFiniteValue, id="ternary-scale-overflows-float32",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("codec", "tensors", "error"), BAD_TENSORS)
def test_a_signed_update_with_a_bad_tensor_is_rejected_with_the_specific_error(
    kit: ProtocolKit, codec: CodecName, tensors: list[object], error: type[TernError]
) -> None:
    body = {"codec": str(codec), "weight": 2.0, "count": 2, "tensors": tensors}
    env = open_envelope(kit.seal(Kind.UPDATE, body), kit.keys, fleet=kit.fleet, kinds={Kind.UPDATE})
    update = Update.from_body(env.body)

    err = must_reject(update.check, kit.spec)

    assert type(err) is error


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_a_signed_update_with_a_non_finite_weight_is_rejected(
    kit: ProtocolKit, weight: float
) -> None:
    body = {**kit.update(CodecName.FLOAT32).to_body(), "weight": weight}
    env = open_envelope(kit.seal(Kind.UPDATE, body), kit.keys, fleet=kit.fleet, kinds={Kind.UPDATE})

    err = must_reject(Update.from_body, env.body)

    assert isinstance(err, NonFiniteValue)


# -- numbers beyond float range (bignums decode to Python ints of any size) -----------------


@pytest.mark.parametrize("weight", [2**1100, -(2**1100), 2**64, -(2**63) - 1])
def test_a_signed_update_with_a_bignum_weight_is_refused_before_it_is_decoded(
    kit: ProtocolKit, weight: int
) -> None:
    body = {**kit.update(CodecName.FLOAT32).to_body(), "weight": weight}
    data = kit.seal(Kind.UPDATE, body)

    err = must_reject(open_envelope, data, kit.keys, fleet=kit.fleet, kinds={Kind.UPDATE})
    # and as a value, should one ever get through: beyond any float, or a bounded weight
    decoded = only_tern_errors(Update.from_body, body)

    assert isinstance(err, MalformedMessage)
    assert decoded is REJECTED or abs(weight) < 2**65


@pytest.mark.parametrize("field", ["deadline", "lr"])
def test_a_schedule_with_a_bignum_number_is_rejected_with_a_tern_error(
    kit: ProtocolKit, field: str
) -> None:
    body = kit.schedule().to_body()
    if field == "lr":
        body["train"] = {**body["train"], "lr": 2**1100}  # type: ignore[dict-item]
    else:
        body[field] = 2**1100

    err = must_reject(RoundSchedule.from_body, body)

    assert isinstance(err, MalformedMessage | NonFiniteValue)


@pytest.mark.parametrize("scale", [2**1100, -(2**1100)], ids=["plus", "minus"])
def test_a_ternary_tensor_with_a_bignum_scale_is_rejected_with_a_tern_error(
    scale: int,
) -> None:
    wire = _ternary([2, 3], scale, ZERO_W)

    err = must_reject(codec_for(CodecName.TERNARY).check, wire, (2, 3), "w")

    assert isinstance(err, MalformedMessage | NonFiniteValue)


@pytest.mark.parametrize(
    "shape", [[0, 2**63], [0, 2**70], [0, 2**40, 2**40]], ids=["2^63", "2^70", "2^80"]
)
def test_a_model_with_an_empty_tensor_of_huge_dimensions_is_rejected_with_a_tern_error(
    shape: list[int],
) -> None:
    # The product is 0, so parse_shape's element bound passes; numpy cannot make the array.
    body = {"spec": [["w", shape]], "weights": [dense_wire(shape, 85, b"")]}

    err = must_reject(GlobalModel.from_body, body)

    assert isinstance(err, MalformedMessage | ShapeMismatch)
