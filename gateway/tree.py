"""A gateway's place in the fleet's tree: whom it waits for, and how deep it sits."""

from __future__ import annotations

from tern.admit import peers_of
from tern.fleet import COORDINATOR, Fleet
from tern.messages import RoundSchedule

__all__ = ["depth", "expected_contributors"]


def expected_contributors(fleet: Fleet, gateway: str, schedule: RoundSchedule) -> dict[str, int]:
    """Who `gateway` waits for in a round -> how many participating devices each stands for.

    Its own participating devices (1 each) and its child gateways with at least one
    participant below them (their participant count).
    """
    return {p.id: p.devices for p in peers_of(fleet, gateway, schedule).values()}


def depth(fleet: Fleet, gateway: str) -> int:
    """1 for a gateway whose parent is the coordinator, 1 + its parent's depth otherwise.

    A gateway closes `margin * depth` before the deadline: the deeper, the earlier, so
    each partial reaches its parent before the parent closes.
    """
    n, node = 1, fleet.gateways[gateway].parent
    while node != COORDINATOR:
        n, node = n + 1, fleet.gateways[node].parent
    return n
