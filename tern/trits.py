"""Packing of trits {-1, 0, +1} five to a byte, base 3, and the fast decode.

Byte layout (the wire contract, see topics.md "Ternary tensors"): a tensor of ``n``
values is padded with zero trits to ``5 * nb`` values, ``nb = ceil(n / 5)``, and split
into a *head* of ``4 * nb`` values and a *tail* of ``nb`` values. Byte ``i`` carries
head values ``4i .. 4i+3`` as base-3 digits 0..3 and tail value ``i`` as digit 4::

    byte[i] = sum(3**k * (trit_k + 1) for k in 0..4)       # 0 .. 242

Why not five neighbours per byte: decoding is a table gather, and numpy copies
16-byte and 4-byte rows through fast paths but 20-byte rows through memmove. The
head/tail split turns one 20-byte gather into a 16-byte and a 4-byte one and measured
~1,970 M params/s decode+accumulate against ~800 for five neighbours (1M params, one
core); bench/codec.py keeps measuring it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from tern.errors import InvalidTrits

__all__ = [
    "MAX_BYTE",
    "accumulate_packed",
    "count_nonzero",
    "pack",
    "pack_cut",
    "packed_size",
    "unpack",
    "validate_packed",
]

MAX_BYTE = 242  # 3**5 - 1

# _DIGITS[b, k] = trit k of byte b, as -1/0/+1
_DIGITS = ((np.arange(243)[:, None] // 3 ** np.arange(5)) % 3 - 1).astype(np.int8)
_HEAD_F32 = np.ascontiguousarray(_DIGITS[:, :4], dtype=np.float32)
_TAIL_F32 = np.ascontiguousarray(_DIGITS[:, 4], dtype=np.float32)
_HEAD_WEIGHTS = np.array([1, 3, 9, 27], dtype=np.uint8)
_SMALL = 512  # packed bytes up to which pack() takes the matmul form (same bytes)
_NONZERO = np.count_nonzero(_DIGITS, axis=1).astype(np.int64)  # non-zero trits per byte

Int8Array = npt.NDArray[np.int8]
UInt8Array = npt.NDArray[np.uint8]
F32Array = npt.NDArray[np.float32]


def packed_size(n: int) -> int:
    """Bytes needed for `n` trits."""
    return -(-n // 5)


def pack(trits: npt.ArrayLike) -> bytes:
    """Pack a flat sequence of -1/0/+1 into bytes (layout in the module docstring)."""
    t = np.asarray(trits).reshape(-1)
    n = t.size
    nb = packed_size(n)
    digits = np.ones(5 * nb, dtype=np.uint8)  # digit 1 is trit 0: the padding
    if t.dtype == np.int8:  # the codec's case: one wrapping uint8 add, -1 -> 0 .. 1 -> 2
        np.add(t.view(np.uint8), np.uint8(1), out=digits[:n])
        if n and int(digits[:n].max()) > 2:
            raise ValueError("trits must be exactly -1, 0 or +1")
    else:
        if n and not np.isin(t, (-1, 0, 1)).all():  # also refuses NaN and fractions
            raise ValueError("trits must be exactly -1, 0 or +1")
        digits[:n] = t + 1
    return _combine(digits, nb)


def pack_cut(x: F32Array, cut: np.float32) -> tuple[bytes, UInt8Array]:
    """`pack` of the trits of flat float32 `x` at threshold `cut` (+1 where x >= cut, -1
    where x <= -cut, else 0; `cut` > 0), without an int8 trit array in between; returns
    the bytes and the n digits (trit + 1), a view for the caller's decoded value."""
    n = x.size
    nb = packed_size(n)
    digits = np.ones(5 * nb, dtype=np.uint8)
    d = digits[:n]
    np.greater_equal(x, cut, out=d.view(np.bool_))
    d += np.uint8(1)
    d -= x <= -cut
    return _combine(digits, nb), d


def _combine(digits: UInt8Array, nb: int) -> bytes:
    """The packed bytes of 5 * nb digits 0..2 (layout in the module docstring)."""
    if nb <= _SMALL:  # one uint8 matmul: fewest calls for a small tensor
        out = digits[: 4 * nb].reshape(nb, 4) @ _HEAD_WEIGHTS
        out += digits[4 * nb :] * np.uint8(81)
        return out.tobytes()
    head = digits[: 4 * nb]
    # byte i = d[4i] + 3 d[4i+1] + 9 d[4i+2] + 27 d[4i+3] + 81 tail[i], Horner's rule on
    # strided views, in uint8 (at most 242): no matmul, no wider temporaries.
    out = head[3::4] * np.uint8(3)
    out += head[2::4]
    out *= np.uint8(3)
    out += head[1::4]
    out *= np.uint8(3)
    out += head[0::4]
    out += digits[4 * nb :] * np.uint8(81)
    return out.tobytes()


def validate_packed(packed: bytes, n: int, what: str = "trits") -> UInt8Array:
    """Check length, byte range and zero padding; return the bytes as a uint8 array."""
    b = np.frombuffer(packed, dtype=np.uint8)
    nb = packed_size(n)
    if b.size != nb:
        raise InvalidTrits(f"{what}: {n} trits pack into {nb} bytes, got {b.size}")
    if b.size and int(b.max()) > MAX_BYTE:
        raise InvalidTrits(f"{what}: packed byte {int(b.max())} is above {MAX_BYTE}")
    for pos in range(n, 5 * nb):  # at most 4 padding positions
        byte, digit = (pos // 4, pos % 4) if pos < 4 * nb else (pos - 4 * nb, 4)
        if _DIGITS[b[byte], digit] != 0:
            raise InvalidTrits(f"{what}: padding trit at position {pos} is not zero")
    return b


def unpack(packed: bytes, n: int) -> Int8Array:
    """The `n` trits in `packed`, validated."""
    b = validate_packed(packed, n)
    nb = b.size
    out = np.empty(5 * nb, dtype=np.int8)
    out[: 4 * nb] = _DIGITS[b, :4].reshape(-1)
    out[4 * nb :] = _DIGITS[b, 4]
    return out[:n]


def accumulate_packed(acc: F32Array, packed: UInt8Array, scale: np.float32) -> None:
    """``acc += scale * trits`` in place, for validated `packed` bytes.

    `acc` is a flat float32 array of exactly the tensor's ``n`` values.
    """
    n = acc.size
    nb = packed.size
    head_n = min(n, 4 * nb)
    idx = packed.astype(np.intp)
    head = np.take(_HEAD_F32 * scale, idx, axis=0, mode="clip").reshape(-1)
    np.add(acc[:head_n], head[:head_n], out=acc[:head_n])
    if n > 4 * nb:
        tail = np.take(_TAIL_F32 * scale, idx[: n - 4 * nb], mode="clip")
        np.add(acc[4 * nb :], tail, out=acc[4 * nb :])


def count_nonzero(packed: UInt8Array) -> int:
    """Non-zero trits in validated `packed` bytes (padding trits are zero)."""
    return int(_NONZERO[packed].sum())
