"""The access policy a running embedded broker enforces, and what it has refused.

`EmbeddedBroker(access=AccessControl(policy))` installs `broker.plugins.AccessPlugin`,
which asks this object about every CONNECT, PUBLISH and SUBSCRIBE. The policy can be
replaced while the broker runs (a gateway does so when its boards file is reloaded).
Every refusal is logged with its reason and counted in `refused`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from broker.acl import AccessPolicy, Refusal, check_connect, check_publish, check_subscribe

__all__ = ["AccessControl"]

log = logging.getLogger(__name__)


class AccessControl:
    """Thread-safe: the broker's loop asks, the owner swaps the policy and reads counts."""

    def __init__(self, policy: AccessPolicy) -> None:
        self._policy = policy
        self._lock = threading.Lock()
        self._refused: Counter[str] = Counter()

    @property
    def policy(self) -> AccessPolicy:
        return self._policy

    def set_policy(self, policy: AccessPolicy) -> None:
        """Apply `policy` to what comes next; clients already connected stay connected."""
        self._policy = policy  # one reference swap: a check sees the old or the new policy

    @property
    def refused(self) -> Counter[str]:
        """Refusals so far, by `broker.acl.Refusal` name (a copy)."""
        with self._lock:
            return Counter(self._refused)

    def connect(
        self, client_id: str, user: str | None, password: str | None, will_topic: str | None
    ) -> bool:
        return self._verdict(
            check_connect(self._policy, client_id, user, password, will_topic),
            "refused the connection of client %r (user %r)", client_id, user,
        )  # fmt: skip

    def publish(self, client_id: str, user: str | None, topic: str) -> bool:
        return self._verdict(
            check_publish(self._policy, user, topic),
            "dropped a message from client %r (user %r) on %s", client_id, user, topic,
        )  # fmt: skip

    def subscribe(self, client_id: str, user: str | None, topic_filter: str) -> bool:
        return self._verdict(
            check_subscribe(self._policy, user, topic_filter),
            "refused client %r (user %r) a subscription to %s", client_id, user, topic_filter,
        )  # fmt: skip

    def _verdict(self, refusal: Refusal | None, what: str, *args: object) -> bool:
        if refusal is None:
            return True
        with self._lock:
            self._refused[refusal] += 1
        log.warning("access: " + what + ": %s", *args, refusal)
        return False
