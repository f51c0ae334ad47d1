"""The signed CBOR envelope every tern message travels in.

Wire form, a CBOR map (topics.md "Envelope")::

    {"v": 1, "kind": "update", "fleet": "plant-7", "round": 12, "model": 11,
     "sender": "dev-03", "body": ..., "sig": h'...64 bytes...'}

``sig`` is Ed25519 over the deterministic (RFC 8949 section 4.2) encoding of the same
map without ``sig``. The receiver re-encodes what it decoded to verify, so a sender
only has to sign its own canonical bytes.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import cbor2
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from tern.errors import (
    BadSignature,
    MalformedMessage,
    PayloadTooLarge,
    UnexpectedMessage,
    UnknownSchemaVersion,
)
from tern.topics import validate_id

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SCHEMA_VERSIONS",
    "Envelope",
    "Kind",
    "canonical",
    "loads_bounded",
    "open_envelope",
    "seal",
]

SCHEMA_VERSIONS: tuple[int, ...] = (1,)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_MAX_DEPTH = 16  # our deepest structure is 5 levels; anything deeper is hostile
_KEYS = frozenset({"v", "kind", "fleet", "round", "model", "sender", "body", "sig"})
_U32 = 2**32


class Kind(StrEnum):
    MODEL = "model"
    SCHEDULE = "schedule"
    UPDATE = "update"
    PARTIAL = "partial"
    KERNEL = "kernel"
    FAILURE = "failure"


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: Kind
    fleet: str
    round: int
    model_version: int
    sender: str
    body: Any
    version: int = SCHEMA_VERSIONS[-1]

    def _unsigned(self) -> dict[str, object]:
        return {
            "v": self.version,
            "kind": str(self.kind),
            "fleet": self.fleet,
            "round": self.round,
            "model": self.model_version,
            "sender": self.sender,
            "body": self.body,
        }


def canonical(value: object) -> bytes:
    """Deterministic CBOR: shortest forms, map keys sorted."""
    return cbor2.dumps(value, canonical=True)


def loads_bounded(data: bytes, max_bytes: int) -> Any:
    """Decode exactly one CBOR item, size and depth bounded; only TernErrors escape."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(len(data), max_bytes)
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp, max_depth=_MAX_DEPTH, allow_duplicate_keys=False).decode()
    except Exception as exc:  # cbor2 raises several types, and RecursionError/ValueError
        raise MalformedMessage(f"not valid CBOR: {exc}") from exc
    if fp.tell() != len(data):
        raise MalformedMessage(f"{len(data) - fp.tell()} bytes after the CBOR item")
    return value


def seal(env: Envelope, key: SigningKey) -> bytes:
    """Sign and encode `env`."""
    validate_id(env.fleet, "fleet")
    validate_id(env.sender, "sender")
    unsigned = env._unsigned()
    sig = key.sign(canonical(unsigned)).signature
    return canonical({**unsigned, "sig": sig})


def _uint(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _U32:
        raise MalformedMessage(f"envelope field {what!r} must be an integer in [0, 2**32)")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedMessage(f"envelope field {what!r} must be a text string")
    return value


def open_envelope(
    data: bytes,
    keys: Mapping[str, VerifyKey],
    *,
    fleet: str,
    kinds: Collection[Kind],
    round: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Envelope:
    """Decode, check and verify one message; every failure is a TernError with a reason.

    `keys` maps sender id to its verify key: an unknown sender is a bad signature.
    `round`, when given, is the only round accepted (older: ``stale_round``).
    """
    m = loads_bounded(data, max_bytes)
    if not isinstance(m, Mapping):
        raise MalformedMessage("an envelope is a CBOR map")
    if set(m) != _KEYS:
        raise MalformedMessage(f"envelope keys {sorted(map(str, m))} are not {sorted(_KEYS)}")
    version = m["v"]
    if not isinstance(version, int) or isinstance(version, bool) or version not in SCHEMA_VERSIONS:
        raise UnknownSchemaVersion(version, SCHEMA_VERSIONS)
    kind_text = _text(m["kind"], "kind")
    try:
        kind = Kind(kind_text)
    except ValueError:
        raise MalformedMessage(f"unknown message kind {kind_text!r}") from None
    msg_fleet = _text(m["fleet"], "fleet")
    sender = _text(m["sender"], "sender")
    msg_round = _uint(m["round"], "round")
    model_version = _uint(m["model"], "model")
    sig = m["sig"]
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise MalformedMessage("envelope field 'sig' must be 64 bytes")
    if msg_fleet != fleet:
        raise UnexpectedMessage(
            f"message for fleet {msg_fleet!r}, this is {fleet!r}", "wrong_fleet"
        )
    if kind not in kinds:
        raise UnexpectedMessage(
            f"a {kind} message where {sorted(map(str, kinds))} is expected", "wrong_kind"
        )
    key = keys.get(sender)
    if key is None:
        raise BadSignature(f"no key is known for sender {sender!r}")
    env = Envelope(kind, msg_fleet, msg_round, model_version, sender, m["body"], version)
    try:
        signed = canonical(env._unsigned())
    except Exception as exc:  # a decoded value cbor2 cannot encode back
        raise MalformedMessage(f"envelope cannot be re-encoded to verify: {exc}") from exc
    try:
        key.verify(signed, sig)
    except BadSignatureError:
        raise BadSignature(f"signature of {kind} from {sender!r} does not verify") from None
    if round is not None and msg_round != round:
        reason = "stale_round" if msg_round < round else "future_round"
        raise UnexpectedMessage(f"message for round {msg_round}, the open round is {round}", reason)
    return env
