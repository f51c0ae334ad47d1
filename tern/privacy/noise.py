"""Noise for differential privacy: the discrete Gaussian (devices) and central Gaussian noise.

`discrete_gaussian` follows Canonne, Kamath and Steinke 2020 ("The Discrete Gaussian for
Differential Privacy", Algorithm 3): draw Y from the discrete Laplace distribution of
scale t = floor(sigma) + 1, accept it with probability
exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)). Accepted draws follow the discrete Gaussian,
P(y) proportional to exp(-y^2 / (2 sigma^2)), exactly. Here the steps are vectorised
with a numpy Generator: the discrete Laplace as the difference of two geometric
variables (each the floor of an exponential of mean t), the acceptance as a uniform
below the probability. The paper's version draws every Bernoulli with exact rational
arithmetic; this one computes the probabilities in float64, so its distribution is the
discrete Gaussian up to float64 rounding of those probabilities (relative 1e-16), the
usual floating-point caveat of DP samplers (Mironov 2012), and far below the
accountant's precision.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from tern.aggregate import Partial
from tern.privacy.terms import DpTerms

__all__ = ["central_noise", "discrete_gaussian", "discrete_laplace"]

I64Array = npt.NDArray[np.int64]

# Proposals per value still wanted: acceptance is about 0.7-0.76 for sigma >= 1.5 (0.44 at
# its lowest, sigma ~ 0.3), so one batch usually does and a second mops up.
_OVERDRAW = 1.5


def discrete_laplace(t: float, size: int, rng: np.random.Generator) -> I64Array:
    """`size` draws with P(y) proportional to exp(-|y| / t), t > 0."""
    if not (math.isfinite(t) and t > 0) or size < 0:
        raise ValueError("discrete_laplace needs a finite scale t > 0 and a size >= 0")
    # floor(t * Exp(1)) is geometric with P(k) = (1 - e^(-1/t)) e^(-k/t), k >= 0; the
    # difference of two independent ones is the discrete Laplace of scale t.
    g = np.floor(rng.standard_exponential((2, size)) * t).astype(np.int64)
    out: I64Array = g[0] - g[1]
    return out


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> I64Array:
    """`size` independent draws of the discrete Gaussian of parameter `sigma` (its
    variance is within 1e-6 of sigma^2 for sigma >= 1, smaller below); zeros when
    sigma is 0."""
    if not (math.isfinite(sigma) and sigma >= 0) or size < 0:
        raise ValueError("discrete_gaussian needs a finite sigma >= 0 and a size >= 0")
    out = np.zeros(size, dtype=np.int64)
    if sigma == 0 or size == 0:
        return out
    t = math.floor(sigma) + 1.0
    var = sigma * sigma
    filled = 0
    while filled < size:
        want = size - filled
        batch = max(16, int(want * _OVERDRAW))
        y = discrete_laplace(t, batch, rng)
        p = np.exp(-((np.abs(y) - var / t) ** 2) / (2.0 * var))
        accepted = y[rng.random(batch) < p][:want]
        out[filled : filled + accepted.size] = accepted
        filled += accepted.size
    return out


def central_noise(partial: Partial, dp: DpTerms, rng: np.random.Generator) -> Partial:
    """The coordinator's Gaussian noise on a fleet's sum (central DP).

    Each contributor weighs the same in a DP round (1 with the plain codecs,
    `weight_levels` under secure aggregation), so the weighted sum is that weight
    times the sum of clipped contributions, and the noise is scaled alike:
    N(0, (dp.sigma * total_weight / count)^2) on every coordinate. Nothing is added
    to an empty partial (it releases nothing).
    """
    if partial.count < 1 or dp.sigma == 0:
        return partial
    unit = partial.total_weight / partial.count
    noise = rng.standard_normal(partial.weighted_sum.shape) * (dp.sigma * unit)
    noisy = (partial.weighted_sum.astype(np.float64) + noise).astype(np.float32)
    return Partial(noisy, partial.total_weight, partial.count)
