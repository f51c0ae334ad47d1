"""Strict CBOR decoding: only what topics.md documents, at a cost linear in the input.

Every message tern receives is decoded here, never by a general-purpose decoder. The
whitelist (topics.md "Envelope"):

- definite-length byte strings, UTF-8 text strings, arrays and maps (map keys are text,
  each once);
- integers in [-2**63, 2**64) in their shortest encoding (RFC 8949 section 4.2.1);
- half, single and double floats; false, true and null;
- tags 40 (RFC 8746 multi-dimensional array, holding an array) and 64, 84, 85 (typed
  arrays: uint8, float16 little-endian, float32 little-endian, holding a byte string);
- at most 16 levels of nesting.

Anything else (indefinite lengths, bignums, decimal fractions, bigfloats, rationals,
shared references, any other tag, undefined and other simple values, non-shortest
heads) is refused as soon as its head is read, before anything is built from it. The
caller also bounds the input's bytes and its number of data items (`Caps`), so the
work done on any input, accepted or not, is linear in its length and bounded by the
kind of message expected.

`decode_signed_map` also returns the bytes a signature covers: the map without its
``sig`` entry, cut from the received bytes (a map header for one entry fewer, then
every other entry's bytes as received). Nothing decoded is ever encoded again to be
verified, so no structure can be expanded on the way to the signature check.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from cbor2 import CBORTag

from tern.errors import MalformedMessage, PayloadTooLarge, TooComplex

__all__ = [
    "ALLOWED_TAGS",
    "MAX_DEPTH",
    "Caps",
    "decode",
    "decode_signed_map",
    "head",
]

MAX_DEPTH = 16  # our deepest structure has 7 levels
TAG_ARRAY = 40
TYPED_ARRAY_TAGS = frozenset({64, 84, 85})
ALLOWED_TAGS = frozenset({TAG_ARRAY, *TYPED_ARRAY_TAGS})
_INT_MIN = -(1 << 63)
_HALF = struct.Struct(">e")
_SINGLE = struct.Struct(">f")
_DOUBLE = struct.Struct(">d")
# smallest argument that needs each head length: anything below is not the shortest form
_SHORTEST = {24: 24, 25: 1 << 8, 26: 1 << 16, 27: 1 << 32}
_WIDTH = {24: 1, 25: 2, 26: 4, 27: 8}
# Short UTF-8 texts already decoded (map keys, codec and tensor names): bytes -> str. A
# hostile sender can fill it with junk, never grow it past _MAX_TEXTS.
_TEXTS: dict[bytes, str] = {}
_MAX_TEXTS = 1024


@dataclass(frozen=True, slots=True)
class Caps:
    """What a receiver accepts for one kind of message: bytes, and data items in all."""

    max_bytes: int
    max_items: int

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_items < 1:
            raise ValueError("caps must be positive")


class _Decoder:
    __slots__ = ("data", "end", "items", "max_items", "pos")

    def __init__(self, data: bytes, caps: Caps) -> None:
        self.data = data
        self.end = len(data)
        self.pos = 0
        self.items = 0
        self.max_items = caps.max_items

    def _take(self, n: int) -> int:
        start = self.pos
        if n > self.end - start:
            raise MalformedMessage(f"CBOR truncated at byte {start}: {n} more bytes announced")
        self.pos = start + n
        return start

    def _head(self) -> tuple[int, int, int]:
        """(major type, additional info, argument) of the next item; argument of a float
        head is not read here."""
        if self.pos >= self.end:
            raise MalformedMessage(f"CBOR truncated at byte {self.pos}: an item is missing")
        self.items += 1
        if self.items > self.max_items:
            raise TooComplex(f"more than {self.max_items} CBOR data items")
        ib = self.data[self.pos]
        self.pos += 1
        major, info = ib >> 5, ib & 0x1F
        if info < 24:
            return major, info, info
        if info > 27:
            what = "an indefinite length" if info == 31 else "a reserved head"
            raise MalformedMessage(f"CBOR item at byte {self.pos - 1} has {what}")
        if major == 7:
            return major, info, 0
        width = _WIDTH[info]
        start = self._take(width)
        arg = int.from_bytes(self.data[start : start + width], "big")
        if arg < _SHORTEST[info]:
            raise MalformedMessage(f"CBOR item at byte {start - 1} is not in its shortest form")
        return major, info, arg

    def item(self, depth: int) -> Any:
        # The head is read inline (this is the hot path of every receiver): the same
        # checks as `_head`, without a tuple and a call per item.
        pos, data = self.pos, self.data
        if pos >= self.end:
            raise MalformedMessage(f"CBOR truncated at byte {pos}: an item is missing")
        self.items += 1
        if self.items > self.max_items:
            raise TooComplex(f"more than {self.max_items} CBOR data items")
        ib = data[pos]
        major, info = ib >> 5, ib & 0x1F
        self.pos = pos + 1
        if info < 24:
            arg = info
        else:
            self.pos = pos
            self.items -= 1
            major, info, arg = self._head()
        if major == 3:
            start = self._take(arg)
            raw = data[start : start + arg]
            known = _TEXTS.get(raw)
            if known is not None:
                return known
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedMessage(f"CBOR text at byte {start} is not UTF-8") from None
            if arg <= 32 and len(_TEXTS) < _MAX_TEXTS:
                _TEXTS[raw] = text  # map keys and names repeat in every message
            return text
        if major == 0:
            return arg
        if major == 2:
            start = self._take(arg)
            return data[start : start + arg]
        if major == 1:
            value = -1 - arg
            if value < _INT_MIN:
                raise MalformedMessage("a CBOR integer is below -2**63")
            return value
        if major == 7:
            return self._simple(info)
        if depth >= MAX_DEPTH:
            raise MalformedMessage(f"CBOR nested deeper than {MAX_DEPTH} levels")
        if major == 4:
            if arg > self.end - self.pos:  # every item takes at least one byte
                raise MalformedMessage(f"a CBOR array of {arg} items cannot fit what is left")
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            if 2 * arg > self.end - self.pos:
                raise MalformedMessage(f"a CBOR map of {arg} entries cannot fit what is left")
            out: dict[str, Any] = {}
            for _ in range(arg):
                key = self._key()
                if key in out:
                    raise MalformedMessage("a CBOR map repeats a key")
                out[key] = self.item(depth + 1)
            return out
        # major 6: a tag
        if arg not in ALLOWED_TAGS:
            raise MalformedMessage(f"CBOR tag {arg} is not one tern uses (40, 64, 84, 85)")
        value = self.item(depth + 1)
        if arg == TAG_ARRAY:
            if not isinstance(value, list):
                raise MalformedMessage("CBOR tag 40 must hold an array")
        elif not isinstance(value, bytes):
            raise MalformedMessage(f"CBOR typed-array tag {arg} must hold a byte string")
        return CBORTag(arg, value)

    def _key(self) -> str:
        start = self.pos
        if start < self.end and self.data[start] >> 5 != 3:
            raise MalformedMessage(f"CBOR map key at byte {start} is not a text string")
        key = self.item(MAX_DEPTH)  # a text string never nests
        assert isinstance(key, str)
        return key

    def _simple(self, info: int) -> object:
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info == 25:
            start = self._take(2)
            return _HALF.unpack_from(self.data, start)[0]
        if info == 26:
            start = self._take(4)
            return _SINGLE.unpack_from(self.data, start)[0]
        if info == 27:
            start = self._take(8)
            return _DOUBLE.unpack_from(self.data, start)[0]
        raise MalformedMessage(f"CBOR simple value {info} is not one tern uses")

    def finish(self) -> None:
        if self.pos != self.end:
            raise MalformedMessage(f"{self.end - self.pos} bytes after the CBOR item")


def _check_size(data: bytes, caps: Caps) -> None:
    if len(data) > caps.max_bytes:
        raise PayloadTooLarge(len(data), caps.max_bytes)


def decode(data: bytes, caps: Caps) -> Any:
    """Exactly one CBOR item of the whitelist; a TernError for anything else."""
    _check_size(data, caps)
    decoder = _Decoder(bytes(data), caps)
    value = decoder.item(0)
    decoder.finish()
    return value


def head(major: int, arg: int) -> bytes:
    """The shortest head of a major type with an argument (RFC 8949 section 3)."""
    if arg < 24:
        return bytes([major << 5 | arg])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if arg < 1 << (8 * width):
            return bytes([major << 5 | info]) + arg.to_bytes(width, "big")
    raise ValueError("a CBOR argument is below 2**64")


def decode_signed_map(
    data: bytes, caps: Caps, sig_key: str = "sig"
) -> tuple[dict[str, Any], bytes]:
    """A top-level map and the bytes its signature covers (the map without `sig_key`).

    The signed bytes are cut from `data` itself: a map head for one entry fewer, then
    every other entry exactly as received. A sender that signed its deterministic
    encoding and appended ``sig`` in key order gets back exactly what it signed.
    """
    _check_size(data, caps)
    decoder = _Decoder(bytes(data), caps)
    major, _, count = decoder._head()
    if major != 5:
        raise MalformedMessage("a signed message is a CBOR map")
    if 2 * count > decoder.end - decoder.pos:
        raise MalformedMessage(f"a CBOR map of {count} entries cannot fit what is left")
    out: dict[str, Any] = {}
    signed = [b""]
    raw = decoder.data
    for _ in range(count):
        start = decoder.pos
        key = decoder._key()
        if key in out:
            raise MalformedMessage("a CBOR map repeats a key")
        out[key] = decoder.item(1)
        if key != sig_key:
            signed.append(raw[start : decoder.pos])
    decoder.finish()
    if sig_key not in out:
        raise MalformedMessage(f"the map has no {sig_key!r} entry")
    signed[0] = head(5, count - 1)
    return out, b"".join(signed)
