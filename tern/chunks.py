"""Messages larger than a broker takes, as chunks and a manifest: pure, no I/O.

A sender splits a payload too large for its broker into chunks (`split`), keeps each
retained under its SHA-256 (`tern.topics.chunk`), and publishes a small manifest on the
original topic (`encode_manifest`): the payload's SHA-256 and size, and the digests of
its chunks in order. A receiver decodes a manifest strictly (`decode_manifest`, within
the bound it keeps for that topic) and collects its chunks in a `Reassembler`, which
bounds what it holds: one reassembly per topic, `max_pending` in all, `budget` bytes
reserved for them at once, each dropped after `timeout` seconds on its injected clock.
Every refusal is a `ChunkRefused` with a reason (topics.md "Chunks").

The chunk layer adds integrity, not authenticity: a reassembled payload is the signed
envelope it was, and its receiver verifies it as if it had come whole.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tern.cbor import Caps, decode, head
from tern.errors import TernError, TopicError, brief
from tern.topics import validate_id

__all__ = [
    "CHUNK_REASONS",
    "MANIFEST_VERSION",
    "MIN_CHUNK",
    "ChunkRefused",
    "Done",
    "Manifest",
    "Reassembler",
    "Started",
    "decode_manifest",
    "encode_manifest",
    "is_manifest",
    "manifest_caps",
    "max_parts",
    "split",
]

MANIFEST_VERSION = 1
# The smallest chunk a sender makes (but the last): a receiver refuses a manifest of
# more parts than its size needs at this size, which bounds the manifest, and the
# subscriptions and bookkeeping it costs, by the payload a topic may carry.
MIN_CHUNK = 8192
# The marker a manifest starts with: a map of five entries whose first key is "chunked".
# A payload that starts so is a manifest or is refused; any other passes through.
_MARK = head(5, 5) + head(3, 7) + b"chunked"
_DIGEST = 32

CHUNK_REASONS = (
    "chunk_malformed",  # not a manifest of the documented form
    "chunk_oversize",  # more bytes than the topic's bound, the budget, or its own size
    "chunk_sender",  # the manifest names another sender than its topic
    "chunk_busy",  # no room: max_pending reassemblies or the byte budget in use
    "chunk_digest",  # a chunk whose bytes do not hash to the digest it is kept under
    "chunk_mismatch",  # all chunks in, but the whole is not the manifest's size or SHA-256
    "chunk_timeout",  # not complete within the timeout
)


class ChunkRefused(TernError):
    """A manifest or a chunk refused; `reason` is one of CHUNK_REASONS."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a chunked payload is: its SHA-256 and size, its chunks' SHA-256 in order
    (a chunk may repeat), and the member that keeps them."""

    sha256: bytes
    size: int
    parts: tuple[bytes, ...]
    sender: str


def split(payload: bytes, chunk_size: int, sender: str) -> tuple[Manifest, list[bytes]]:
    """The manifest of `payload` and its chunks of `chunk_size` bytes (the last shorter)."""
    if chunk_size < MIN_CHUNK:
        raise ValueError(f"chunks are at least {MIN_CHUNK} bytes")
    if not payload:
        raise ValueError("an empty payload is not chunked")
    validate_id(sender, "sender")
    chunks = [payload[i : i + chunk_size] for i in range(0, len(payload), chunk_size)]
    parts = tuple(hashlib.sha256(c).digest() for c in chunks)
    return Manifest(hashlib.sha256(payload).digest(), len(payload), parts, sender), chunks


def encode_manifest(m: Manifest) -> bytes:
    """The manifest's only encoding: keys chunked, sha256, size, parts, sender, in this
    order, every head in its shortest form."""
    sender = m.sender.encode("utf-8")
    out = [_MARK, head(0, MANIFEST_VERSION)]
    out += [head(3, 6), b"sha256", head(2, len(m.sha256)), m.sha256]
    out += [head(3, 4), b"size", head(0, m.size)]
    out += [head(3, 5), b"parts", head(4, len(m.parts))]
    out += [head(2, len(p)) + p for p in m.parts]
    out += [head(3, 6), b"sender", head(3, len(sender)), sender]
    return b"".join(out)


def is_manifest(payload: bytes) -> bool:
    """Whether `payload` claims to be a manifest (and must then decode as one)."""
    return payload.startswith(_MARK)


def max_parts(size: int) -> int:
    """The most chunks a payload of `size` bytes may come in."""
    return max(1, math.ceil(size / MIN_CHUNK))


def manifest_caps(max_size: int) -> Caps:
    """The largest manifest of a payload of at most `max_size` bytes."""
    parts = max_parts(max_size)
    return Caps(128 + 64 + (2 + _DIGEST) * parts, 12 + parts)


def decode_manifest(data: bytes, max_size: int) -> Manifest:
    """The manifest `data` holds, for a payload of at most `max_size` bytes; ChunkRefused
    (chunk_malformed or chunk_oversize) for anything else. The work is bounded by
    `manifest_caps(max_size)` before anything is decoded."""
    try:
        value = decode(data, manifest_caps(max_size))
    except TernError as exc:
        why = "chunk_oversize" if exc.reason == "oversize" else "chunk_malformed"
        raise ChunkRefused(f"manifest: {exc.message}", why) from None
    if not isinstance(value, dict) or set(value) != {"chunked", "sha256", "size", "parts",
                                                      "sender"}:  # fmt: skip
        raise ChunkRefused("manifest: not the map of its five keys", "chunk_malformed")
    version, sha, size, parts, sender = (value[k] for k in ("chunked", "sha256", "size",
                                                              "parts", "sender"))  # fmt: skip
    if version != MANIFEST_VERSION or isinstance(version, bool):
        raise ChunkRefused(f"manifest version {brief(version)} is not 1", "chunk_malformed")
    if not isinstance(sha, bytes) or len(sha) != _DIGEST:
        raise ChunkRefused("manifest: sha256 is not 32 bytes", "chunk_malformed")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ChunkRefused(f"manifest: size {brief(size)} is not a positive integer",
                           "chunk_malformed")  # fmt: skip
    if size > max_size:
        raise ChunkRefused(f"manifest of {size} bytes, above {max_size}", "chunk_oversize")
    if not isinstance(parts, list) or not 1 <= len(parts) <= max_parts(size):
        raise ChunkRefused(f"manifest: parts is not 1 to {max_parts(size)} digests",
                           "chunk_malformed")  # fmt: skip
    if not all(isinstance(p, bytes) and len(p) == _DIGEST for p in parts):
        raise ChunkRefused("manifest: a part is not a 32-byte digest", "chunk_malformed")
    try:
        validate_id(sender, "sender")
    except TopicError as exc:
        raise ChunkRefused(f"manifest: {exc.message}", "chunk_malformed") from None
    m = Manifest(sha, size, tuple(parts), sender)
    if encode_manifest(m) != data:  # one encoding only: key order, shortest heads
        raise ChunkRefused("manifest: not in its one encoding", "chunk_malformed")
    return m


@dataclass(frozen=True, slots=True)
class Done:
    """The payload of `manifest`, reassembled, for `topic` (retained when `retain`)."""

    topic: str
    payload: bytes
    retain: bool
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class Started:
    """A manifest admitted on `topic`; `replaced`: the one it replaced there, if any;
    `again`: it is the one already pending there (a copy: nothing changes); `done`: its
    payload, when the chunks other reassemblies hold made it whole at once."""

    topic: str
    manifest: Manifest
    replaced: Manifest | None = None
    again: bool = False
    done: Done | None = None


@dataclass(slots=True)
class _Pending:
    manifest: Manifest
    retain: bool
    deadline: float
    missing: set[bytes]
    have: dict[bytes, bytes] = field(default_factory=dict)
    claimed: int = 0  # bytes of the payload the chunks in hand make, repeats counted


class Reassembler:
    """Reassemblies in progress, bounded: one per topic, `max_pending` in all, `budget`
    bytes reserved (each reserves its manifest's size when admitted, so the chunks held
    never exceed the budget), each dropped `timeout` seconds after its manifest. Not
    thread-safe: its owner holds a lock."""

    def __init__(
        self,
        *,
        max_pending: int = 16,
        budget: int = 64 << 20,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_pending < 1 or budget < 1 or not timeout > 0:
            raise ValueError("max_pending, budget and timeout must be positive")
        self.max_pending, self.budget, self.timeout = max_pending, budget, timeout
        self._clock = clock
        self._pending: dict[str, _Pending] = {}

    @property
    def reserved(self) -> int:
        """Bytes reserved by the reassemblies pending (at least those held)."""
        return sum(p.manifest.size for p in self._pending.values())

    @property
    def held(self) -> int:
        """Bytes of chunks held now."""
        return sum(len(c) for p in self._pending.values() for c in p.have.values())

    def pending(self) -> dict[str, Manifest]:
        return {t: p.manifest for t, p in self._pending.items()}

    def wanted(self) -> set[tuple[str, bytes]]:
        """(sender, digest) of every chunk some reassembly still needs."""
        return {(p.manifest.sender, d) for p in self._pending.values() for d in p.missing}

    def offer_manifest(self, topic: str, manifest: Manifest, retain: bool) -> Started:
        """Start collecting `manifest`'s chunks for `topic`; ChunkRefused (chunk_busy or
        chunk_oversize) when there is no room for it."""
        old = self._pending.get(topic)
        if old is not None and old.manifest == manifest:
            old.retain = retain
            return Started(topic, manifest, again=True)
        others = self.reserved - (0 if old is None else old.manifest.size)
        if manifest.size > self.budget:
            raise ChunkRefused(f"a manifest of {manifest.size} bytes, above the budget of"
                               f" {self.budget}", "chunk_oversize")  # fmt: skip
        if others + manifest.size > self.budget or (
            old is None and len(self._pending) >= self.max_pending
        ):
            raise ChunkRefused(f"no room for a reassembly of {manifest.size} bytes"
                               f" ({len(self._pending)} pending)", "chunk_busy")  # fmt: skip
        pending = _Pending(manifest, retain, self._clock() + self.timeout, set(manifest.parts))
        # chunks another reassembly of the same sender already holds serve this one too
        for other in self._pending.values():
            if other.manifest.sender == manifest.sender:
                for digest in pending.missing & other.have.keys():
                    self._take(pending, digest, other.have[digest])
        replaced = None if old is None else old.manifest
        whole = self._complete(pending)
        if whole is not None:  # every chunk was in hand already
            self._pending.pop(topic, None)
            return Started(topic, manifest, replaced, done=Done(topic, whole, retain, manifest))
        self._pending[topic] = pending  # replaces the older one of `topic`
        return Started(topic, manifest, replaced)

    def offer_chunk(self, sender: str, digest: bytes, data: bytes) -> list[Done]:
        """Hand in the chunk `sender` keeps under `digest`: the payloads it completes.
        A chunk no reassembly needs is ignored (an empty list); ChunkRefused with
        chunk_digest when its bytes do not hash to `digest`, and with chunk_oversize or
        chunk_mismatch for a reassembly it makes impossible (dropped then)."""
        takers = [
            (t, p)
            for t, p in self._pending.items()
            if p.manifest.sender == sender and digest in p.missing
        ]
        if not takers:
            return []
        if hashlib.sha256(data).digest() != digest:
            raise ChunkRefused(f"a chunk of {sender} is not the bytes of its digest",
                               "chunk_digest")  # fmt: skip
        done: list[Done] = []
        refused: ChunkRefused | None = None
        for topic, pending in takers:
            try:
                self._take(pending, digest, data)
                whole = self._complete(pending)
            except ChunkRefused as exc:
                del self._pending[topic]
                refused = exc
                continue
            if whole is not None:
                del self._pending[topic]
                done.append(Done(topic, whole, pending.retain, pending.manifest))
        if refused is not None and not done:
            raise refused
        return done

    def drop(self, topic: str) -> Manifest | None:
        """Forget the reassembly of `topic` (its receiver no longer listens)."""
        pending = self._pending.pop(topic, None)
        return None if pending is None else pending.manifest

    def expire(self) -> list[tuple[str, Manifest]]:
        """Drop every reassembly past its deadline: (topic, manifest) of each."""
        now = self._clock()
        late = [t for t, p in self._pending.items() if p.deadline <= now]
        return [(t, self._pending.pop(t).manifest) for t in late]

    @staticmethod
    def _take(pending: _Pending, digest: bytes, data: bytes) -> None:
        """Keep a chunk, unless it would make more than the manifest's size."""
        m = pending.manifest
        claimed = pending.claimed + len(data) * m.parts.count(digest)
        if claimed > m.size:
            raise ChunkRefused(f"chunks of {claimed} bytes for a payload of {m.size}",
                               "chunk_oversize")  # fmt: skip
        pending.missing.discard(digest)
        pending.have[digest] = data
        pending.claimed = claimed

    @staticmethod
    def _complete(pending: _Pending) -> bytes | None:
        m = pending.manifest
        if pending.missing:
            return None
        whole = b"".join(pending.have[d] for d in m.parts)
        if len(whole) != m.size or hashlib.sha256(whole).digest() != m.sha256:
            raise ChunkRefused("the chunks do not make the manifest's payload", "chunk_mismatch")
        return whole
