"""What the embedded broker accepts from a client, and how much of itself a client may hold.

`BrokerLimits` is the configuration (`EmbeddedBroker(..., limits=BrokerLimits(...))`,
`tern broker --max-...`); `fleet_limits` sizes it for a fleet. `TokenBuckets` bound each
client's publish rate and `Window` bounds the deliveries one client has not acknowledged
yet; `broker.amqtt_broker` enforces them, and all of this is free of amqtt so that it
reads (and tests) on its own. The rest of the enforcement lives in its own modules and
is re-exported here: `PacketReader` and its checks (`broker.framing`), `Reason`,
`Refusals` and `shown` (`broker.refusals`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace

from broker.errors import BrokerConfigError
from broker.fleet_access import max_packet_bytes
from broker.framing import PacketReader, connect_well_formed, subscription_well_formed
from broker.refusals import Reason, Refusals, shown
from tern.fleet import COORDINATOR, Fleet

__all__ = [
    "MAX_MQTT_PACKET_BYTES",
    "BrokerLimits",
    "PacketReader",
    "Reason",
    "Refusals",
    "TokenBuckets",
    "Window",
    "connect_well_formed",
    "fleet_limits",
    "shown",
    "sized_for_packets",
    "subscription_well_formed",
]

MIB = 1 << 20
MAX_MQTT_PACKET_BYTES = 1 + 4 + 268_435_455  # byte 1, a 4-byte remaining length, the body


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """How much the embedded broker accepts; every default is safe for a gateway's Pi.

    Sizes are bytes. `max_packet_bytes` counts a whole packet, fixed header included
    (as Mosquitto's max_packet_size). At most `max_inflight` deliveries to one client
    are under way at a time (QoS 1/2: until it acknowledges them; QoS 0: until written);
    the others wait, and at most `max_queued` messages and `max_queued_bytes` are pending
    for one client in all; beyond, a delivery to that client is dropped. At most
    `max_inflight` incoming QoS 2 messages of one client may await their PUBREL (beyond:
    the client is disconnected). A retained message costs its payload plus its topic.
    Publishes beyond `publish_rate` per second (bursts of `publish_burst`) are dropped,
    except from the logins in `unlimited_users` (meaningful only when logins are
    checked: without an access policy anyone may claim any user name).
    """

    max_packet_bytes: int = 8 * MIB
    max_connections: int = 1024
    connect_timeout: float = 10.0
    max_retained: int = 4096
    max_retained_bytes: int = 64 * MIB
    max_inflight: int = 64
    max_queued: int = 1000
    max_queued_bytes: int = 64 * MIB
    publish_rate: float = 20.0
    publish_burst: int = 200
    unlimited_users: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unlimited_users", _users(self.unlimited_users))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "unlimited_users":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BrokerConfigError(f"{f.name} must be a number, not {type(value).__name__}")
            if f.type == "int" and not isinstance(value, int):
                raise BrokerConfigError(f"{f.name} must be an integer")
            if not (math.isfinite(value) and value > 0):
                raise BrokerConfigError(f"{f.name} must be finite and above 0")
        if not 2 <= self.max_packet_bytes <= MAX_MQTT_PACKET_BYTES:
            raise BrokerConfigError(f"max_packet_bytes must be in 2..{MAX_MQTT_PACKET_BYTES}")
        if self.max_queued < self.max_inflight:
            raise BrokerConfigError("max_queued counts the messages in flight: >= max_inflight")
        if self.max_queued_bytes < self.max_packet_bytes:
            raise BrokerConfigError(
                "max_queued_bytes must hold one packet of max_packet_bytes, or the largest"
                " messages could never be delivered"
            )


def _users(value: object) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise BrokerConfigError("unlimited_users must be a set of user names")
    users = frozenset(value)
    if not all(isinstance(u, str) and u for u in users):
        raise BrokerConfigError("unlimited_users must hold non-empty user names")
    return users


def sized_for_packets(limits: BrokerLimits, max_packet_bytes: int) -> BrokerLimits:
    """`limits` with `max_packet_bytes`, and room for such messages: retained bytes for
    at least four (a model, a kernel and their successors) and queued bytes for two."""
    return replace(
        limits,
        max_packet_bytes=max_packet_bytes,
        max_retained_bytes=max(limits.max_retained_bytes, 4 * max_packet_bytes),
        max_queued_bytes=max(limits.max_queued_bytes, 2 * max_packet_bytes),
    )


def fleet_limits(fleet: Fleet, broker: str, base: BrokerLimits | None = None) -> BrokerLimits:
    """`base` (the defaults) for `broker` of `fleet` (``coordinator`` or a gateway id):
    packets as large as the fleet's largest model or kernel need
    (`broker.fleet_access.max_packet_bytes`), and no publish rate for the broker's owner
    and the gateways that report to it, whose traffic grows with their subtree (they
    relay every board's telemetry and status); devices and boards keep the rate."""
    if broker != COORDINATOR and broker not in fleet.gateways:
        raise BrokerConfigError(f"{shown(broker)} is not the coordinator or a gateway")
    limits = sized_for_packets(
        base if base is not None else BrokerLimits(), max_packet_bytes(fleet)
    )
    exempt = {broker, *fleet.children(broker)}
    return replace(limits, unlimited_users=limits.unlimited_users | exempt)


# -- publish rate ------------------------------------------------------------------------


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last: float


class TokenBuckets:
    """A token bucket per client: `burst` tokens, refilled at `rate` a second.

    Memory is bounded: when `max_keys` clients have one, the buckets that have refilled
    (as good as new) are forgotten, and then the oldest down to three quarters of
    `max_keys`, so that a flood of client ids costs a scan per `max_keys / 4` of them.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 16384,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> bool:
        """Spend one token of `key`'s bucket; False when it has none left."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._forget(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            elapsed = max(0.0, now - bucket.last)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.last = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _forget(self, now: float) -> None:
        full = [
            k
            for k, b in self._buckets.items()
            if b.tokens + max(0.0, now - b.last) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]
        for key in list(self._buckets)[: len(self._buckets) - self.max_keys * 3 // 4]:
            del self._buckets[key]


# -- deliveries one client has not acknowledged ----------------------------------------


class Window:
    """The deliveries to one client not finished yet: at most `inflight` sent and awaiting
    an acknowledgement, the rest waiting for a slot; `queued` messages and
    `queued_bytes` at most in all. One per connection, on the broker's loop."""

    def __init__(self, inflight: int, queued: int, queued_bytes: int) -> None:
        self.slots = asyncio.Semaphore(inflight)
        self._queued, self._queued_bytes = queued, queued_bytes
        self.pending = 0
        self.pending_bytes = 0

    def admit(self, size: int) -> bool:
        """Reserve room for a delivery of `size` bytes; False: the window is full."""
        if self.pending + 1 > self._queued or self.pending_bytes + size > self._queued_bytes:
            return False
        self.pending += 1
        self.pending_bytes += size
        return True

    def release(self, size: int) -> None:
        self.pending -= 1
        self.pending_bytes -= size
