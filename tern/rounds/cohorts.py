"""A round's secure-aggregation cohort, as every side derives it alone.

The gateway `server`'s cohort in a round is who it waits for (`tern.admit.peers_of`):
its participating devices and its child gateways with a participant below. Its members,
their keys (the fleet file), its graph and threshold (the schedule) and its ring (the
devices the sum can hold, their weight levels, and the noise distributed DP puts in
it) follow from what every member already trusts, so nobody negotiates them.
"""

from __future__ import annotations

import math

from tern.admit import peers_of
from tern.fleet import Fleet
from tern.messages import RoundSchedule
from tern.privacy.terms import Noise
from tern.secagg.graph import Cohort
from tern.secagg.ring import ring_bits
from tern.spec import ModelSpec

__all__ = ["cohort_of", "noise_cohorts", "sum_noise_int"]


def noise_cohorts(fleet: Fleet, server: str, schedule: RoundSchedule) -> int:
    """How many cohorts' noise a sum at `server` holds: one for every gateway at or below
    it with a participating device of its own (under distributed noise, each cohort's
    devices add one cohort's worth)."""
    return sum(
        any(schedule.takes_part(d) for d in fleet.gateways[g].devices)
        for g in fleet.gateways_below(server)
    )


def sum_noise_int(fleet: Fleet, server: str, schedule: RoundSchedule) -> float:
    """The standard deviation, in integer units of the smallest scale, of the noise a
    sum at `server` carries under distributed DP (0 otherwise)."""
    dp, sa = schedule.dp, schedule.secagg
    if dp is None or sa is None or dp.noise is not Noise.DISTRIBUTED:
        return 0.0
    per_cohort = dp.sigma * sa.weight_levels / min(sa.scales)
    return per_cohort * math.sqrt(noise_cohorts(fleet, server, schedule))


def cohort_of(
    fleet: Fleet, server: str, schedule: RoundSchedule, run: int, spec: ModelSpec
) -> Cohort | None:
    """`server`'s cohort in `schedule`'s round (None when the round has no secure
    aggregation or no participant below `server`). RingOverflow when its sum cannot
    fit in 32 bits."""
    sa = schedule.secagg
    peers = peers_of(fleet, server, schedule)
    if sa is None or not peers:
        return None
    devices = sum(p.devices for p in peers.values())
    bits = ring_bits(
        devices, sa.weight_levels, noise_sigma_int=sum_noise_int(fleet, server, schedule)
    )
    return Cohort.from_terms(
        sa,
        fleet=fleet.fleet,
        run=run,
        round=schedule.round,
        model_version=schedule.model_version,
        server=server,
        members=peers,
        keys={p.id: p.key for p in peers.values()},
        server_key=fleet.gateways[server].key,
        seed=schedule.seed,
        length=spec.size + 2,
        bits=bits,
    )
