"""What the coordinator releases under differential privacy, and what it costs.

Central noise is added here to the fleet's sum, before the server step. Distributed
noise is already in the sums, but only the survivors' shares: a cohort of n devices
whose sum kept m of them carries sqrt(m / n) of the noise the schedule asked for. The
coordinator sees only its gateways' partials (each a sum of the cohorts below it), so it
counts, for each, the least any cohort below it can have kept: a partial that misses
`lost` of its devices may have lost them all in one cohort; under secure aggregation a
cohort's sum is released only with at least its threshold of members. Exact for a
fleet whose gateways all sit under the coordinator; never more noise than was there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from tern.aggregate import Partial
from tern.fleet import Fleet
from tern.messages import CheckedUpdate, RoundSchedule
from tern.privacy.noise import central_noise
from tern.privacy.terms import DpTerms, Noise
from tern.secagg.graph import needed

if TYPE_CHECKING:
    from tern.privacy.ledger import PrivacyLedger

__all__ = ["budget_spent", "kept_share", "release"]


def kept_share(
    fleet: Fleet,
    schedule: RoundSchedule,
    accepted: Mapping[str, CheckedUpdate],
    stands_for: Mapping[str, int],
) -> float:
    """The least share of its devices' noise shares any released cohort sum kept."""
    share = 1.0
    for g, partial in accepted.items():
        lost = max(stands_for.get(g, partial.count) - partial.count, 0)
        if not lost:
            continue
        for h in fleet.gateways_below(g):
            n = sum(1 for d in fleet.gateways[h].devices if schedule.takes_part(d))
            if n == 0:
                continue
            sa = schedule.secagg
            floor = needed(sa.threshold, n) if sa is not None else 1
            share = min(share, max(n - lost, floor, 1) / n)
    return share


def release(
    dp: DpTerms | None,
    partial: Partial,
    fleet: Fleet,
    schedule: RoundSchedule,
    accepted: Mapping[str, CheckedUpdate],
    stands_for: Mapping[str, int],
    rng: np.random.Generator,
) -> tuple[Partial, float | None]:
    """The round's sum as it is released (with the central noise, under central DP),
    and the noise multiplier of the noise in it (None without DP)."""
    if dp is None:
        return partial, None
    if dp.noise is Noise.CENTRAL:
        return central_noise(partial, dp, rng), dp.multiplier
    kept = kept_share(fleet, schedule, accepted, stands_for)
    return partial, dp.multiplier * math.sqrt(kept)


def budget_spent(dp: DpTerms | None, ledger: PrivacyLedger | None) -> str:
    """Why no further round may open (its privacy budget), or ""."""
    if dp is None or ledger is None or not ledger.would_exceed(dp.multiplier):
        return ""
    return (
        f"privacy budget spent: epsilon {ledger.epsilon():.3g} of {ledger.budget:g} at "
        f"delta {ledger.delta:g} after {ledger.rounds} rounds; one more round would pass it"
    )
