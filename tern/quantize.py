"""Ternary quantization rules: x ~ scale * trits, trits in {-1, 0, +1}.

The rule decides which values survive (the threshold) and what they are worth (the
scale). `DEFAULT_RULE` is the one the fleet uses; the others stay so that
bench/compression.py can show why it was picked (see the note on DEFAULT_RULE).
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_RULE", "TernaryRule", "optimal_cut", "ternarize"]

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
    # TernGrad-style unbiased: scale = max|x|, keep with probability |x| / max. Not
    # contractive: never pair it with error feedback (see DEFAULT_RULE). A fleet cannot
    # select it; the wire names only "ternary", which is always DEFAULT_RULE.
    STOCHASTIC = "stochastic"


# OPTIMAL, chosen by bench/compression.py: MLP 40-100-100-10, MNIST-1D, 20 clients
# Dirichlet(0.5), 1 local epoch, batch 32, lr 0.5, 200 rounds, test accuracy in percent.
#   python -m bench.compression --rule RULE --seed 0        (29-36 s wall on 2 cores)
# seed 0, round 200, float32 73.25; err = mean ||target - sent||^2 / ||target||^2:
#   rule        ternary  ternary_ef  (gap)    err plain / EF
#   optimal       72.75       72.60  (-0.65)   0.27 / 0.46
#   threshold     71.50       72.20  (-1.05)   0.30 / 0.84
#   max_round     58.50       73.00  (-0.25)   0.86 / 0.85
#   stochastic    71.00       16.20  (-57.05)  3.57 / 1.04
# Mean gap to float32 over seeds 0-4 (ternary / ternary_ef): optimal -0.43 / +0.25,
# threshold -0.81 / -0.14, max_round -12.10 / +0.20, stochastic -0.25 / -42.07.
# Why: with error feedback every contractive rule (err < 1) is within 1 point of float32
# and they differ by less than the seed-to-seed spread, so EF alone does not pick one.
# OPTIMAL is the one that is also good WITHOUT feedback (a device that loses its residual
# on reboot, or joins late), where max_round loses 12 points; it has the smallest encode
# error by construction (least squares over every support), and the margin grows under
# feedback: the carried residual makes the target heavy-tailed (kurtosis ~200 against ~8
# without), OPTIMAL then keeps the few large values (~3% of them) while TWN's fixed
# 0.7 * mean threshold keeps ~45%, hence 0.84 vs 0.46. It is deterministic, so no
# generator on the device. Cost: a sort, ~0.43 ms against ~0.09 ms for THRESHOLD on a
# 10,000-value tensor, lost in local training: both ternary runs take ~12 s in the bench.
# STOCHASTIC is unbiased but not contractive (err > 1), so feedback makes the residual
# grow: never combine it with EF. It stays, with the others, so the bench can show this.
DEFAULT_RULE = TernaryRule.OPTIMAL


_COUNTS = np.arange(1, 4097, dtype=np.float64)  # 1..n for a small tensor, not reallocated


def optimal_cut(flat: F32Array) -> tuple[np.float32, np.float32, int, bool]:
    """The OPTIMAL rule's threshold on flat float32 `flat`: (cut, scale, kept, exact).

    The kept set is the `kept` largest |x|, kept - 1 the k that maximises S_k^2 / (k + 1)
    (S_k the float64 sum of the k + 1 largest, largest first), ties at the cut-off broken
    by position: the same as a stable argsort of -|x|, from a value sort ~4x faster than
    an argsort. `exact`: the kept set is exactly {|x| >= cut} (no tie at the cut is left
    out), so the trits are two comparisons with the cut. An all-zero tensor gives
    (inf, 0, 0, True): nothing kept. Float64 holds the sum of any float32 values, so the
    scale is finite exactly when every value is: callers check that, not each value.
    """
    n = flat.size
    s = np.abs(flat)
    s.sort()
    if n == 0 or s[-1] == 0:
        return np.float32(np.inf), np.float32(0.0), 0, True
    if n <= _COUNTS.size:  # one call; a large tensor sums faster from a contiguous copy
        csum = np.add.accumulate(s[::-1], dtype=np.float64)
    else:
        csum = s[::-1].astype(np.float64, order="C")
        np.add.accumulate(csum, out=csum)
    obj = csum * csum
    obj /= _COUNTS[:n] if n <= _COUNTS.size else np.arange(1, n + 1, dtype=np.float64)
    k = int(obj.argmax())
    low = n - 1 - k  # s[low:] is kept; exact unless the value below it ties with the cut
    cut = s[low]
    return cut, np.float32(csum[k] / (k + 1)), k + 1, low == 0 or bool(s[low - 1] != cut)


def _optimal(flat: F32Array, shape: tuple[int, ...]) -> tuple[Int8Array, np.float32]:
    cut, scale, kept, exact = optimal_cut(flat)
    if exact:  # two comparisons, no mask indexing: the device's hot path (issue 13)
        trits = (flat >= cut).view(np.int8)
        trits -= flat <= -cut
    else:  # more ties at the cut than room: the first ones by position
        a = np.abs(flat)
        keep = a > cut
        keep[np.flatnonzero(a == cut)[: kept - int(np.count_nonzero(keep))]] = True
        trits = keep.view(np.int8)
        np.negative(trits, out=trits, where=flat < 0)
    return trits.reshape(shape), scale


def ternarize(
    x: npt.ArrayLike,
    rule: TernaryRule = DEFAULT_RULE,
    rng: np.random.Generator | None = None,
) -> tuple[Int8Array, np.float32]:
    """Quantize a tensor to (trits with x's shape, non-negative float32 scale)."""
    v = np.asarray(x, dtype=np.float32)
    flat = v.reshape(-1)
    if rule is TernaryRule.OPTIMAL:
        return _optimal(flat, v.shape)
    a = np.abs(flat)
    trits = np.zeros(flat.shape, dtype=np.int8)
    if flat.size == 0 or not np.any(a):
        return trits.reshape(v.shape), np.float32(0.0)
    if rule is TernaryRule.THRESHOLD:
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
        drawn = rng.random(a.size) < a / scale
        trits[drawn] = np.sign(flat[drawn]).astype(np.int8)
    else:  # pragma: no cover - exhaustive over the enum
        raise ValueError(f"unknown rule {rule!r}")
    return trits.reshape(v.shape), scale
