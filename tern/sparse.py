"""Sparse ternary tensors (Sattler et al. 2019, "Sparse Ternary Compression").

A tensor of ``n`` values keeps its ``k`` largest magnitudes, each sent as ``+mu`` or
``-mu`` with ``mu`` the mean magnitude of the kept ones; every other value is zero. The
wire value is a map (topics.md "Sparse tensors")::

    {"shape": [...], "scale": mu, "count": k, "rice": r, "gaps": bytes, "signs": bytes}

Positions ``p_0 < ... < p_{k-1}`` travel as gaps ``g_0 = p_0``, ``g_i = p_i - p_{i-1} - 1``
in a Golomb-Rice code of parameter ``r`` (Rice 1979; the parameter of Sattler et al.'s
Golomb position coding, from ``k / n``). Each gap is ``q = g >> r`` in unary and its ``r``
low bits; the ``gaps`` bit string (first bit = most significant bit of byte 0) holds all
``k`` remainders first (``r`` bits each, most significant first), then all ``k`` quotients
(``q`` zero bits and a one each), then zero bits to the byte. Same code lengths as the
interleaved form; grouped so both ends are a few vector operations, and the quotient
part's ``k`` one-bits find every gap at once. ``signs`` holds one bit per kept value, in
position order (1: negative), padded with zero bits to the byte.

A receiver bounds everything by what it trusts before it decodes: ``k`` by the schedule's
density (`max_count`), ``r`` must be exactly `rice_parameter(k, n)`, so that the bit
string's length is bounded by ``k`` and ``n`` alone (`gaps_bytes_bound`): a sender free
to pick ``r = 0`` could send ``n`` bits where an honest one sends about
``k * (2 + log2(n / k))``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from tern.errors import InvalidSparse, MalformedMessage, NonFiniteValue, ShapeMismatch, brief
from tern.spec import parse_shape

__all__ = [
    "SPARSE_KEYS",
    "CheckedSparse",
    "check_sparse",
    "encode_sparse",
    "gaps_bytes_bound",
    "max_count",
    "rice_parameter",
    "sparse_payload_bound",
    "top_k",
]

F32Array = npt.NDArray[np.float32]
IntpArray = npt.NDArray[np.intp]

SPARSE_KEYS = frozenset({"shape", "scale", "count", "rice", "gaps", "signs"})

# Sattler et al.'s optimal Golomb parameter, b = 1 + floor(log2(log(phi - 1) / log(1 - p)))
# for p = k / n, in integers (log(1 - p) ~ -p for the sparse case, -log(phi - 1) = 0.4812):
# b = bit_length(floor(0.4812 * n / k)). Integer-only, so every receiver computes the same r.
_PHI_NUM, _PHI_DEN = 4812, 10000


def max_count(density: float, n: int) -> int:
    """The most entries a tensor of `n` values keeps at `density`: ceil(density * n), at
    least 1, at most n (0 for an empty tensor)."""
    if not (math.isfinite(density) and 0 < density <= 1):
        raise ValueError(f"density {density!r} is not in (0, 1]")
    return min(n, max(1, math.ceil(density * n)))


def rice_parameter(count: int, n: int) -> int:
    """The Rice parameter of `count` positions among `n` values (0 when none)."""
    if count <= 0:
        return 0
    return int((n * _PHI_NUM) // (_PHI_DEN * count)).bit_length()


def gaps_bytes_bound(count: int, n: int) -> int:
    """The longest valid `gaps` string: gaps sum to at most n - count, so the quotients
    take at most (n - count) >> r zero bits, plus count ones and count * r remainder bits."""
    r = rice_parameter(count, n)
    return -(-(count * (r + 1) + ((n - count) >> r)) // 8)


@lru_cache(maxsize=4096)
def sparse_payload_bound(n: int, most: int) -> int:
    """The most bytes of `gaps` and `signs` together of a valid tensor of `n` values and at
    most `most` entries. Within a run of counts sharing one Rice parameter the size grows
    with the count, so the largest is at the end of a run or at `most`."""
    candidates = {most}
    m = 1
    while (edge := (n * _PHI_NUM) // (_PHI_DEN << (m - 1))) >= 1:
        if edge <= most:
            candidates.add(edge)
        m += 1
    return max(gaps_bytes_bound(c, n) + -(-c // 8) for c in candidates)


def top_k(a: F32Array, k: int) -> IntpArray:
    """Positions, increasing, of the `k` largest values of `a` (non-negative, flat) that
    are above zero; ties at the cut-off go to the lowest positions. Defined by value, not
    by a selection algorithm, so the same input gives the same positions everywhere."""
    n = a.size
    if k <= 0 or n == 0:
        return np.empty(0, dtype=np.intp)
    cut = np.partition(a, n - k)[n - k] if k < n else a.min()
    if cut <= 0:
        return np.flatnonzero(a > 0)
    pos = np.flatnonzero(a >= cut)
    if pos.size > k:  # more ties at the cut than room: keep the first ones
        at = a[pos] == cut
        spare = k - (pos.size - int(np.count_nonzero(at)))
        pos = pos[~at | (np.cumsum(at) <= spare)]
    return pos


def _bits_of(values: npt.NDArray[np.int64], width: int) -> npt.NDArray[np.uint8]:
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)


def encode_sparse(a: F32Array, k: int) -> tuple[dict[str, object], F32Array]:
    """(wire map, decoded tensor) of finite float32 `a`, keeping at most `k` entries."""
    flat = a.reshape(-1)
    n = flat.size
    mag = np.abs(flat)
    pos = top_k(mag, k)
    count = int(pos.size)
    decoded = np.zeros(n, dtype=np.float32)
    r = rice_parameter(count, n)
    if count == 0:
        scale, gaps, signs = np.float32(0.0), b"", b""
    else:
        scale = np.float32(mag[pos].mean(dtype=np.float64))
        neg = flat[pos] < 0
        g = np.diff(pos, prepend=-1).astype(np.int64) - 1
        q = g >> r
        unary = np.zeros(int(q.sum()) + count, dtype=np.uint8)
        unary[np.cumsum(q + 1) - 1] = 1
        bits = np.concatenate([_bits_of(g & ((1 << r) - 1), r), unary])
        gaps = np.packbits(bits).tobytes()
        signs = np.packbits(neg).tobytes()
        decoded[pos] = np.where(neg, -scale, scale)
    wire: dict[str, object] = {
        "shape": list(a.shape),
        "scale": float(scale),
        "count": count,
        "rice": r,
        "gaps": gaps,
        "signs": signs,
    }
    return wire, decoded.reshape(a.shape)


@dataclass(frozen=True, slots=True)
class CheckedSparse:
    """A validated sparse tensor: positions (increasing, < n), signs, scale."""

    positions: IntpArray
    negative: npt.NDArray[np.bool_]
    scale: np.float32

    def add_to(self, acc: F32Array) -> None:
        """``acc += value``: a scatter-add over distinct positions."""
        if self.positions.size:
            acc[self.positions] += np.where(self.negative, -self.scale, self.scale)

    def sq_norm(self) -> float:
        return self.positions.size * float(self.scale) ** 2


def _uint(value: object, what: str, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedMessage(f"{what}: {name} {brief(value)} is not an unsigned integer")
    return value


_F32 = struct.Struct("<f")


def _scale(value: object, what: str) -> np.float32:
    if not isinstance(value, float | int) or isinstance(value, bool):
        raise MalformedMessage(f"{what}: scale is not a number")
    try:  # rounds to float32 as numpy does; OverflowError past float32's largest
        s = _F32.unpack(_F32.pack(value))[0]
    except (OverflowError, struct.error):  # struct.error: an integer past any float
        raise NonFiniteValue(f"{what}: scale {brief(value)} is not finite in float32") from None
    if not math.isfinite(s):
        raise NonFiniteValue(f"{what}: scale {brief(value)} is not finite in float32")
    if s < 0:
        raise MalformedMessage(f"{what}: scale {brief(value)} is negative")
    return np.float32(s)


def check_sparse(
    wire: object, shape: tuple[int, ...], most: int, what: str = "tensor"
) -> CheckedSparse:
    """Validate a sparse tensor of `shape` keeping at most `most` entries. Every length is
    checked against `most` and the shape before a bit is decoded."""
    if not isinstance(wire, Mapping) or set(wire) != SPARSE_KEYS:
        raise MalformedMessage(
            f"{what}: a sparse tensor is a map of shape, scale, count, rice, gaps, signs"
        )
    got = parse_shape(wire["shape"])
    if got != shape:
        raise ShapeMismatch(f"{what}: shape {got} differs from the spec's {shape}")
    n = math.prod(shape)
    scale = _scale(wire["scale"], what)
    count = _uint(wire["count"], what, "count")
    r = _uint(wire["rice"], what, "rice")
    gaps, signs = wire["gaps"], wire["signs"]
    if not isinstance(gaps, bytes) or not isinstance(signs, bytes):
        raise MalformedMessage(f"{what}: gaps and signs must be byte strings")
    if count > min(most, n):
        raise InvalidSparse(f"{what}: {brief(count)} entries where at most {min(most, n)} may be")
    if r != rice_parameter(count, n):
        raise InvalidSparse(f"{what}: rice {brief(r)} is not {rice_parameter(count, n)}")
    if (count == 0) != (scale == 0):
        raise InvalidSparse(f"{what}: a scale of 0 goes with no entries, and only then")
    if len(signs) != -(-count // 8):
        raise InvalidSparse(f"{what}: {count} signs take {-(-count // 8)} bytes")
    if not -(-count * (r + 1) // 8) <= len(gaps) <= gaps_bytes_bound(count, n):
        raise InvalidSparse(f"{what}: gaps of {len(gaps)} bytes do not fit {count} entries")
    if count == 0:
        return CheckedSparse(np.empty(0, dtype=np.intp), np.zeros(0, dtype=bool), scale)
    bits = np.unpackbits(np.frombuffer(gaps, dtype=np.uint8))
    ones = np.flatnonzero(bits[count * r :])
    if ones.size != count or len(gaps) != -(-(count * r + int(ones[-1]) + 1) // 8):
        raise InvalidSparse(f"{what}: gaps do not hold exactly {count} codes, zero-padded")
    g = ones  # quotient i is the zeros between one-bits i - 1 and i, then gap = q << r | low
    g[1:] -= ones[:-1] + 1
    if r:
        g <<= r
        low = bits[: count * r].reshape(count, r)
        if r <= 8:  # a row of r bits, packed to a byte, is the remainder << (8 - r)
            g += np.packbits(low, axis=1)[:, 0] >> (8 - r)
        else:
            g += low @ (np.int64(1) << np.arange(r - 1, -1, -1, dtype=np.int64))
    g += 1
    positions = np.cumsum(g, out=g)
    positions -= 1
    if positions[-1] >= n:
        raise InvalidSparse(f"{what}: a position is past the tensor's {n} values")
    sign_bits = np.unpackbits(np.frombuffer(signs, dtype=np.uint8))
    if sign_bits[count:].any():
        raise InvalidSparse(f"{what}: sign padding bits are not zero")
    return CheckedSparse(positions, sign_bits[:count].view(np.bool_), scale)
