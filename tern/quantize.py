"""Ternary quantization rules: x ~ scale * trits, trits in {-1, 0, +1}.

The rule decides which values survive (the threshold) and what they are worth (the
scale). `DEFAULT_RULE` is the one the fleet uses; the others stay so that
bench/compression.py can show why it was picked (see the note on DEFAULT_RULE).
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_RULE", "TernaryRule", "ternarize"]

F32Array = npt.NDArray[np.float32]
Int8Array = npt.NDArray[np.int8]


class TernaryRule(StrEnum):
    # L2-optimal: keep the k largest |x| for the k that minimises ||x - s t||^2,
    # with s the mean |x| of the kept ones. Exact, needs a sort.
    OPTIMAL = "optimal"
    # TWN-style: threshold 0.7 * mean|x|, scale = mean |x| above the threshold.
    THRESHOLD = "threshold"
    # naive: scale = max|x|, round x / scale to the nearest trit.
    MAX_ROUND = "max_round"
    # TernGrad-style unbiased: scale = max|x|, keep with probability |x| / max.
    STOCHASTIC = "stochastic"


DEFAULT_RULE = TernaryRule.OPTIMAL


def ternarize(
    x: npt.ArrayLike,
    rule: TernaryRule = DEFAULT_RULE,
    rng: np.random.Generator | None = None,
) -> tuple[Int8Array, np.float32]:
    """Quantize a tensor to (trits with x's shape, non-negative float32 scale)."""
    v = np.asarray(x, dtype=np.float32)
    flat = v.reshape(-1)
    a = np.abs(flat)
    trits = np.zeros(flat.shape, dtype=np.int8)
    if flat.size == 0 or not np.any(a):
        return trits.reshape(v.shape), np.float32(0.0)
    if rule is TernaryRule.OPTIMAL:
        order = np.argsort(-a, kind="stable")
        csum = np.cumsum(a[order], dtype=np.float64)
        k = int(np.argmax(csum * csum / np.arange(1, a.size + 1)))
        keep = order[: k + 1]
        scale = np.float32(csum[k] / (k + 1))
        trits[keep] = np.sign(flat[keep]).astype(np.int8)
    elif rule is TernaryRule.THRESHOLD:
        mask = a > np.float32(0.7) * a.mean(dtype=np.float64)
        if not mask.any():
            mask = a == a.max()
        scale = np.float32(a[mask].mean(dtype=np.float64))
        trits[mask] = np.sign(flat[mask]).astype(np.int8)
    elif rule is TernaryRule.MAX_ROUND:
        scale = np.float32(a.max())
        trits = np.rint(flat / scale).astype(np.int8)
    elif rule is TernaryRule.STOCHASTIC:
        if rng is None:
            raise ValueError("the stochastic rule needs an explicit numpy Generator")
        scale = np.float32(a.max())
        keep = rng.random(a.size) < a / scale
        trits[keep] = np.sign(flat[keep]).astype(np.int8)
    else:  # pragma: no cover - exhaustive over the enum
        raise ValueError(f"unknown rule {rule!r}")
    return trits.reshape(v.shape), scale
