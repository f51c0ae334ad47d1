"""The cryptography of secure aggregation, all through libsodium (pynacl).

- Key agreement: X25519 (`nacl.bindings.crypto_scalarmult`); a shared point is never
  used as a key itself, only hashed with the round's context (`derive`).
- Keys and seeds: BLAKE2b keyed with a hash of the context (fleet, run, round, server,
  the ids concerned) and personalised with the purpose, so a key of one round, cohort,
  pair or purpose is unrelated to any other. hashlib's BLAKE2b: the same function as
  `nacl.hash.blake2b`, byte for byte, at a tenth of its call overhead (a member of a
  cohort of 500 derives some 1,500 keys per round).
- Masks: libsodium's deterministic generator (`randombytes_buf_deterministic`, ChaCha20)
  expanded into ring elements with numpy, 16-bit words when the ring fits in them.
- Shares travel in a `nacl.secret.SecretBox` (XSalsa20-Poly1305) under a key of the
  ordered pair (sender, receiver): the gateway that relays them cannot read or alter
  them, nor move one to another receiver.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import nacl.bindings
import numpy as np
import numpy.typing as npt
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from tern.errors import TernError

__all__ = [
    "CIPHERTEXT_BYTES",
    "KEY_BYTES",
    "SEED_BYTES",
    "Context",
    "Randomness",
    "SecAggError",
    "SecAggFailed",
    "agree",
    "derive",
    "mask_key",
    "open_box",
    "pair_seed",
    "prg",
    "public_key",
    "ring_dtype",
    "seal_box",
    "self_seed",
    "share_key",
]

Randomness = Callable[[int], bytes]
KEY_BYTES = 32  # an X25519 key, a derived key or a PRG seed
SEED_BYTES = 16  # the two secrets a member shares: self-mask seed and mask-key seed
SHARE_BYTES = 17  # a Shamir share: an element of GF(2^130 - 5)
PLAIN_BYTES = 2 * SHARE_BYTES  # the b-share then the s-share
CIPHERTEXT_BYTES = SecretBox.NONCE_SIZE + SecretBox.MACBYTES + PLAIN_BYTES


class SecAggError(TernError):
    """A secure-aggregation message refused, with the reason (a slug) why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class SecAggFailed(SecAggError):
    """The cohort's round cannot close: too few members left, or a secret unrecoverable."""


def _field(value: str | int) -> bytes:
    raw = str(value).encode()
    return len(raw).to_bytes(2, "big") + raw


class Context:
    """What every derived key of one cohort's round is bound to."""

    __slots__ = ("_hash",)

    def __init__(self, fleet: str, run: int, round: int, server: str) -> None:
        prefix = b"".join(_field(v) for v in ("tern-secagg-1", fleet, run, round, server))
        self._hash = hashlib.blake2b(prefix, digest_size=32)

    def key(self, *ids: str) -> bytes:
        """A 32-byte BLAKE2b key naming this round and the ids concerned, in order."""
        h = self._hash.copy()
        for i in ids:
            h.update(_field(i))
        return h.digest()


def derive(secret: bytes, context_key: bytes, purpose: bytes) -> bytes:
    """A 32-byte key or seed from `secret` for `purpose` (at most 16 bytes) in a context."""
    return hashlib.blake2b(
        secret, digest_size=KEY_BYTES, key=context_key, person=purpose.ljust(16, b"\0")
    ).digest()


def public_key(secret_key: bytes) -> bytes:
    return nacl.bindings.crypto_scalarmult_base(secret_key)


def mask_key(seed: bytes, context: Context, member: str) -> tuple[bytes, bytes]:
    """(secret, public) X25519 mask key of `member` from its 16-byte shared seed."""
    secret = derive(seed, context.key(member), b"mask-key")
    return secret, public_key(secret)


def agree(secret_key: bytes, peer_public: bytes) -> bytes:
    """X25519; a peer key of small order (an all-zero result) is refused."""
    try:
        return nacl.bindings.crypto_scalarmult(secret_key, peer_public)
    except (CryptoError, RuntimeError, ValueError, TypeError):
        raise SecAggError("a peer's X25519 key is not usable", "bad_key") from None


def seal_box(key: bytes, plaintext: bytes, randomness: Randomness) -> bytes:
    nonce = randomness(SecretBox.NONCE_SIZE)
    return bytes(SecretBox(key).encrypt(plaintext, nonce))


def open_box(key: bytes, ciphertext: bytes) -> bytes:
    try:
        return bytes(SecretBox(key).decrypt(ciphertext))
    except (CryptoError, ValueError, TypeError):
        raise SecAggError("a share does not decrypt", "bad_share") from None


def ring_dtype(bits: int) -> type[np.uint16] | type[np.uint32]:
    """The narrowest unsigned type holding the ring: arithmetic wraps modulo 2^16 or
    2^32, a multiple of 2^bits, so masking with 2^bits - 1 at the end is exact."""
    return np.uint16 if bits <= 16 else np.uint32


def prg(seed: bytes, length: int, bits: int) -> npt.NDArray[np.unsignedinteger[Any]]:
    """`length` pseudorandom words of the ring's dtype from a 32-byte seed (ChaCha20).

    Only their low `bits` bits matter (the caller reduces the final sum): both the
    device and the gateway read the same words, so the masks cancel exactly.
    """
    dtype = ring_dtype(bits)
    width = np.dtype(dtype).itemsize
    raw = nacl.bindings.randombytes_buf_deterministic(length * width, seed)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))


def self_seed(b_seed: bytes, context: Context, member: str) -> bytes:
    """The PRG seed of `member`'s self-mask, from its 16-byte shared seed b."""
    return derive(b_seed, context.key(member), b"self-mask")


def pair_seed(shared: bytes, context: Context, u: str, v: str) -> bytes:
    """The PRG seed of the pairwise mask of u and v, from their X25519 point."""
    low, high = sorted((u, v))
    return derive(shared, context.key(low, high), b"pair-mask")


def share_key(shared: bytes, context: Context, sender: str, receiver: str) -> bytes:
    """The SecretBox key of the shares `sender` gives `receiver` (one direction only)."""
    return derive(shared, context.key(sender, receiver), b"share-box")
