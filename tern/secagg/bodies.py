"""The bodies of the seven secure-aggregation messages (topics.md "Secure aggregation").

Each `from_body` is a whitelist: exact keys, ids checked with `tern.topics.validate_id`,
byte strings of their exact length, maps and lists no longer than the caller allows
(its cohort's neighbourhoods). Anything else is a SecAggError with reason ``malformed``
that never quotes the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tern.errors import TernError, brief
from tern.fields import body_map
from tern.secagg.crypto import CIPHERTEXT_BYTES, KEY_BYTES, SecAggError
from tern.secagg.ring import packed_size
from tern.secagg.shamir import SHARE_BYTES
from tern.topics import validate_id

__all__ = [
    "MAX_KEYS_MESSAGE",
    "InboxBody",
    "KeysBody",
    "MaskedBody",
    "RevealBody",
    "RosterBody",
    "SharesBody",
    "SurvivorsBody",
]

MAX_KEYS_MESSAGE = 512  # a sealed SA_KEYS: envelope with 64-character ids and two keys


def _malformed(what: str) -> SecAggError:
    return SecAggError(f"{what} is malformed", "malformed")


def _map(value: object, keys: frozenset[str], what: str) -> Mapping[str, object]:
    try:
        return body_map(value, keys, what)
    except TernError:
        raise _malformed(f"{what} body") from None


def _id(value: object, what: str) -> str:
    try:
        return validate_id(value, what)  # type: ignore[arg-type]  # validate_id checks str
    except TernError:
        raise SecAggError(f"{what} {brief(value)} is not a valid id", "malformed") from None


def _bytes(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise _malformed(f"{what} (not {size} bytes)")
    return value


def _id_map(value: object, size: int, limit: int, what: str) -> dict[str, bytes]:
    if not isinstance(value, Mapping) or len(value) > limit:
        raise _malformed(f"{what} (a map of at most {limit} entries)")
    return {_id(k, what): _bytes(v, size, what) for k, v in value.items()}


@dataclass(frozen=True, slots=True)
class KeysBody:
    """SA_KEYS: a member's two X25519 public keys (share encryption, masks)."""

    c: bytes
    s: bytes

    def to_body(self) -> dict[str, object]:
        return {"c": self.c, "s": self.s}

    @classmethod
    def from_body(cls, value: object) -> KeysBody:
        m = _map(value, frozenset({"c", "s"}), "sa_keys")
        return cls(_bytes(m["c"], KEY_BYTES, "sa_keys.c"), _bytes(m["s"], KEY_BYTES, "sa_keys.s"))


@dataclass(frozen=True, slots=True)
class RosterBody:
    """SA_ROSTER: the sealed SA_KEYS messages of the member's neighbours, verbatim."""

    to: str
    keys: tuple[bytes, ...]

    def to_body(self) -> dict[str, object]:
        return {"to": self.to, "keys": list(self.keys)}

    @classmethod
    def from_body(cls, value: object, limit: int) -> RosterBody:
        m = _map(value, frozenset({"to", "keys"}), "sa_roster")
        keys = m["keys"]
        if not isinstance(keys, list) or len(keys) > limit:
            raise _malformed(f"sa_roster.keys (a list of at most {limit} messages)")
        for k in keys:
            if not isinstance(k, bytes) or not 0 < len(k) <= MAX_KEYS_MESSAGE:
                raise _malformed("sa_roster.keys entry")
        return cls(_id(m["to"], "sa_roster.to"), tuple(keys))


@dataclass(frozen=True, slots=True)
class SharesBody:
    """SA_SHARES: one ciphertext of the sender's shares for each of its neighbours."""

    to: Mapping[str, bytes]

    def to_body(self) -> dict[str, object]:
        return {"to": dict(sorted(self.to.items()))}

    @classmethod
    def from_body(cls, value: object, limit: int) -> SharesBody:
        m = _map(value, frozenset({"to"}), "sa_shares")
        return cls(_id_map(m["to"], CIPHERTEXT_BYTES, limit, "sa_shares.to"))


@dataclass(frozen=True, slots=True)
class InboxBody:
    """SA_INBOX: the ciphertexts addressed to `to`, by sender (who completed sharing)."""

    to: str
    sources: Mapping[str, bytes]

    def to_body(self) -> dict[str, object]:
        return {"to": self.to, "from": dict(sorted(self.sources.items()))}

    @classmethod
    def from_body(cls, value: object, limit: int) -> InboxBody:
        m = _map(value, frozenset({"to", "from"}), "sa_inbox")
        sources = _id_map(m["from"], CIPHERTEXT_BYTES, limit, "sa_inbox.from")
        return cls(_id(m["to"], "sa_inbox.to"), sources)


@dataclass(frozen=True, slots=True)
class MaskedBody:
    """SA_MASKED: the masked vector, `length` ring elements of `bits` bits, packed."""

    bits: int
    data: bytes

    def to_body(self) -> dict[str, object]:
        return {"bits": self.bits, "data": self.data}

    @classmethod
    def from_body(cls, value: object, length: int, bits: int) -> MaskedBody:
        m = _map(value, frozenset({"bits", "data"}), "sa_masked")
        got = m["bits"]
        if not isinstance(got, int) or isinstance(got, bool) or got != bits:
            raise SecAggError(
                f"a masked vector not in the cohort's ring of {bits} bits", "wrong_ring"
            )
        data = m["data"]
        if not isinstance(data, bytes) or len(data) != packed_size(length, bits):
            raise SecAggError(
                f"a masked vector of {brief(data)}, not {length} elements", "wrong_length"
            )
        return cls(bits, data)


@dataclass(frozen=True, slots=True)
class SurvivorsBody:
    """SA_SURVIVORS: the neighbours of `to` (and `to`) whose masked vector arrived."""

    to: str
    alive: tuple[str, ...]

    def to_body(self) -> dict[str, object]:
        return {"to": self.to, "alive": list(self.alive)}

    @classmethod
    def from_body(cls, value: object, limit: int) -> SurvivorsBody:
        m = _map(value, frozenset({"to", "alive"}), "sa_survivors")
        alive = m["alive"]
        if not isinstance(alive, list) or len(alive) > limit:
            raise _malformed(f"sa_survivors.alive (a list of at most {limit} ids)")
        ids = tuple(_id(a, "sa_survivors.alive") for a in alive)
        if list(ids) != sorted(set(ids)):
            raise _malformed("sa_survivors.alive (not sorted and distinct)")
        return cls(_id(m["to"], "sa_survivors.to"), ids)


@dataclass(frozen=True, slots=True)
class RevealBody:
    """SA_REVEAL: b-shares of survivors and s-shares of dropped members, never both."""

    b: Mapping[str, bytes]
    s: Mapping[str, bytes]

    def to_body(self) -> dict[str, object]:
        return {"b": dict(sorted(self.b.items())), "s": dict(sorted(self.s.items()))}

    @classmethod
    def from_body(cls, value: object, limit: int) -> RevealBody:
        m = _map(value, frozenset({"b", "s"}), "sa_reveal")
        b = _id_map(m["b"], SHARE_BYTES, limit, "sa_reveal.b")
        s = _id_map(m["s"], SHARE_BYTES, limit, "sa_reveal.s")
        if b.keys() & s.keys():
            raise SecAggError("a reveal gives both shares of one member", "both_shares")
        return cls(b, s)
