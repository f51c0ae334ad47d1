"""The gateway's secure aggregation: serving its cohort, and taking part in its parent's.

Functions of the gateway machine (`tern.rounds.gateway`), kept apart so that the plain
round's path stays as it was. A gateway serves its own cohort as a `SecAggRound`: at
each stage's close it sends every member what the protocol addresses to it, on the
member's inbox on its own broker; when the last stage closes it has the exact integer
sum of its survivors' contributions. Under the coordinator it sends that sum up as its
partial (decoded: the coordinator learns the sum of the cohort); under a parent gateway
it is a member of the parent's cohort like a device, and masks the sum into it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from tern import topics
from tern.admit import Peer, Terms
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.messages import GlobalModel, RoundSchedule
from tern.policy import PolicyError
from tern.rounds.cohorts import cohort_of
from tern.rounds.events import Link, Note, Publish, SetTimer
from tern.rounds.secagg_member import CohortMember
from tern.rounds.secagg_round import SecAggRound
from tern.spec import ModelSpec

if TYPE_CHECKING:
    from tern.rounds.gateway import GatewayMachine

__all__ = ["join_parent", "open_secagg", "step_secagg"]

STAGE_TIMER = "stage"
IntArray = npt.NDArray[np.int64]


def open_secagg(
    g: GatewayMachine, run: int, s: RoundSchedule, model: GlobalModel,
    peers: dict[str, Peer], now: float,
) -> list[object]:  # fmt: skip
    """Open round `s` over this gateway's cohort; refuse it (upstream, for every device
    below) when its privacy options conflict or its stages do not fit in the round."""
    sa = s.secagg
    assert sa is not None
    devices = sum(p.devices for p in peers.values())
    conflict = s.privacy_conflict()
    if conflict is not None:
        return g._refuse_policy(run, s, devices, PolicyError(conflict))
    close_at = s.deadline - (g.margin + sa.unmask_s) * g.depth
    try:
        cohort = cohort_of(g.fleet, g.id, s, run, model.spec)
        assert cohort is not None
        rnd = SecAggRound(
            run=run, schedule=s, terms=Terms.of(g.fleet.fleet, run, s, model.spec),
            peers=peers, cohort=cohort, key=g.key, opened_at=now, close_at=close_at,
        )  # fmt: skip
    except TernError as exc:
        return g._refuse_policy(run, s, devices, exc)
    g.round = rnd
    g.inboxes = {}
    at = rnd.close_at
    assert at is not None
    return [SetTimer(STAGE_TIMER, at),
            Note(logging.DEBUG, "", "open", "gateway %s: round %d open under secure "
                 "aggregation (ring 2^%d), expecting %s",
                 (g.id, s.round, cohort.bits, ", ".join(cohort.members)))]  # fmt: skip


def join_parent(g: GatewayMachine, run: int, s: RoundSchedule, spec: ModelSpec) -> list[object]:
    """Under secure aggregation a gateway below another is a member of its parent's
    cohort: advertise its keys there as the round opens."""
    g.member = None
    if s.secagg is None or g.parent == COORDINATOR:
        return []
    try:
        cohort = cohort_of(g.fleet, g.parent, s, run, spec)
    except TernError:
        return []  # the parent refuses the round too, and says why
    if cohort is None or g.id not in cohort.members:
        return []
    g.member = CohortMember(
        cohort, g.id, g.key, link=Link.UP, topic=topics.partial(g.fleet.fleet, g.parent, g.id),
        stamp=(run, s.round, s.deadline), randomness=g.randomness, refused=g.feed.rejected,
    )  # fmt: skip
    return g.member.start()


def step_secagg(g: GatewayMachine, rnd: SecAggRound, now: float) -> list[object]:
    """Close the open stage: send each member its message, then wait for the next stage
    (or close the round)."""
    messages = rnd.advance()
    f = g.fleet.fleet
    g.inboxes = dict(messages)
    out: list[object] = [Publish(Link.DOWN, topics.inbox(f, m, g.id), data)
                         for m, data in sorted(messages.items())]  # fmt: skip
    at = rnd.close_at
    if at is None:
        return out + g._close(now)
    return [*out, SetTimer(STAGE_TIMER, at)]
