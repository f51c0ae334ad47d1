"""The access policy a running embedded broker enforces, and what it has refused.

`EmbeddedBroker(access=AccessControl(policy))` installs `broker.plugins.AccessPlugin`,
which asks this object about every CONNECT, PUBLISH and SUBSCRIBE; the broker itself
asks `retain` about every retained PUBLISH. The policy can be replaced while the broker
runs (a gateway does so when its boards file is reloaded). Every refusal is counted
exactly in `refused` and logged at most once per client, reason and minute.
"""

from __future__ import annotations

import logging
from collections import Counter

from broker.acl import AccessPolicy, Refusal, check_connect, check_publish, check_subscribe
from broker.ratelog import LogLimiter
from broker.refusals import Refusals, shown

__all__ = ["AccessControl"]

log = logging.getLogger(__name__)


class AccessControl:
    """Thread-safe: the broker's loop asks, the owner swaps the policy and reads counts."""

    def __init__(self, policy: AccessPolicy, *, limiter: LogLimiter | None = None) -> None:
        self._policy = policy
        self._refusals = Refusals(limiter, logger=log)

    @property
    def policy(self) -> AccessPolicy:
        return self._policy

    def set_policy(self, policy: AccessPolicy) -> None:
        """Apply `policy` to what comes next; clients already connected stay connected."""
        self._policy = policy  # one reference swap: a check sees the old or the new policy

    @property
    def refused(self) -> Counter[str]:
        """Refusals so far, by `broker.acl.Refusal` value (a copy)."""
        return self._refusals.counts

    def connect(
        self,
        client_id: str,
        user: str | None,
        password: str | None,
        will_topic: str | None,
        will_retain: bool = False,
    ) -> bool:
        refusal = check_connect(self._policy, client_id, user, password, will_topic, will_retain)
        return self._verdict(refusal, client_id, user, "refused the connection")

    def publish(self, client_id: str, user: str | None, topic: str, retain: bool = False) -> bool:
        refusal = check_publish(self._policy, user, topic, retain)
        return self._verdict(refusal, client_id, user, "dropped a message on", topic)

    def retain(self, client_id: str, user: str | None, topic: str) -> bool:
        """Whether a retained PUBLISH on `topic` may be kept (and so delivered at all)."""
        refusal = check_publish(self._policy, user, topic, retain=True)
        return self._verdict(refusal, client_id, user, "dropped a retained message on", topic)

    def subscribe(self, client_id: str, user: str | None, topic_filter: str) -> bool:
        refusal = check_subscribe(self._policy, user, topic_filter)
        return self._verdict(refusal, client_id, user, "refused a subscription to", topic_filter)

    def _verdict(
        self,
        refusal: Refusal | None,
        client_id: str,
        user: str | None,
        what: str,
        topic: str | None = None,
    ) -> bool:
        if refusal is None:
            return True
        where = "" if topic is None else f" {shown(topic)}"
        self._refusals.add(refusal, client_id, f"{what}{where}, user {shown(user)}")
        return False
