"""One round's collection of updates or partials at a receiver: pure, clock-free.

A gateway collects its devices' updates (and its child gateways' partials); the
coordinator collects its gateways' partials. Both the same way: each message is
opened (size, CBOR, signature, fleet, kind, round) and checked against the spec, at
most one per sender is kept, the rest is counted by reason, and the result is folded
in ascending sender id (so it does not depend on arrival order). A rejected message
never touches what was accepted. A sender may report a failure instead of an update
(its own, or those of devices below it); that settles it for the round, and the
reasons are tallied in `failed`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum

from nacl.signing import VerifyKey

from tern.aggregate import Accumulator, Partial
from tern.envelope import Kind, open_envelope
from tern.errors import TernError
from tern.messages import CheckedUpdate, Failure, Update
from tern.spec import ModelSpec

__all__ = ["Collector", "Offer", "Outcome", "max_update_bytes"]


def max_update_bytes(spec: ModelSpec) -> int:
    """The largest well-formed update for `spec`: float32 tensors plus generous framing."""
    return 4 * spec.size + 64 * len(spec.tensors) + 4096


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"  # a signed failure report in place of an update


@dataclass(frozen=True, slots=True)
class Offer:
    outcome: Outcome
    sender: str | None
    reason: str = ""
    message: str = ""


class Collector:
    """Collects round `round` for `receiver` from the `expected` senders."""

    def __init__(
        self,
        *,
        fleet: str,
        round: int,
        spec: ModelSpec,
        keys: Mapping[str, VerifyKey],
        expected: Collection[str],
        kinds: Collection[Kind] = (Kind.UPDATE, Kind.PARTIAL, Kind.FAILURE),
    ) -> None:
        self.fleet = fleet
        self.round = round
        self.spec = spec
        self.keys = keys
        self.expected = frozenset(expected)
        self.kinds = frozenset(kinds)
        self.max_bytes = max_update_bytes(spec)
        self.accepted: dict[str, CheckedUpdate] = {}
        self.failures: dict[str, Failure] = {}  # sender -> what it reported instead
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0

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
        for failure in self.failures.values():
            out.update(failure.failed)
        for checked in self.accepted.values():
            out.update(checked.failed)
        return out

    def offer(self, data: bytes, topic_sender: str | None = None) -> Offer:
        """Validate one message; accept it or count why not. Never raises a TernError."""
        self.bytes_in += len(data)
        try:
            env = open_envelope(
                data,
                self.keys,
                fleet=self.fleet,
                kinds=self.kinds,
                round=self.round,
                max_bytes=self.max_bytes,
            )
            if topic_sender is not None and env.sender != topic_sender:
                return self._reject(
                    env.sender, "wrong_sender", "signed by another sender than its topic"
                )
            if env.sender not in self.expected:
                return self._reject(
                    env.sender, "unexpected_sender", "not a participant of this round"
                )
            if env.sender in self.accepted or env.sender in self.failures:
                return self._reject(env.sender, "duplicate", "already contributed to this round")
            if env.kind is Kind.FAILURE:
                self.failures[env.sender] = Failure.from_body(env.body)
                return Offer(Outcome.FAILED, env.sender)
            update = Update.from_body(env.body)
            if env.kind is Kind.UPDATE and (update.count != 1 or update.failed):
                return self._reject(
                    env.sender, "malformed", "a device update counts one contributor, no failures"
                )
            checked = update.check(self.spec)
        except TernError as exc:
            return self._reject(topic_sender, exc.reason, exc.message)
        self.accepted[env.sender] = checked
        return Offer(Outcome.ACCEPTED, env.sender)

    def _reject(self, sender: str | None, reason: str, message: str) -> Offer:
        self.rejected[reason] += 1
        return Offer(Outcome.REJECTED, sender, reason, message)

    def result(self) -> Partial:
        """The fold of everything accepted, in ascending sender id."""
        # Decoding straight into one accumulator in sender order gives the same bits as
        # aggregate.fold_sorted over decoded partials, without a copy per sender.
        acc = Accumulator(self.spec.size)
        for sender in sorted(self.accepted):
            self.accepted[sender].add_to(acc)
        return acc.result()
