"""One round's collection of contributions at a receiver: pure, clock-free.

A gateway collects its devices' updates (and its child gateways' partials); the
coordinator collects its gateways' partials. Both the same way. Each message is
checked here against the round's history, cheapest first, before it reaches the trust
boundary (`tern.admit`, which verifies it against the fleet file and the schedule):

- a retained message on a contribution topic is refused (``retained``): a sender
  never retains a contribution, and a broker would hand the same one out again;
- the topic must name a sender of this round (``unexpected_sender``, ``wrong_topic``);
- a sender that has settled (an accepted update or failure) gets nothing more verified:
  the same bytes again are a redelivery (QoS 1) and are ignored, anything else is a
  ``duplicate``;
- each sender may have at most `max_attempts` messages verified in a round, so one
  compromised device cannot make its gateway check signatures without end
  (``rate_limited``);
- the same refused bytes again are a redelivery too: counted once.

At most one contribution per sender is kept, the rest is counted by reason, and the
fold is in ascending sender id (so it does not depend on arrival order). A rejected
message never touches what was accepted. A sender may report a failure instead of an
update; that settles it for the round, and the reasons are tallied in `failed`. A fold
that would not be finite is never handed out: the contributions that make it so are
refused at `close()` (``overflow``).
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from tern.admit import Contribution, Peer, Terms, admit
from tern.aggregate import Partial
from tern.aggregators import Aggregator, ExactSum
from tern.errors import TernError, TopicError
from tern.messages import CheckedUpdate
from tern.spec import ModelSpec
from tern.topics import Topic, parse

__all__ = ["MAX_ATTEMPTS", "Collector", "Offer", "Outcome", "screen"]

MAX_ATTEMPTS = 4  # messages of one sender verified in one round, at most
_REMEMBERED = 1024  # digests of refused messages kept to recognise redeliveries


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"  # a signed failure report in place of an update
    REDELIVERED = "redelivered"  # bytes already handled: not counted again


@dataclass(frozen=True, slots=True)
class Offer:
    outcome: Outcome
    sender: str | None
    reason: str = ""
    message: str = ""


def screen(
    topic: Topic | str, retained: bool, peers: Mapping[str, Peer]
) -> tuple[Topic, Peer] | Offer:
    """The first, cheapest checks of anything offered to a round: the topic parses, the
    message is not retained (a sender never retains a contribution, and a broker would
    hand the same one out again), and its sender is one of the round's; the refusal
    (not yet counted) otherwise."""
    try:
        parsed = topic if isinstance(topic, Topic) else parse(topic)
    except TopicError as exc:
        return Offer(Outcome.REJECTED, None, exc.reason, exc.message)
    sender = parsed.sender
    if retained:
        return Offer(Outcome.REJECTED, sender, "retained", "a contribution is never retained")
    peer = peers.get(sender) if sender is not None else None
    if peer is None:
        return Offer(Outcome.REJECTED, sender, "unexpected_sender", "not a sender of this round")
    return parsed, peer


class Collector:
    """Collects the round of `terms` from `peers` (tern.admit.peers_of)."""

    def __init__(
        self,
        *,
        terms: Terms,
        peers: Mapping[str, Peer],
        max_attempts: int = MAX_ATTEMPTS,
        aggregator: Aggregator | None = None,
    ) -> None:
        self.terms = terms
        self.aggregator: Aggregator = aggregator if aggregator is not None else ExactSum()
        self.peers = dict(peers)
        self.max_attempts = max_attempts
        self.accepted: dict[str, CheckedUpdate] = {}
        self.failures: dict[str, Contribution] = {}  # sender -> the failure it reported
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self._digests: dict[str, bytes] = {}  # settled sender -> digest of what settled it
        self._attempts: Counter[str] = Counter()
        self._refused: OrderedDict[bytes, None] = OrderedDict()
        self._closed: Partial | None = None

    @property
    def spec(self) -> ModelSpec:
        return self.terms.spec

    @property
    def expected(self) -> frozenset[str]:
        return frozenset(self.peers)

    @property
    def complete(self) -> bool:
        return self.expected <= self.accepted.keys() | self.failures.keys()

    @property
    def missing(self) -> frozenset[str]:
        return self.expected - self.accepted.keys() - self.failures.keys()

    @property
    def failed(self) -> Counter[str]:
        """Participants below this receiver that could not contribute, by reason."""
        out: Counter[str] = Counter()
        for contribution in self.failures.values():
            out.update(contribution.failed)
        for checked in self.accepted.values():
            out.update(checked.failed)
        return out

    def offer(self, data: bytes, topic: Topic | str, *, retained: bool = False) -> Offer:
        """Validate one message that arrived on `topic`; accept it or count why not.

        Never raises a TernError. A message offered after `close()` is refused as late.
        """
        self.bytes_in += len(data)
        screened = screen(topic, retained, self.peers)
        if isinstance(screened, Offer):
            self.rejected[screened.reason] += 1
            return screened
        parsed, peer = screened
        sender = peer.id
        digest = hashlib.sha256(data).digest()
        if sender in self._digests:
            if self._digests[sender] == digest:
                return Offer(Outcome.REDELIVERED, sender)
            return self._reject(sender, "duplicate", "already contributed to this round")
        if digest in self._refused:
            return Offer(Outcome.REDELIVERED, sender)
        if self._closed is not None:
            return self._reject(sender, "late", "the round has closed here")
        if self._attempts[peer.id] >= self.max_attempts:
            return self._reject(sender, "rate_limited", "too many messages in this round")
        self._attempts[peer.id] += 1
        try:
            contribution = admit(data, parsed, peer, self.terms)
        except TernError as exc:
            self._remember_refused(digest)
            return self._reject(sender, exc.reason, exc.message)
        self._digests[peer.id] = digest
        if contribution.update is None:
            self.failures[peer.id] = contribution
            return Offer(Outcome.FAILED, peer.id)
        self.accepted[peer.id] = contribution.update
        return Offer(Outcome.ACCEPTED, peer.id)

    def _remember_refused(self, digest: bytes) -> None:
        self._refused[digest] = None
        if len(self._refused) > _REMEMBERED:
            self._refused.popitem(last=False)

    def _reject(self, sender: str | None, reason: str, message: str) -> Offer:
        self.rejected[reason] += 1
        return Offer(Outcome.REJECTED, sender, reason, message)

    def close(self) -> Partial:
        """Fold what was accepted with the round's aggregator (default: the exact sum,
        in ascending sender id); finite by construction.

        Contributions the aggregator leaves out (an overflowing sum: ``overflow``) are
        removed from `accepted` and counted in `rejected`. Idempotent: later calls
        return the same result.
        """
        if self._closed is not None:
            return self._closed
        folded = self.aggregator.fold(self.accepted, self.terms.spec.size)
        for sender, reason in folded.left_out.items():
            del self.accepted[sender]
            self.rejected[reason] += 1
        self._closed = folded.partial
        return folded.partial

    def result(self) -> Partial:
        """`close()`: kept for callers that read the fold once the round is over."""
        return self.close()
