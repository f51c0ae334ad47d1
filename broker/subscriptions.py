"""The subscriptions an MQTT client holds: sent again after every reconnect, and delivered to.

Used by `broker.transport.MqttTransport`, whose lock (an RLock) it shares: the transport
holds it around a change of connection state and the sends that go with it. Its log
lines go to the transport's logger ("broker.transport").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from broker.acks import Ack, Acks
from broker.errors import SubscribeError, SubscribeTimeout
from broker.transport_types import Handler, Message
from tern.topics import Topic

__all__ = ["Subscription", "Subscriptions"]

# The transport's logger, not this module's: these lines belong to the client.
log = logging.getLogger("broker.transport")


@dataclass(frozen=True, slots=True)
class Subscription:
    filter: Topic
    handler: Handler
    qos: int


class Subscriptions:
    """Subscriptions by filter; subscribing to a filter again replaces its handler."""

    def __init__(
        self, client: mqtt.Client, acks: Acks, lock: threading.RLock, client_id: str
    ) -> None:
        self._client = client
        self._acks = acks
        self._lock = lock
        self._client_id = client_id
        self._by_filter: dict[str, Subscription] = {}
        self._resent: list[tuple[Subscription, Ack]] = []
        self._handling = threading.local()

    def add(self, sub: Subscription) -> None:
        with self._lock:
            self._by_filter[sub.filter.path] = sub

    def remove(self, path: str) -> None:
        with self._lock:
            self._by_filter.pop(path, None)

    def handlers(self, topic: str) -> list[Handler]:
        """The handlers of every subscription whose filter matches `topic`."""
        with self._lock:
            return [s.handler for s in self._by_filter.values() if s.filter.matches(topic)]

    def send(self, sub: Subscription) -> Ack | None:
        """Send one SUBSCRIBE; None when the connection is gone."""
        with self._lock:
            self._acks.begin()
            rc, mid = self._client.subscribe(sub.filter.path, sub.qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                self._acks.cancel()
                return None  # the connection dropped under us: on_connect sends it again
            return self._acks.register(mid)

    def send_all(self) -> None:
        """Send every subscription again (after a CONNACK), remembering those that went out."""
        with self._lock:
            resent = [(sub, self.send(sub)) for sub in self._by_filter.values()]
            self._resent = [(sub, ack) for sub, ack in resent if ack is not None]

    def await_resent(self, deadline: float, timeout: float) -> None:
        """Wait until `deadline` (monotonic) for the SUBACKs of the last send_all()."""
        with self._lock:
            pending = list(self._resent)
        for sub, ack in pending:
            self.await_ack(sub, ack, deadline - time.monotonic(), timeout)

    def await_ack(self, sub: Subscription, ack: Ack, remaining: float, timeout: float) -> None:
        """Wait for the SUBACK of `sub`; a refused subscription is forgotten."""
        if not ack.event.wait(max(remaining, 0.0)):
            raise SubscribeTimeout(sub.filter.path, timeout)
        if not ack.ok:
            with self._lock:
                if self._by_filter.get(sub.filter.path) is sub:
                    del self._by_filter[sub.filter.path]
            raise SubscribeError(sub.filter.path, "refused by the broker")

    def in_handler(self) -> bool:
        """True on the thread that is running a handler, inside it."""
        return bool(getattr(self._handling, "active", False))

    def deliver(
        self, message: Message, handlers: list[Handler], failed: Callable[[], None]
    ) -> None:
        """Call each handler; one that raises is logged and `failed` is called for it."""
        self._handling.active = True
        try:
            for handler in handlers:
                try:
                    handler(message)
                except Exception:
                    failed()
                    log.exception("%s: handler for %s failed", self._client_id, message.topic)
        finally:
            self._handling.active = False

    def on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        props: object,
    ) -> None:
        """paho's SUBACK callback (paho's thread)."""
        ok = not any(r.is_failure for r in reasons)
        if not self._acks.ack(mid, ok) and not ok:
            log.warning("%s: the broker refused a subscription (packet %d)", self._client_id, mid)
