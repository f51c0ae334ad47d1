"""One round being collected at a receiver (a gateway or the coordinator), in stages.

Wraps a `tern.collect.Collector` (the trust boundary's bookkeeping) with the round's
stages (`tern.rounds.stages`): the open stage closes when every expected sender has
settled or at its time, and the round fails at a stage left with too few survivors.
Plain rounds have one stage, ``collect``. Pure: times come from the machine.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Protocol

from tern.admit import Peer, Terms
from tern.aggregate import Partial
from tern.aggregators import Aggregator
from tern.collect import Collector, Offer
from tern.messages import RoundSchedule
from tern.rounds.events import Note, Received
from tern.rounds.stages import Stage, Stages
from tern.topics import Topic

__all__ = ["CollectingRound", "Offers", "StagedRound", "offer_to"]


class StagedRound:
    """What every round at a receiver has: its run, its schedule and its stages."""

    run: int
    schedule: RoundSchedule
    stages: Stages

    @property
    def stamp(self) -> tuple[int, int, float]:
        s = self.schedule
        return (self.run, s.round, s.deadline)

    @property
    def round(self) -> int:
        return self.schedule.round

    @property
    def close_at(self) -> float | None:
        """When the open stage closes at the latest; None once the round is over."""
        stage = self.stages.current
        return None if stage is None else stage.close_at


class CollectingRound(StagedRound):
    """Round `schedule.round` of run `run`, opened at `opened_at`, from `peers`."""

    def __init__(
        self,
        *,
        run: int,
        schedule: RoundSchedule,
        terms: Terms,
        peers: Mapping[str, Peer],
        stages: Sequence[Stage],
        opened_at: float,
        aggregator: Aggregator | None = None,
    ) -> None:
        self.run = run
        self.schedule = schedule
        self.collector = Collector(terms=terms, peers=peers, aggregator=aggregator)
        self.stages = Stages(stages)
        self.opened_at = opened_at
        self.stands_for = {p.id: p.devices for p in peers.values()}
        self.extra_rejected: Counter[str] = Counter()  # refused outside the collector

    def offer(self, data: bytes, topic: Topic | str, *, retained: bool) -> Offer:
        return self.collector.offer(data, topic, retained=retained)

    @property
    def complete(self) -> bool:
        """Every expected sender has settled: the open stage need not wait longer."""
        return self.collector.complete

    def close(self) -> Partial:
        """Close the open stage (one-stage rounds: the round) and fold what survived."""
        result = self.collector.close()
        self.stages.close(result.count)
        return result

    @property
    def rejected(self) -> Counter[str]:
        return self.collector.rejected + self.extra_rejected

    @property
    def dropped(self) -> int:
        """Participants below this receiver whose contribution never arrived."""
        accepted = self.collector.accepted
        return sum(
            max(n - (accepted[c].count if c in accepted else 0), 0)
            for c, n in self.stands_for.items()
        )


class Offers(Protocol):
    """A round that takes contributions: a plain one, or one under secure aggregation."""

    @property
    def round(self) -> int: ...

    def offer(self, data: bytes, topic: Topic | str, *, retained: bool) -> Offer: ...


def offer_to(
    rnd: Offers | None,
    outside: Counter[str],
    event: Received,
    who: str,
    parsed: Topic | None = None,
) -> list[object]:
    """Offer a contribution that arrived at `who` to its open round (`parsed`: its topic,
    when the caller has parsed it already); a log line for what is refused
    (``no_open_round`` when none is open, counted in `outside`)."""
    topic = event.topic[:128]
    if rnd is None:
        outside["no_open_round"] += 1
        return [Note(logging.INFO, topic, "no_open_round",
                     "%s: refused a message on %s: no round is open", (who, topic))]  # fmt: skip
    offer = rnd.offer(event.payload, parsed or event.topic, retained=event.retained)
    if not offer.reason:
        return []
    return [Note(logging.WARNING, str(offer.sender), offer.reason,
                 "%s: round %d: refused a message from %s (%s): %s",
                 (who, rnd.round, offer.sender, offer.reason, offer.message))]  # fmt: skip
