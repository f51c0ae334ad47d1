"""What secure aggregation masks: a contribution as integers in the ring Z_{2^bits}.

A member's vector has `spec.size + 2` integers: its model coordinates, then its weight,
then its count (1). The coordinates are `q * trits`, trits under the round's shared
per-tensor scales (`SecAggTerms.scales`, public) and `q` the member's integer weight,
so a cohort's sum is exact integer arithmetic: masks cancel mod 2^bits and the server's
result is bit for bit the plain integer sum of the survivors' vectors (`decode_sum`
turns it into a `Partial`). The ring is as small as the sum's range allows
(`ring_bits`): 11 bits for 100 devices at 8 weight levels, against Flower's 32.

The trit rule under a fixed scale `s` is round to nearest: t = sign(x) where
|x| > s/2. For a given scale it is the least-squares choice per coordinate, and it never
makes a coordinate's error larger than the coordinate (|x - s t| <= |x|), so error
feedback (the residual, kept per unit of the member's weight as in
`tern.messages.encode_update`) cannot grow through quantization. It is deterministic:
the same target gives the same trits on every member.

Under differential privacy (`dp` given) every member's weight coordinate is the public
`weight_levels` (the mean then divides by the number of contributors), its coordinates
stay `q * trits`, and the L2 norm of what it sends in real units,
``scales * x[:size] / weight_levels``, is at most `dp.clip`: its delta's own
contribution ``q / weight_levels * delta`` is clipped first, the residual added, and
when the trits are still over the clip, those of the smallest |target| go back into
the residual until they fit; the new residual is then capped at the clip's worth
(``q / weight_levels * ||residual|| <= clip``), so that it cannot pile up round after
round (tern.privacy.clip says why). With distributed
noise each member then adds discrete Gaussian noise per coordinate of standard
deviation ``dp.sigma * weight_levels / (scale * sqrt(cohort_size))`` in integer units,
so a cohort sum carries ``dp.sigma`` in real units on every coordinate when every
member survives (Kairouz et al. 2021; the sum of discrete Gaussians is close to, not
exactly, a discrete Gaussian of the summed variance).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from tern.aggregate import Partial
from tern.errors import MalformedMessage, NonFiniteValue, ShapeMismatch, TernError
from tern.privacy.noise import discrete_gaussian
from tern.privacy.terms import DpTerms, Noise
from tern.secagg.terms import SecAggTerms
from tern.spec import ModelSpec

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "RingOverflow",
    "decode_sum",
    "encode_contribution",
    "from_ring",
    "pack",
    "packed_size",
    "ring_bits",
    "scale_vector",
    "to_ring",
    "trits_under_scale",
    "unpack",
]

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]
I64Array = npt.NDArray[np.int64]
U32Array = npt.NDArray[np.uint32]

MIN_BITS = 2
MAX_BITS = 32
_NOISE_TAIL = 10.0  # a sum's noise beyond 10 standard deviations: probability < 1e-23


class RingOverflow(TernError):
    """A cohort's sum cannot fit in a ring of at most 2^32."""

    reason = "ring_overflow"


def ring_bits(devices: int, levels: int, *, noise_sigma_int: float = 0.0) -> int:
    """The smallest ring, in bits, that holds a cohort sum without wrapping.

    `devices`: how many devices' contributions the sum can include (a child gateway's
    contribution counts all the devices below it); `levels`: the largest weight one
    of them may carry (`SecAggTerms.weight_levels`); `noise_sigma_int`: the standard
    deviation, in integer units, of the noise in the sum (distributed DP), of which
    10 standard deviations are kept. Every coordinate, the weight and the count of
    the sum lie in [-M, M] with M = devices * levels + 10 * noise_sigma_int, so
    2^bits > 2M + 1 keeps them apart in the centered ring.
    """
    if devices < 1 or levels < 1 or not (math.isfinite(noise_sigma_int) and noise_sigma_int >= 0):
        raise ValueError("ring_bits needs devices >= 1, levels >= 1 and a finite noise >= 0")
    bound = 2 * (devices * levels + _NOISE_TAIL * noise_sigma_int) + 1
    bits = max(MIN_BITS, math.floor(math.log2(bound)) + 1)
    while 2**bits <= bound:  # guard log2's rounding near powers of two
        bits += 1
    if bits > MAX_BITS:
        raise RingOverflow(f"a cohort sum of {devices} devices needs more than {MAX_BITS} bits")
    return bits


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"ring bits must be in [{MIN_BITS}, {MAX_BITS}]")


def to_ring(x: npt.NDArray[np.integer], bits: int) -> U32Array:
    """Integers (any sign) mod 2^bits."""
    _check_bits(bits)
    return (np.asarray(x, dtype=np.int64) & np.int64((1 << bits) - 1)).astype(np.uint32)


def from_ring(u: npt.NDArray[np.integer], bits: int) -> I64Array:
    """Ring elements in [0, 2^bits) as centered integers in [-2^(bits-1), 2^(bits-1))."""
    _check_bits(bits)
    v = np.asarray(u, dtype=np.int64)
    if v.size and (v.min() < 0 or v.max() >= 1 << bits):
        raise MalformedMessage(f"a ring element is outside [0, 2^{bits})")
    out: I64Array = np.where(v >= 1 << (bits - 1), v - (1 << bits), v)
    return out


def packed_size(n: int, bits: int) -> int:
    """Bytes that `n` values of `bits` bits take."""
    return -(-n * bits // 8)


def pack(u: U32Array, bits: int) -> bytes:
    """`bits`-bit values back to back, little-endian: value i holds bits i*b .. i*b+b-1
    of the stream, least significant first; the last byte's spare high bits are zero."""
    _check_bits(bits)
    v = np.asarray(u).reshape(-1)
    if v.dtype != np.uint32:
        raise ValueError("pack takes a uint32 array")
    if v.size and int(v.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint32)) & np.uint32(1)
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes, n: int, bits: int) -> U32Array:
    """The inverse of `pack`: exactly `packed_size(n, bits)` bytes, zero padding bits."""
    _check_bits(bits)
    if n < 0 or len(data) != packed_size(n, bits):
        raise MalformedMessage(
            f"a ring vector of {len(data)} bytes is not {n} values of {bits} bits"
        )
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if stream[n * bits :].any():
        raise MalformedMessage("a ring vector's padding bits are not zero")
    planes = stream[: n * bits].reshape(n, bits).astype(np.uint32)
    out: U32Array = (planes << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return out


def scale_vector(spec: ModelSpec, terms: SecAggTerms) -> F64Array:
    """Each coordinate's scale: the scale of its tensor, spec order."""
    if len(terms.scales) != len(spec.tensors):
        raise ShapeMismatch(
            f"secagg has {len(terms.scales)} scales for a spec of {len(spec.tensors)} tensors"
        )
    return np.repeat(np.asarray(terms.scales, dtype=np.float64), [t.size for t in spec.tensors])


def trits_under_scale(target: npt.ArrayLike, scale: npt.ArrayLike) -> npt.NDArray[np.int8]:
    """Round to nearest trit under a fixed scale: sign(x) where |x| > scale / 2."""
    x = np.asarray(target, dtype=np.float64)
    keep = np.abs(x) > np.asarray(scale, dtype=np.float64) / 2
    return (np.sign(x) * keep).astype(np.int8)


def _norm(x: F64Array) -> float:
    return math.sqrt(float(np.einsum("i,i->", x, x)))


def _shrink(norm: float, clip: float) -> float:
    """The factor that brings a vector of this norm within the clip."""
    return 1.0 if norm <= clip else clip / norm


def _fit_clip(t: npt.NDArray[np.int8], target: F64Array, cost: F64Array, bound: float) -> None:
    """Zero the trits of smallest |target| until sum(cost[t != 0]) <= bound (in place).

    `cost` is each coordinate's square in the norm; ties keep the lower index."""
    kept = np.flatnonzero(t)
    order = kept[np.argsort(-np.abs(target[kept]), kind="stable")]
    fits = int(np.searchsorted(np.cumsum(cost[order]), bound, side="right"))
    t[order[fits:]] = 0


def encode_contribution(
    spec: ModelSpec,
    delta: F32Array,
    samples: float,
    residual: F32Array | None,
    terms: SecAggTerms,
    dp: DpTerms | None,
    cohort_size: int,
    noise_rng: np.random.Generator | None,
) -> tuple[I64Array, F32Array]:
    """A member's integer vector (length spec.size + 2, centered) and its new residual.

    `residual` is per unit of the member's weight `q`: its target is ``delta +
    residual`` (under DP, ``clip(q / weight_levels * delta)`` rescaled per unit of q,
    plus the residual) and the new residual ``target - scales * trits``, what
    quantization and the clip left out (under DP capped at the clip's worth, never the
    noise). `cohort_size` (the cohort's participants, whose shares make up the noise)
    and `noise_rng` matter only for distributed noise.
    """
    size = spec.size
    if delta.shape != (size,):
        raise ShapeMismatch(f"delta of shape {delta.shape}, spec needs ({size},)")
    if residual is not None and residual.shape != (size,):
        raise ShapeMismatch(f"residual of shape {residual.shape}, spec needs ({size},)")
    scales = scale_vector(spec, terms)
    target = delta.astype(np.float64)
    if not np.isfinite(target).all():
        raise NonFiniteValue("a contribution's delta is not finite")
    q = terms.level(samples)
    weight = terms.weight_levels if dp is not None else q
    if dp is not None:
        target *= _shrink(_norm(target) * q / weight, dp.clip)
    if residual is not None:
        target += residual
    if not np.isfinite(target).all():
        raise NonFiniteValue("a contribution's residual is not finite")
    t = trits_under_scale(target, scales)
    if dp is not None:
        # ||scales * q t / W||^2 <= clip^2, with a hair of slack for float rounding
        cost = (scales * (q / weight)) ** 2
        _fit_clip(t, target, cost, (dp.clip * (1.0 - 1e-9)) ** 2)
    left = target - scales * t
    if dp is not None:  # at most the clip's worth, as in tern.privacy.clip
        left *= _shrink(_norm(left) * q / weight, dp.clip)
    new_residual = left.astype(np.float32)
    x = np.empty(size + 2, dtype=np.int64)
    x[:size] = t.astype(np.int64) * q
    x[size] = weight
    x[size + 1] = 1
    if dp is not None and dp.noise is Noise.DISTRIBUTED and dp.multiplier > 0:
        if cohort_size < 1:
            raise ValueError("distributed noise needs the cohort's size (at least 1)")
        if noise_rng is None:
            raise ValueError("distributed noise needs an explicit numpy Generator")
        root = math.sqrt(cohort_size)
        for scale, o, tensor in zip(terms.scales, spec.offsets, spec.tensors, strict=True):
            sigma_int = dp.sigma * weight / (scale * root)
            x[o : o + tensor.size] += discrete_gaussian(sigma_int, tensor.size, noise_rng)
    return x, new_residual


def decode_sum(spec: ModelSpec, ints: I64Array, terms: SecAggTerms) -> Partial:
    """A cohort's integer sum as a Partial: scales * coordinates, weight, count."""
    v = np.asarray(ints)
    if v.shape != (spec.size + 2,) or v.dtype.kind not in "iu":
        raise ShapeMismatch(f"an integer sum of shape {v.shape}, spec needs ({spec.size + 2},)")
    weighted = (scale_vector(spec, terms) * v[: spec.size]).astype(np.float32)
    return Partial(weighted, float(v[spec.size]), int(v[spec.size + 1]))
