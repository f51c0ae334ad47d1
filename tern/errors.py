"""The protocol layer's errors: one base, one subclass per way a message can be wrong.

Every decoder in `tern` raises only these. Each carries a `reason`, a short stable
slug that components count in their metrics (``rejected_by_reason``), next to the
human-readable message that they log.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "BadSignature",
    "DigestMismatch",
    "InvalidSparse",
    "InvalidTrits",
    "MalformedMessage",
    "NonFiniteValue",
    "PayloadTooLarge",
    "ShapeMismatch",
    "TernError",
    "TooComplex",
    "TopicError",
    "UnexpectedMessage",
    "UnknownCodec",
    "UnknownSchemaVersion",
    "Unsigned",
    "brief",
]


def brief(value: object, limit: int = 40) -> str:
    """A short description of an untrusted value, safe to put in an error message.

    Never formats more than `limit` characters of it, never converts a huge integer to
    text (Python refuses beyond 4,300 digits) and never recurses into containers.
    """
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        return (
            repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
        )
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"text of {len(value)} characters"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{len(value)} bytes"
    if isinstance(value, list | tuple):
        return f"an array of {len(value)} items"
    if isinstance(value, Mapping):
        return f"a map of {len(value)} entries"
    return f"a {type(value).__name__}"


class TernError(Exception):
    """Base of every error the protocol layer raises."""

    reason: str = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TopicError(TernError):
    """A topic or a topic segment (fleet, component id) is not valid."""

    reason = "bad_topic"


class PayloadTooLarge(TernError):
    """The payload is larger than the receiver accepts."""

    reason = "oversize"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class TooComplex(TernError):
    """More CBOR data items than any valid message of the expected kind holds."""

    reason = "oversize"


class MalformedMessage(TernError):
    """The bytes are not CBOR, or the CBOR does not have the documented structure."""

    reason = "malformed"


class UnknownSchemaVersion(TernError):
    """The envelope names a schema version this build does not speak."""

    reason = "unknown_version"

    def __init__(self, version: object, known: tuple[int, ...]) -> None:
        super().__init__(f"schema version {brief(version)} is not one of {known}")
        self.version = version


class UnknownCodec(TernError):
    """The update names a codec this build does not know."""

    reason = "unknown_codec"


class ShapeMismatch(TernError):
    """A tensor's shape, or the list of tensors, differs from the model spec."""

    reason = "wrong_shape"


class NonFiniteValue(TernError):
    """A tensor or scalar holds NaN or infinity."""

    reason = "non_finite"


class InvalidTrits(TernError):
    """Packed ternary bytes are out of range (a byte above 242) or padding is not zero."""

    reason = "invalid_trits"


class InvalidSparse(TernError):
    """A sparse ternary tensor whose count, Rice parameter, gap codes, positions or sign
    bits are not what its shape and the receiver's density allow."""

    reason = "invalid_sparse"


class BadSignature(TernError):
    """The signature does not verify, or the sender's key is unknown."""

    reason = "bad_signature"


class Unsigned(TernError):
    """Bare content where a signed envelope is required (a raw .wasm on a kernel topic)."""

    reason = "unsigned"


class DigestMismatch(TernError):
    """Content whose SHA-256 is not the one its topic or schedule names."""

    reason = "digest_mismatch"


class UnexpectedMessage(TernError):
    """A well-formed, signed message that is not for us: another fleet, kind or round."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
