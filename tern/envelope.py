"""The signed CBOR envelope every tern message travels in.

Wire form, a CBOR map (topics.md "Envelope")::

    {"v": 2, "kind": "update", "fleet": "plant-7", "run": 1764500000000, "round": 12,
     "model": 11, "sender": "dev-03", "body": ..., "sig": h'...64 bytes...'}

``sig`` is Ed25519 over the deterministic (RFC 8949 section 4.2) encoding of the same
map without ``sig``. A receiver decodes with the strict whitelist of `tern.cbor` and
verifies over the received bytes minus the ``sig`` entry (`tern.cbor.decode_signed_map`):
it never encodes an attacker's structure again, so a sender must send exactly the
deterministic encoding it signed (what `seal` does).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import cbor2
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from tern.cbor import Caps, decode, decode_signed_map
from tern.errors import (
    BadSignature,
    MalformedMessage,
    UnexpectedMessage,
    UnknownSchemaVersion,
)
from tern.topics import validate_id

__all__ = [
    "DEFAULT_MAX_BYTES",
    "INSPECT_CAPS",
    "SCHEMA_VERSIONS",
    "Envelope",
    "Kind",
    "canonical",
    "loads_bounded",
    "open_envelope",
    "seal",
]

SCHEMA_VERSIONS: tuple[int, ...] = (2,)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# For people looking at a message (`tern inspect`), not for receivers: each receiver
# opens each kind of message under that kind's own caps (tern.caps).
INSPECT_CAPS = Caps(DEFAULT_MAX_BYTES, 1 << 20)
_KEYS = frozenset({"v", "kind", "fleet", "run", "round", "model", "sender", "body", "sig"})
_U32 = 2**32
_U64 = 2**64


class Kind(StrEnum):
    MODEL = "model"
    MODEL_DELTA = "model_delta"  # tern.downlink
    SCHEDULE = "schedule"
    UPDATE = "update"
    PARTIAL = "partial"
    KERNEL = "kernel"
    FAILURE = "failure"
    # secure aggregation in a gateway's cohort (tern.secagg; topics.md "Secure aggregation")
    SA_KEYS = "sa_keys"
    SA_ROSTER = "sa_roster"
    SA_SHARES = "sa_shares"
    SA_INBOX = "sa_inbox"
    SA_MASKED = "sa_masked"
    SA_SURVIVORS = "sa_survivors"
    SA_REVEAL = "sa_reveal"


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: Kind
    fleet: str
    round: int
    model_version: int
    sender: str
    body: Any
    version: int = SCHEMA_VERSIONS[-1]
    run: int = 0  # the coordinator's run (topics.md "Freshness"); 0 only in tests

    def _unsigned(self) -> dict[str, object]:
        return {
            "v": self.version,
            "kind": str(self.kind),
            "fleet": self.fleet,
            "run": self.run,
            "round": self.round,
            "model": self.model_version,
            "sender": self.sender,
            "body": self.body,
        }


def canonical(value: object) -> bytes:
    """Deterministic CBOR: shortest forms, map keys sorted."""
    return cbor2.dumps(value, canonical=True)


def loads_bounded(data: bytes, max_bytes: int) -> Any:
    """Decode exactly one CBOR item of tern's whitelist (`tern.cbor`), at most `max_bytes`
    long; only TernErrors escape. For tools and tests: receivers use `open_envelope`."""
    return decode(data, Caps(max_bytes, max(1, max_bytes)))


def seal(env: Envelope, key: SigningKey) -> bytes:
    """Sign and encode `env`."""
    validate_id(env.fleet, "fleet")
    validate_id(env.sender, "sender")
    unsigned = env._unsigned()
    sig = key.sign(canonical(unsigned)).signature
    return canonical({**unsigned, "sig": sig})


def _uint(value: object, what: str, bound: int = _U32) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < bound:
        limit = "2**32" if bound == _U32 else "2**64"
        raise MalformedMessage(f"envelope field {what!r} must be an integer in [0, {limit})")
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
    caps: Caps = INSPECT_CAPS,
    round: int | None = None,
    run: int | None = None,
    sender: str | None = None,
) -> Envelope:
    """Decode, check and verify one message; every failure is a TernError with a reason.

    `caps` bounds the bytes and the CBOR items before anything is decoded (receivers pass
    the caps of the kind they expect, `tern.caps`). `keys` maps sender id to its verify
    key: an unknown sender is a bad signature. `sender` (the one its topic names),
    `round` and `run`, when given, are the only ones accepted (``wrong_sender``; older:
    ``stale_round`` / ``stale_run``).
    """
    m, signed = decode_signed_map(data, caps)
    if set(m) != _KEYS:
        raise MalformedMessage("envelope keys are not exactly those of topics.md")
    version = m["v"]
    if not isinstance(version, int) or isinstance(version, bool) or version not in SCHEMA_VERSIONS:
        raise UnknownSchemaVersion(version, SCHEMA_VERSIONS)
    kind_text = _text(m["kind"], "kind")
    try:
        kind = Kind(kind_text)
    except ValueError:
        raise MalformedMessage("unknown message kind") from None
    msg_fleet = _text(m["fleet"], "fleet")
    msg_sender = _text(m["sender"], "sender")
    msg_run = _uint(m["run"], "run", _U64)
    msg_round = _uint(m["round"], "round")
    model_version = _uint(m["model"], "model")
    sig = m["sig"]
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise MalformedMessage("envelope field 'sig' must be 64 bytes")
    if msg_fleet != fleet:
        raise UnexpectedMessage(f"message for another fleet, this is {fleet!r}", "wrong_fleet")
    if kind not in kinds:
        raise UnexpectedMessage(
            f"a {kind} message where {sorted(map(str, kinds))} is expected", "wrong_kind"
        )
    if sender is not None and msg_sender != sender:
        raise UnexpectedMessage(f"signed by another sender than {sender!r}", "wrong_sender")
    key = keys.get(msg_sender)
    if key is None:
        raise BadSignature("no key is known for the sender")
    try:
        key.verify(signed, sig)
    except BadSignatureError:
        raise BadSignature(f"signature of {kind} from {msg_sender!r} does not verify") from None
    if run is not None and msg_run != run:
        reason = "stale_run" if msg_run < run else "future_run"
        raise UnexpectedMessage(f"message of run {msg_run}, this is run {run}", reason)
    if round is not None and msg_round != round:
        reason = "stale_round" if msg_round < round else "future_round"
        raise UnexpectedMessage(f"message for round {msg_round}, the open round is {round}", reason)
    body = m["body"]
    return Envelope(kind, msg_fleet, msg_round, model_version, msg_sender, body, version, msg_run)
