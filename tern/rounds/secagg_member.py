"""A member's side of its cohort's secure aggregation in one round, as actions.

A device takes part in its gateway's cohort, a child gateway in its parent's, the same
way: it advertises its keys when the round opens, answers what its gateway sends to
its inbox (the roster with its shares, the survivors with its reveal), and masks its
contribution once it has both its inbox of shares and its contribution (a device's
trained update, a gateway's own cohort sum). Everything it sends goes on its usual
contribution topic; what arrives is opened at the one boundary for the gateway's
messages (`tern.secagg.wire.open_server_message`). Pure: no I/O, no clock.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, MutableMapping

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from tern.errors import TernError
from tern.rounds.events import Link, Note, Publish
from tern.secagg.client import SecAggClient
from tern.secagg.graph import Cohort
from tern.secagg.wire import open_server_message
from tern.topics import Topic

__all__ = ["CohortMember"]

IntArray = npt.NDArray[np.int64]


class CohortMember:
    """`me`'s part in `cohort` for the round stamped `stamp` (run, round, deadline); its
    messages go out on `link` to `topic`."""

    def __init__(
        self,
        cohort: Cohort,
        me: str,
        key: SigningKey,
        *,
        link: Link,
        topic: Topic,
        stamp: tuple[int, int, float],
        randomness: Callable[[int], bytes] = os.urandom,
        refused: MutableMapping[str, int] | None = None,
    ) -> None:
        self.cohort = cohort
        self.me = me
        self.link = link
        self.topic = topic
        self.stamp = stamp
        self.client = SecAggClient(cohort, me, key, randomness=randomness)
        # What it refused from its gateway, by reason: its component's own counts (a
        # device's `rejected`, a gateway's refusals in its metrics) when given.
        self.refused: MutableMapping[str, int] = Counter() if refused is None else refused
        self.masked_bytes = 0
        self._pending: IntArray | None = None
        self._masked = False

    def _publish(self, data: bytes) -> Publish:
        return Publish(self.link, self.topic, data)

    def start(self) -> list[object]:
        """The round opened: advertise this member's keys."""
        return [self._publish(self.client.advertise())]

    def on_inbox(self, data: bytes) -> list[object]:
        """A message from the gateway to this member's inbox: open it, answer it."""
        try:
            env = open_server_message(data, self.cohort, self.me)
            answer = self.client.take(env)
        except TernError as exc:
            key = f"secagg_{exc.reason}"
            self.refused[key] = self.refused.get(key, 0) + 1
            return [Note(logging.WARNING, "secagg", exc.reason,
                         "%s: round %d: refused a secure aggregation message (%s): %s",
                         (self.me, self.cohort.round, exc.reason, str(exc)))]  # fmt: skip
        out: list[object] = [] if answer is None else [self._publish(answer)]
        return out + self._maybe_mask()

    def contribute(self, ints: IntArray) -> list[object]:
        """This member's contribution is ready: masked now, or once its shares are in."""
        self._pending = ints
        return self._maybe_mask()

    @property
    def masked(self) -> bool:
        return self._masked

    def _maybe_mask(self) -> list[object]:
        if self._pending is None or self._masked or not self.client.ready:
            return []
        self._masked = True
        data = self.client.mask(self._pending)
        self._pending = None  # the plain vector is not kept once masked
        self.masked_bytes = len(data)
        return [self._publish(data)]

    def resend(self) -> list[object]:
        """Its gateway subscribed again (a reconnect): send the last message again."""
        last = self.client.last
        return [] if last is None else [Publish(self.link, self.topic, last)]
