"""One round of secure aggregation at a gateway, the server of its cohort, in stages.

Four stages (`tern.rounds.stages`), each closing when every member still in the round
has sent its message of that stage, or at its time: ``keys`` (the round's open time
plus `keys_s`), ``shares`` (plus `shares_s`), ``masked`` (`unmask_s` before the cohort
closes) and ``reveal`` (when the cohort closes). Each needs at least the cohort's
threshold of members (`Cohort.minimum`); the protocol itself (`SecAggServer`) refuses
to go on when a secret cannot be rebuilt. Every message passes the trust boundary
(`tern.admit.admit_stage`) before the protocol sees it, with the same bookkeeping as
a plain round (`tern.collect`): retained messages, unknown senders, redeliveries (the
same bytes again, not counted), a bounded number of attempts per member and stage.
A member that could not train sends a failure: it is settled for the masked stage and
still helps unmask the others. Pure: no I/O, times come from the machine.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from tern.admit import Contribution, Peer, Terms, admit_stage
from tern.collect import MAX_ATTEMPTS, Offer, Outcome, screen
from tern.envelope import Kind
from tern.errors import TernError
from tern.messages import RoundSchedule
from tern.rounds.collecting import StagedRound
from tern.rounds.stages import Stage, Stages
from tern.secagg.crypto import SecAggFailed
from tern.secagg.graph import Cohort
from tern.secagg.server import SecAggServer
from tern.topics import Topic

__all__ = ["STAGES", "SecAggRound"]

STAGES = ("keys", "shares", "masked", "reveal")
_STAGE_OF = {Kind.SA_KEYS: "keys", Kind.SA_SHARES: "shares", Kind.SA_MASKED: "masked",
             Kind.SA_REVEAL: "reveal"}  # fmt: skip

IntArray = npt.NDArray[np.int64]


class SecAggRound(StagedRound):
    """Round `schedule.round` of run `run` at the gateway signing with `key`, over
    `cohort` (its `peers`), opened at `opened_at` and closing at `close_at`."""

    def __init__(
        self,
        *,
        run: int,
        schedule: RoundSchedule,
        terms: Terms,
        peers: Mapping[str, Peer],
        cohort: Cohort,
        key: SigningKey,
        opened_at: float,
        close_at: float,
    ) -> None:
        sa = schedule.secagg
        if sa is None:
            raise ValueError("a secure aggregation round needs the schedule's secagg terms")
        self.run, self.schedule, self.terms = run, schedule, terms
        self.peers = dict(peers)
        self.cohort = cohort
        self.server = SecAggServer(cohort, key)
        need = cohort.minimum
        self.stages = Stages(
            [
                Stage("keys", opened_at + sa.keys_s, need),
                Stage("shares", opened_at + sa.keys_s + sa.shares_s, need),
                Stage("masked", close_at - sa.unmask_s, need),
                Stage("reveal", close_at, need),
            ]
        )  # fmt: skip  (StageError when the cohort's times do not fit in the round)
        self.opened_at = opened_at
        self.stands_for = {p.id: p.devices for p in peers.values()}
        self.failures: dict[str, Contribution] = {}
        self.rejected: Counter[str] = Counter()
        self.extra_rejected: Counter[str] = Counter()  # refused outside the round
        self.bytes_in = 0
        self.bytes_out = 0
        self._sent: dict[str, set[str]] = {name: set() for name in STAGES}
        self._seen: set[bytes] = set()
        self._attempts: Counter[tuple[str, str]] = Counter()
        self.result: IntArray | None = None

    @property
    def stage(self) -> str | None:
        stage = self.stages.current
        return None if stage is None else stage.name

    # -- intake -------------------------------------------------------------------------

    def offer(self, data: bytes, topic: Topic | str, *, retained: bool) -> Offer:
        """Check one member message and hand it to the protocol; never raises."""
        self.bytes_in += len(data)
        screened = screen(topic, retained, self.peers)
        if isinstance(screened, Offer):
            self.rejected[screened.reason] += 1
            return screened
        parsed, peer = screened
        sender = peer.id
        digest = hashlib.sha256(data).digest()
        if digest in self._seen:
            return Offer(Outcome.REDELIVERED, sender)
        stage = self.stage
        if stage is None:
            return self._reject(sender, "late", "the round has closed here")
        if self._attempts[(peer.id, stage)] >= MAX_ATTEMPTS:
            return self._reject(sender, "rate_limited", "too many messages in this stage")
        self._attempts[(peer.id, stage)] += 1
        try:
            opened = admit_stage(data, parsed, peer, self.cohort)
            if isinstance(opened, Contribution):
                self._seen.add(digest)
                if peer.id in self.failures:
                    return self._reject(sender, "duplicate", "already reported its failure")
                self.failures[peer.id] = opened
                return Offer(Outcome.FAILED, peer.id)
            self.server.offer(peer.id, opened, data)
        except TernError as exc:
            if exc.reason != "out_of_order":  # early now, it may be due in a later stage
                self._seen.add(digest)
            return self._reject(sender, exc.reason, exc.message)
        self._seen.add(digest)
        name = _STAGE_OF.get(opened.kind)
        if name is not None:
            self._sent[name].add(peer.id)
        return Offer(Outcome.ACCEPTED, peer.id)

    def _reject(self, sender: str | None, reason: str, message: str) -> Offer:
        self.rejected[reason] += 1
        return Offer(Outcome.REJECTED, sender, reason, message)

    # -- stages -------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every member still expected in the open stage has sent (or, for the masked
        inputs, reported its failure)."""
        stage = self.stage
        if stage is None:
            return False
        settled = self._sent[stage] | (set(self.failures) if stage == "masked" else set())
        return set(self.server.expected) <= settled

    def advance(self) -> dict[str, bytes]:
        """Close the open stage: the gateway's messages to each member, by member ({}
        when the round is over, or failed: see `stages.failure`)."""
        stage = self.stage
        if stage is None:
            return {}
        try:
            messages = self.server.advance()
        except SecAggFailed as exc:
            self.stages.failure = f"{stage}: {exc.message}"
            return {}
        ok = self.stages.close(len(self.server.expected) if not self.server.done
                               else len(self.server.survivors))  # fmt: skip
        if not ok:
            return {}
        if self.server.done:
            self.result = self.server.result()
        self.bytes_out += sum(len(m) for m in messages.values())
        return messages

    @property
    def dropped(self) -> int:
        """Participating devices below this gateway whose contribution is not in the sum."""
        if self.result is None:
            return sum(self.stands_for.values())
        counted = int(self.result[-1])
        failed = sum(sum(c.failed.values()) for c in self.failures.values())
        return max(sum(self.stands_for.values()) - counted - failed, 0)

    @property
    def failed(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for c in self.failures.values():
            out.update(c.failed)
        return out
