"""A device's differentially private update with the plain codecs (no secure aggregation).

The device sends its weighted contribution ``clip(dp.share(samples) * delta) + residual``,
clipped again so that what the receiver decodes, quantization included, has an L2 norm
of at most `dp.clip`; its update carries weight 1.0 and count 1, so the mean divides by
the number of contributors, a public figure, and one device moves the sum by at most
the clip (the sensitivity the accountant assumes).

Error feedback under a clip: a clipped delta already fills the clip, so whatever the
second clip and quantization leave out cannot drain and would pile up round after
round. The new residual is therefore capped at the clip's norm too (`cap_residual`):
feedback keeps quantization's error, and what clipping cuts beyond the cap is dropped,
as DP-SGD drops it. Neither step touches privacy, which rests on the decoded bound.

The bound is checked on the decoded value, not assumed: the target is scaled to just
under the clip, encoded, and when the decoded norm is still over (float16 rounding can
push it up; the ternary rule never does, by Cauchy-Schwarz, but float32 rounding
could), scaled down by 1 % and encoded again; after `_MAX_TRIES` the device sends
zeros, whose norm is 0.

Distributed noise without secure aggregation: each device adds N(0, sigma^2 /
cohort_size) float noise to its clipped contribution, then encodes it. Quantizing a
noisy value is post-processing of that device's own Gaussian mechanism; the residual
then keeps only what clipping left out, never the noise nor the quantization error of
the noisy value (both depend on the noise, and feeding them back would correlate this
round's noise with the next round's signal, which the accountant does not allow).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from tern.codecs import Codec
from tern.errors import NonFiniteValue, ShapeMismatch
from tern.messages import Update
from tern.privacy.terms import DpTerms, Noise
from tern.spec import ModelSpec

__all__ = ["cap_residual", "dp_update", "sent_norm"]

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]

_MARGIN = 1.0 - 1e-4  # aim just under the clip, so most encodes fit the first time
_SHRINK = 0.99
_MAX_TRIES = 200  # 0.99^200 ~ 0.13: then zeros, which always fit


def sent_norm(sent: npt.NDArray[np.floating]) -> float:
    """The L2 norm of a decoded value, in float64 (how the bound is checked)."""
    v = np.asarray(sent, dtype=np.float64).reshape(-1)
    return math.sqrt(float(np.einsum("i,i->", v, v)))


def _norm64(x: F64Array) -> float:
    return math.sqrt(float(np.einsum("i,i->", x, x)))


def cap_residual(residual: npt.NDArray[np.floating], bound: float) -> F32Array:
    """The residual scaled down to an L2 norm of at most `bound`, as float32."""
    r = np.asarray(residual, dtype=np.float64)
    norm = _norm64(r)
    if norm > bound:
        r = r * (bound / norm)
    return r.astype(np.float32)


def dp_update(
    codec: Codec,
    spec: ModelSpec,
    delta: F32Array,
    samples: float,
    residual: F32Array | None,
    dp: DpTerms,
    cohort_size: int,
    noise_rng: np.random.Generator | None,
) -> tuple[Update, F32Array]:
    """(the update: weight 1.0, count 1; the new residual, in contribution units).

    `cohort_size` and `noise_rng` matter only for distributed noise: the number of
    devices whose noise shares make up the sum's `dp.sigma`.
    """
    size = spec.size
    if delta.shape != (size,):
        raise ShapeMismatch(f"delta of shape {delta.shape}, spec needs ({size},)")
    if residual is not None and residual.shape != (size,):
        raise ShapeMismatch(f"residual of shape {residual.shape}, spec needs ({size},)")
    target = delta.astype(np.float64) * dp.share(samples)
    if not np.isfinite(target).all():
        raise NonFiniteValue("a contribution's delta is not finite")
    weighted = _norm64(target)
    if weighted > dp.clip:
        target *= dp.clip / weighted
    if residual is not None:
        target += residual
    if not np.isfinite(target).all():
        raise NonFiniteValue("a contribution's residual is not finite")
    noisy = dp.noise is Noise.DISTRIBUTED and dp.multiplier > 0
    noise: F64Array | None = None
    if noisy:
        if cohort_size < 1 or noise_rng is None:
            raise ValueError("distributed noise needs the cohort's size and a numpy Generator")
        noise = noise_rng.standard_normal(size) * (dp.sigma / math.sqrt(cohort_size))
    norm = _norm64(target)
    factor = min(1.0, dp.clip * _MARGIN / norm) if norm > 0 else 1.0
    if noise is not None:  # the signal is within the clip in float64; the noise on top
        signal = target * factor
        update, _ = _encode(codec, spec, signal + noise)
        return update, cap_residual(target - signal, dp.clip)
    for _ in range(_MAX_TRIES):
        update, sent = _encode(codec, spec, target * factor)
        if sent_norm(sent) <= dp.clip:
            break
        factor *= _SHRINK
    else:
        update, sent = _encode(codec, spec, np.zeros(size, dtype=np.float64))
    return update, cap_residual(target - sent, dp.clip)


def _encode(codec: Codec, spec: ModelSpec, x: F64Array) -> tuple[Update, F32Array]:
    """The update of `x` (weight 1, count 1) and the float32 value a receiver decodes."""
    x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise NonFiniteValue("a contribution does not fit in float32")
    wires: list[object] = []
    sent = np.empty(spec.size, dtype=np.float32)
    for t, o in zip(spec.tensors, spec.offsets, strict=True):
        wire, decoded = codec.encode(x32[o : o + t.size].reshape(t.shape))
        wires.append(wire)
        sent[o : o + t.size] = decoded.reshape(-1)
    return Update(codec.name, 1.0, 1, tuple(wires)), sent
