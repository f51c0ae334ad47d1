"""Checks of the fields of a message body: each returns the value, or raises the
TernError that names the field (never quoting an unbounded value)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from tern.codecs import CodecName
from tern.errors import MalformedMessage, NonFiniteValue, UnknownCodec, brief

__all__ = [
    "body_map",
    "codec_field",
    "digest_field",
    "number_field",
    "real_field",
    "slug_field",
    "tally_field",
    "uint64_field",
    "uint_field",
]


def body_map(
    value: object, keys: frozenset[str], what: str, optional: frozenset[str] = frozenset()
) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise MalformedMessage(f"{what} body must be a map")
    if not keys <= set(value) <= keys | optional:
        got = sorted(map(str, value))
        raise MalformedMessage(f"{what} body keys {got} are not {sorted(keys)}")
    return value


_SLUG = re.compile(r"[a-z][a-z0-9_]*")


def real_field(value: object, what: str) -> float:
    """Any finite number, as a float."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise MalformedMessage(f"{what} must be a number")
    try:
        f = float(value)
    except OverflowError:  # a CBOR bignum beyond any float
        raise NonFiniteValue(f"{what} is not finite") from None
    if not np.isfinite(f):
        raise NonFiniteValue(f"{what} is not finite")
    return f


def number_field(value: object, what: str, *, positive: bool = False) -> float:
    f = real_field(value, what)
    if f < 0 or (positive and f == 0):
        raise MalformedMessage(f"{what} must be {'positive' if positive else 'non-negative'}")
    return f


def slug_field(value: object, what: str, max_len: int = 32) -> str:
    """A name: 1 to `max_len` characters of a-z, 0-9 and _, starting with a letter."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= max_len
        or not value.isascii()
        or _SLUG.fullmatch(value) is None
    ):
        raise MalformedMessage(
            f"{what} must be a name of at most {max_len} characters of a-z, 0-9 and _, "
            f"got {brief(value)}"
        )
    return value


def uint_field(value: object, what: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 2**32:
        raise MalformedMessage(f"{what} must be an integer in [{minimum}, 2**32)")
    return value


def uint64_field(value: object, what: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 2**63:
        raise MalformedMessage(f"{what} must be an integer in [{minimum}, 2**63)")
    return value


def digest_field(value: object, what: str) -> str:
    if not isinstance(value, bytes) or len(value) != 32:
        raise MalformedMessage(f"{what} must be a 32-byte SHA-256")
    return value.hex()


def tally_field(value: object, what: str) -> dict[str, int]:
    """A {reason: count} map of positive counts with slug-like reasons."""
    if not isinstance(value, Mapping) or len(value) > 64:
        raise MalformedMessage(f"{what} must be a map of at most 64 reasons")
    out: dict[str, int] = {}
    for reason, count in value.items():
        if not isinstance(reason, str) or not 0 < len(reason) <= 64 or not reason.isascii():
            raise MalformedMessage(f"{what} reasons must be short ASCII text")
        out[reason] = uint_field(count, f"{what}[{reason!r}]", 1)  # reason: short ASCII, checked
    return dict(sorted(out.items()))


def codec_field(value: object) -> CodecName:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return CodecName(value)
    except ValueError:
        raise UnknownCodec(
            f"codec {brief(value)} is not one of {[str(c) for c in CodecName]}"
        ) from None
