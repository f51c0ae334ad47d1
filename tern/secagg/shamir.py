"""Shamir t-of-n secret sharing over GF(2^130 - 5), in Python integers.

A secret (a 16-byte seed, below 2^128) is the constant term of a random polynomial of
degree t - 1; holder i gets its value at x = i (1-based). Any t shares give the secret
back (Lagrange at 0); t - 1 shares are uniformly distributed whatever the secret, so
they say nothing about it.

Hand-written because pycryptodome's `Crypto.Protocol.SecretSharing.Shamir` (GF(2^128),
one secret per call, objects per share) measured 118 ms per 51-of-100 split and 180 ms
per combine: a cohort of 500 rebuilds hundreds of secrets per round. Here a split is a
Horner evaluation per holder, and the Lagrange coefficients of a set of holders are
computed once (one batched inversion) and reused for every secret they rebuild.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

__all__ = ["PRIME", "SHARE_BYTES", "combine", "from_bytes", "lagrange", "split", "to_bytes"]

PRIME = (1 << 130) - 5
SHARE_BYTES = 17
_TOP = (1 << 130) - 1
_MAX_X = 4097  # holders of one secret: a member and up to 4,096 neighbours


def _coefficients(count: int, randomness: Callable[[int], bytes]) -> list[int]:
    """`count` uniform field elements: 130 random bits each, the rare value >= p redrawn."""
    out: list[int] = []
    while len(out) < count:
        need = count - len(out)
        raw = randomness(SHARE_BYTES * need)
        for k in range(need):
            value = int.from_bytes(raw[k * SHARE_BYTES : (k + 1) * SHARE_BYTES], "big") & _TOP
            if value < PRIME:
                out.append(value)
    return out


def split(
    secret: int, threshold: int, xs: Sequence[int], randomness: Callable[[int], bytes]
) -> list[int]:
    """Shares of `secret` at the points `xs` (distinct, in 1..p-1): any `threshold` of
    them rebuild it."""
    if not 0 <= secret < PRIME:
        raise ValueError("a Shamir secret must be a field element")
    if not 1 <= threshold <= len(xs):
        raise ValueError("the threshold must be between 1 and the number of holders")
    if any(not 0 < x <= _MAX_X for x in xs) or len(set(xs)) != len(xs):
        raise ValueError(f"Shamir points must be distinct, in 1..{_MAX_X}")
    poly = _coefficients(threshold - 1, randomness)  # degree 1 .. t-1
    poly.reverse()
    # Horner, reduced every 16 steps: each step adds at most 13 bits (x <= 4097), and
    # Python's big integers multiply by a small x far faster than they reduce
    chunks = [poly[i : i + 16] for i in range(0, len(poly), 16)]
    p = PRIME
    out = []
    for x in xs:
        acc = 0
        for chunk in chunks:
            for c in chunk:
                acc = (acc + c) * x
            acc %= p
        out.append((acc + secret) % p)
    return out


@lru_cache(maxsize=4096)
def lagrange(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients l_i with f(0) = sum l_i f(x_i) for any f of degree < len(xs)."""
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("Shamir points must be distinct and nonzero")
    p = PRIME
    numerator = 1
    for x in xs:
        numerator = numerator * x % p
    denominators = []
    for i, xi in enumerate(xs):
        d = xi
        for j, xj in enumerate(xs):
            if j != i:
                d = d * (xj - xi) % p
        denominators.append(d)
    # one inversion for all (Montgomery's trick)
    prefix = [1]
    for d in denominators:
        prefix.append(prefix[-1] * d % p)
    inverse = pow(prefix[-1], -1, p)
    out = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):
        out[i] = numerator * inverse * prefix[i] % p
        inverse = inverse * denominators[i] % p
    return tuple(out)


def combine(points: Sequence[tuple[int, int]], threshold: int) -> int:
    """The secret from the first `threshold` of (x, share) `points`.

    Fewer points than the threshold is an error, never a guess: they determine nothing.
    """
    if len(points) < threshold:
        raise ValueError("fewer Shamir shares than the threshold")
    chosen = sorted(points)[:threshold]
    coefficients = lagrange(tuple(x for x, _ in chosen))
    return sum(c * y for c, (_, y) in zip(coefficients, chosen, strict=True)) % PRIME


def to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def from_bytes(raw: bytes) -> int | None:
    """A share from its 17 bytes; None when it is not a field element."""
    if len(raw) != SHARE_BYTES:
        return None
    value = int.from_bytes(raw, "big")
    return value if value < PRIME else None
