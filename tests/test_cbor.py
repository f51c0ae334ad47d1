"""The strict CBOR decoder (tern.cbor): the whitelist, the caps, and the signed bytes."""

from __future__ import annotations

import math
import time

import cbor2
import pytest
from cbor2 import CBORTag
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.cbor import MAX_DEPTH, Caps, decode, decode_signed_map, head
from tern.envelope import canonical
from tern.errors import MalformedMessage, PayloadTooLarge, TernError, TooComplex

ROOMY = Caps(1 << 20, 1 << 16)

# What topics.md allows, as cbor2 would encode it deterministically.
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
    | st.builds(CBORTag, st.sampled_from([64, 84, 85]), st.binary(max_size=16))
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5)
        | st.builds(CBORTag, st.just(40), st.lists(inner, max_size=3))
    ),
    max_leaves=25,
)


def same(a: object, b: object) -> bool:
    """Equal, with NaN-free floats compared by value and tags by number and content."""
    if isinstance(a, CBORTag) and isinstance(b, CBORTag):
        return a.tag == b.tag and same(a.value, b.value)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(values)
def test_decode_returns_every_whitelisted_value_cbor2_encodes(value: object) -> None:
    data = canonical(value)

    assert same(decode(data, ROOMY), value)


@pytest.mark.parametrize(
    "tag",
    [0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 32, 35, 36, 37, 41, 65, 86, 256,
     258, 260, 261, 1004, 55799],
)  # fmt: skip
def test_decode_refuses_every_tag_tern_does_not_use(tag: int) -> None:
    data = head(6, tag) + canonical(b"\x01\x02")

    with pytest.raises(MalformedMessage):
        decode(data, ROOMY)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"\x5f\x41\x00\xff", "indefinite byte string"),
        (b"\x7f\x61a\xff", "indefinite text"),
        (b"\x9f\x01\xff", "indefinite array"),
        (b"\xbf\x61a\x01\xff", "indefinite map"),
        (b"\xff", "a lone break"),
        (b"\xf7", "undefined"),
        (b"\xf0", "simple(16)"),
        (b"\xf8\x20", "simple(32)"),
        (b"\x1c", "reserved head 28"),
        (b"\x18\x05", "5 in two bytes"),
        (b"\x19\x00\xff", "255 in three bytes"),
        (b"\x1a\x00\x00\xff\xff", "65535 in five bytes"),
        (b"\x1b\x00\x00\x00\x00\xff\xff\xff\xff", "2**32 - 1 in nine bytes"),
        (b"\x3b\x80\x00\x00\x00\x00\x00\x00\x00", "below -2**63"),
        (b"\xc2\x49\x01" + bytes(8), "a bignum"),
        (b"\xa1\x01\x02", "an integer map key"),
        (b"\xa1\x41a\x02", "a byte-string map key"),
        (b"\xa2\x61a\x01\x61a\x02", "a repeated key"),
        (b"\x63\xff\xfe\xfd", "text that is not UTF-8"),
        (b"\x5a\xff\xff\xff\xff", "a byte string longer than the input"),
        (b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00", "an array longer than the input"),
        (b"\xd8\x28\x01", "tag 40 around an integer"),
        (b"\xd8\x55\x01", "tag 85 around an integer"),
        (b"\x01\x02", "bytes after the item"),
        (b"", "nothing"),
        (b"\x82\x01", "a truncated array"),
        (b"\xfb\x00\x00", "a truncated double"),
    ],
)
def test_decode_refuses_what_topics_md_does_not_document(data: bytes, what: str) -> None:
    with pytest.raises(TernError) as info:
        decode(data, ROOMY)

    assert info.value.reason in ("malformed", "oversize"), what


def test_decode_refuses_nesting_deeper_than_the_limit_and_accepts_the_limit() -> None:
    at_limit = b"\x81" * MAX_DEPTH + b"\x00"
    beyond = b"\x81" * (MAX_DEPTH + 1) + b"\x00"

    decode(at_limit, ROOMY)
    with pytest.raises(MalformedMessage):
        decode(beyond, ROOMY)


def test_decode_checks_the_size_before_it_reads_a_byte() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        decode(b"\xff" * 101, Caps(100, 10))

    assert (info.value.size, info.value.limit) == (101, 100)


def test_decode_counts_every_data_item_against_the_cap() -> None:
    data = canonical(list(range(9)))  # the array and its 9 items: 10 items

    assert decode(data, Caps(100, 10)) == list(range(9))
    with pytest.raises(TooComplex):
        decode(data, Caps(100, 9))


def test_decode_half_single_and_double_floats() -> None:
    assert decode(b"\xf9\x3e\x00", ROOMY) == 1.5
    assert decode(b"\xfa\x3f\xc0\x00\x00", ROOMY) == 1.5
    assert math.isinf(decode(b"\xf9\x7c\x00", ROOMY))  # what to do with it is the caller's


def test_a_shared_reference_bomb_is_refused_in_linear_time() -> None:
    # 28(x) marks x shareable, 29(n) refers back: each level doubles a naive expansion.
    bomb = bytearray(b"\xd8\x1c\x82\x00\x00")
    for _ in range(40):
        bomb = bytearray(b"\xd8\x1c\x82\xd8\x1d\x00\xd8\x1d\x00") + bomb
    started = time.perf_counter()

    with pytest.raises(MalformedMessage):
        decode(bytes(bomb), ROOMY)

    assert time.perf_counter() - started < 0.05


def test_error_messages_stay_short_whatever_the_input() -> None:
    huge_key = canonical({"k" * 100_000: 1, "k" * 100_000 + "x": 2})
    repeated = b"\xa2" + canonical("a" * 50_000) + b"\x01" + canonical("a" * 50_000) + b"\x02"

    for data in (huge_key[:-1], repeated, b"\xc4" + canonical([1, 2**70])):
        with pytest.raises(TernError) as info:
            decode(data, ROOMY)
        assert len(str(info.value)) < 200


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), values, max_size=8), st.binary(max_size=64))
def test_decode_signed_map_returns_the_bytes_that_were_signed(
    body: dict[str, object], sig: bytes
) -> None:
    unsigned = {k: v for k, v in body.items() if k != "sig"}
    sealed = canonical({**unsigned, "sig": sig})

    value, signed = decode_signed_map(sealed, ROOMY)

    assert signed == canonical(unsigned)
    assert value["sig"] == sig


def test_decode_signed_map_needs_a_map_with_a_sig() -> None:
    for value in ([1, 2], {"a": 1}, 5):
        with pytest.raises(MalformedMessage):
            decode_signed_map(canonical(value), ROOMY)


def test_head_is_the_shortest_form_cbor2_writes() -> None:
    for n in (0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1):
        assert head(0, n) == cbor2.dumps(n)
