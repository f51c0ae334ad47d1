"""Ed25519 keys as text: 64 hex digits, one key per file (see README "Keys")."""

from __future__ import annotations

from nacl.signing import SigningKey, VerifyKey

from tern.errors import BadSignature

__all__ = [
    "signing_key_from_text",
    "signing_key_to_text",
    "verify_key_from_text",
    "verify_key_to_text",
]


def _hex32(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise BadSignature(f"{what} is not hexadecimal") from None
    if len(raw) != 32:
        raise BadSignature(f"{what} must be 32 bytes (64 hex digits), got {len(raw)}")
    return raw


def signing_key_from_text(text: str) -> SigningKey:
    return SigningKey(_hex32(text, "signing key"))


def verify_key_from_text(text: str) -> VerifyKey:
    return VerifyKey(_hex32(text, "verify key"))


def signing_key_to_text(key: SigningKey) -> str:
    return bytes(key).hex()


def verify_key_to_text(key: VerifyKey) -> str:
    return bytes(key).hex()
