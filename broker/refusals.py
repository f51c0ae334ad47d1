"""Why the embedded broker refused something, and the count of every refusal.

`Reason` names a refusal (its values are the keys of `EmbeddedBroker.refused`);
`Refusals` counts each one exactly and logs it at most once per client, reason and
minute (`broker.ratelog.LogLimiter`). Kept apart from `broker.limits` so that the packet
reader (`broker.framing`) can name its refusals without importing the configuration.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from enum import StrEnum

from broker.ratelog import LogLimiter

__all__ = ["Reason", "Refusals", "shown"]

# The broker's refusals are logged as the broker's, whichever module counts them.
log = logging.getLogger("broker.embedded")


class Reason(StrEnum):
    """Why the embedded broker refused something; the values are the `refused` keys."""

    PACKET_TOO_LARGE = "packet_too_large"  # the fixed header announced more than the limit
    TOO_MANY_CONNECTIONS = "too_many_connections"
    CONNECT_TIMEOUT = "connect_timeout"  # no complete CONNECT in time
    NOT_CONNECT = "not_connect"  # the first packet was something else
    PROTOCOL_ERROR = "protocol_error"  # a packet MQTT 3.1.1 does not allow here
    BAD_TOPIC = "bad_topic"  # a PUBLISH on an empty, wildcard, $ or non-UTF-8 topic
    RETAINED_FULL = "retained_full"
    INFLIGHT_FULL = "inflight_full"  # a client's unacknowledged deliveries, or QoS 2 receipts
    RATE_LIMITED = "rate_limited"
    TLS_FAILED = "tls_failed"  # a TLS handshake that failed (no TLS, no client certificate...)


_SHOWN_CHARS = 128


def shown(value: object) -> str:
    """A value from the network, bounded for a log line."""
    if value is None or value == "":
        return "-"
    if not isinstance(value, str):
        return type(value).__name__
    if len(value) > _SHOWN_CHARS or not value.isprintable():
        return f"<{len(value)} characters>"
    return value


class Refusals:
    """Every refusal counted exactly, each (client, reason) logged at most once a period.

    Counted on the broker's loop, read from any thread.
    """

    def __init__(self, limiter: LogLimiter | None = None, *, logger: logging.Logger = log) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._limiter = limiter if limiter is not None else LogLimiter()
        self._log = logger

    def add(self, reason: str, client: str, detail: str = "") -> None:
        """Count one refusal of `client` (a client id, or an address before CONNECT);
        `reason` is a `Reason` here, a `broker.acl.Refusal` for the access policy, and
        `detail` is already bounded by the caller (`shown`)."""
        with self._lock:
            self._counts[reason] += 1
        self._limiter.log(self._log, shown(client), reason, "refused %s: %s%s", shown(client),
                          reason, f" ({detail})" if detail else "")  # fmt: skip

    @property
    def counts(self) -> Counter[str]:
        """Refusals so far by reason value (a copy)."""
        with self._lock:
            return Counter(self._counts)
