"""The publish/subscribe interface every component talks through, and its paho-mqtt client.

Components depend on `Transport` (a Protocol) and receive `Message` values; only this
module knows paho. Topics are `tern.topics.Topic` values, never hand-built strings.

`MqttTransport` speaks MQTT 3.1.1 with a clean session. paho's network loop runs in
paho's own thread (`loop_start`), and so do message handlers: a handler should be
quick and hand heavy work to another thread. Subscriptions are remembered and sent
again after every reconnect, so a broker restart costs a gap, not the subscription.
Reconnects back off exponentially with jitter drawn from an explicit Generator, so a
fleet does not come back to a restarted broker in one instant.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from broker.acks import Ack, Acks
from broker.errors import (
    ConnectRefused,
    ConnectTimeout,
    PublishError,
    PublishTimeout,
    SubscribeError,
    SubscribeTimeout,
    TransportError,
)
from broker.urls import DEFAULT_PORT, format_url, parse_url
from tern.topics import Topic

__all__ = [
    "DEFAULT_PORT",
    "Handler",
    "Message",
    "MqttTransport",
    "Transport",
    "TransportStats",
    "backoff_delay",
    "format_url",
    "parse_url",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    """One delivered message; `retain` is set when it is a broker's retained copy."""

    topic: str
    payload: bytes
    retain: bool


Handler = Callable[[Message], None]


class Transport(Protocol):
    """What components need from MQTT. Implemented by MqttTransport; tests may fake it."""

    @property
    def connected(self) -> bool: ...

    def publish(
        self,
        topic: Topic,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> None: ...

    def subscribe(
        self, filter: Topic, handler: Handler, *, qos: int = 1, timeout: float = 10.0
    ) -> None: ...

    def close(self, timeout: float = 5.0) -> None: ...


@dataclass(frozen=True, slots=True)
class TransportStats:
    """Counters since the transport was made (payload bytes, not MQTT framing)."""

    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    dropped_out: int = 0  # QoS 0 messages published while disconnected
    handler_errors: int = 0
    reconnects: int = 0


def backoff_delay(attempt: int, minimum: float, maximum: float, rng: np.random.Generator) -> float:
    """Seconds before reconnect `attempt` (0 first): the capped exponential, jittered.

    Half the delay is kept and half drawn uniformly, so every client still backs off
    while a fleet that lost its broker together spreads out over the window.
    """
    ceiling = min(maximum, minimum * 2.0 ** min(attempt, 64))
    return float(ceiling * rng.uniform(0.5, 1.0))


@dataclass(frozen=True, slots=True)
class _Subscription:
    filter: Topic
    handler: Handler
    qos: int


class MqttTransport:
    """A paho-mqtt client behind the Transport interface. One connect() per instance.

    `will` is (topic, payload), published by the broker (QoS 1, retained) if this
    client vanishes without a clean close(): the offline `tern.reports.Status`.
    `login` is (user, password), for a broker that wants them (see broker.access).
    `rng` draws the reconnect jitter; the default is freshly seeded so that devices
    do not share a sequence.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        will: tuple[Topic, bytes] | None = None,
        login: tuple[str, str] | None = None,
        keepalive: int = 30,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        rng: np.random.Generator | None = None,
    ) -> None:
        if not 0 < backoff_min <= backoff_max:
            raise TransportError("backoff needs 0 < backoff_min <= backoff_max")
        self.url = url
        self.host, self.port = parse_url(url)
        self.client_id = client_id
        self.keepalive = keepalive
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self._rng = rng if rng is not None else np.random.default_rng()
        self._lock = threading.RLock()  # subscriptions, connection state, counters
        self._subscriptions: dict[str, _Subscription] = {}
        self._connected = False
        self._counts = dict.fromkeys(TransportStats.__dataclass_fields__, 0)
        self._acks = Acks()
        self._resubscribed: list[tuple[_Subscription, Ack]] = []
        self._connack = threading.Event()
        self._disconnected = threading.Event()
        self._closing = threading.Event()
        self._refusal: str | None = None
        self._attempt = 0  # reconnect attempts since the last CONNACK; paho's thread only
        self._started = False
        self._handling = threading.local()

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        # paho's own backoff has no jitter: zero it and sleep in the callbacks instead,
        # which run on paho's thread right before it would wait and reconnect.
        client.reconnect_delay_set(0, 0)
        if will is not None:
            topic, payload = will
            _require_concrete(topic)
            client.will_set(topic.path, payload, qos=1, retain=True)
        if login is not None:
            client.username_pw_set(*login)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = _no_delay
        self._client = client

    # -- public interface ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    @property
    def handler_errors(self) -> int:
        return self.stats.handler_errors

    @property
    def stats(self) -> TransportStats:
        with self._lock:
            return TransportStats(**self._counts)

    def connect(self, timeout: float = 10.0) -> MqttTransport:
        """Connect; return after the CONNACK and the SUBACKs of earlier subscribe() calls.

        While the broker is unreachable it keeps trying (with backoff) until `timeout`.
        """
        if self._started:
            raise TransportError("connect() is called once per MqttTransport")
        self._started = True
        deadline = time.monotonic() + timeout
        try:
            self._client.connect_async(self.host, self.port, self.keepalive)
        except ValueError as exc:
            raise TransportError(f"cannot connect to {self.url}: {exc}") from exc
        self._client.loop_start()
        try:
            if not self._connack.wait(timeout):
                raise ConnectTimeout(self.url, timeout)
            if self._refusal is not None:
                raise ConnectRefused(self.url, self._refusal)
            with self._lock:
                pending = list(self._resubscribed)
            for sub, ack in pending:
                self._await_suback(sub, ack, deadline - time.monotonic(), timeout)
        except TransportError:
            self.close()
            raise
        log.info("%s connected to %s", self.client_id, self.url)
        return self

    def publish(
        self,
        topic: Topic,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """Hand a message to the client; with `wait` (QoS >= 1) return after its PUBACK.

        QoS >= 1 messages published while disconnected are queued and sent on
        reconnect; QoS 0 ones are dropped (counted in `stats.dropped_out`).
        """
        _require_concrete(topic)
        waiting = wait and qos > 0
        if waiting and self._in_handler():
            raise PublishError(topic.path, "a handler cannot wait for an acknowledgement")
        if waiting:
            self._acks.begin()
        try:
            info = self._client.publish(topic.path, payload, qos=qos, retain=retain)
        except (ValueError, TypeError) as exc:
            if waiting:
                self._acks.cancel()
            raise PublishError(topic.path, str(exc)) from exc
        ack = self._acks.register(info.mid) if waiting else None
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            self._count(dropped_out=1)
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._acks.forget(info.mid)
            raise PublishError(topic.path, mqtt.error_string(info.rc))
        self._count(messages_out=1, bytes_out=len(payload))
        if ack is not None and not ack.event.wait(timeout):
            self._acks.forget(info.mid)
            raise PublishTimeout(topic.path, timeout)

    def subscribe(
        self, filter: Topic, handler: Handler, *, qos: int = 1, timeout: float = 10.0
    ) -> None:
        """Call `handler` for every message under `filter`, from now and after reconnects.

        When connected, return after the broker's SUBACK (SubscribeTimeout/-Error
        otherwise); when not, the subscription is sent on (re)connect. Subscribing to
        the same filter again replaces its handler.
        """
        sub = _Subscription(filter, handler, qos)
        with self._lock:
            self._subscriptions[filter.path] = sub
            ack = self._send_subscribe(sub) if self._connected else None
        if ack is not None and not self._in_handler():
            self._await_suback(sub, ack, timeout, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker does not publish the will) and stop the loop."""
        if self._closing.is_set():
            return
        self._closing.set()  # also wakes a backoff sleep on paho's thread
        if not self._started:
            return
        was_connected = self.connected
        self._client.disconnect()
        if self._in_handler():
            self._client.loop_stop()  # from paho's own thread it does not join
            return
        if was_connected and not self._disconnected.wait(timeout):
            log.warning("%s: no clean disconnect within %g s", self.client_id, timeout)
        # loop_stop() joins paho's thread with no deadline; bound it from the outside.
        stopper = threading.Thread(target=self._client.loop_stop, daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            log.warning("%s: paho's thread did not stop within %g s", self.client_id, timeout)
        elif self._client.socket() is not None:
            # The loop stopped in the middle of a reconnect: say goodbye on the open
            # socket ourselves, or the broker would publish the will when it drops.
            self._client.disconnect()
            self._client.loop_write()

    def __enter__(self) -> MqttTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                self._counts[name] += value

    def _in_handler(self) -> bool:
        return bool(getattr(self._handling, "active", False))

    def _send_subscribe(self, sub: _Subscription) -> Ack | None:
        """Send one SUBSCRIBE (caller holds the lock); None when the connection is gone."""
        self._acks.begin()
        rc, mid = self._client.subscribe(sub.filter.path, sub.qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            self._acks.cancel()
            return None  # the connection dropped under us: on_connect sends it again
        return self._acks.register(mid)

    def _await_suback(self, sub: _Subscription, ack: Ack, remaining: float, timeout: float) -> None:
        if not ack.event.wait(max(remaining, 0.0)):
            raise SubscribeTimeout(sub.filter.path, timeout)
        if not ack.ok:
            with self._lock:
                if self._subscriptions.get(sub.filter.path) is sub:
                    del self._subscriptions[sub.filter.path]
            raise SubscribeError(sub.filter.path, "refused by the broker")

    def _back_off(self) -> None:
        """Sleep before paho's next reconnect (paho's thread), or end its loop if closing."""
        if not self._closing.is_set():
            delay = backoff_delay(self._attempt, self.backoff_min, self.backoff_max, self._rng)
            self._attempt += 1
            log.debug("%s: reconnect attempt %d in %.2f s", self.client_id, self._attempt, delay)
            self._closing.wait(delay)
        if self._closing.is_set():
            # From paho's own thread loop_stop() only flags the loop to end: without it
            # paho would reconnect at once, before close() gets to stop it.
            self._client.loop_stop()

    # -- paho callbacks (paho's thread) -------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        props: object,
    ) -> None:
        if reason.is_failure:
            self._refusal = str(reason)
            log.warning("%s: %s refused the connection: %s", self.client_id, self.url, reason)
            self._connack.set()
            return
        with self._lock:
            if self._connack.is_set():
                self._counts["reconnects"] += 1
                log.info("%s reconnected to %s", self.client_id, self.url)
            self._connected = True
            self._attempt = 0
            self._disconnected.clear()
            resent = [(sub, self._send_subscribe(sub)) for sub in self._subscriptions.values()]
            self._resubscribed = [(sub, ack) for sub, ack in resent if ack is not None]
        self._connack.set()
        if self._closing.is_set():  # close() ran while we were reconnecting
            client.disconnect()

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._back_off()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        props: object,
    ) -> None:
        with self._lock:
            was_connected, self._connected = self._connected, False
        self._disconnected.set()
        if was_connected and not self._closing.is_set():
            log.warning("%s lost %s (%s); reconnecting", self.client_id, self.url, reason)
        self._back_off()

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object
    ) -> None:
        self._acks.ack(mid, ok=True)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        props: object,
    ) -> None:
        ok = not any(r.is_failure for r in reasons)
        if not self._acks.ack(mid, ok) and not ok:
            log.warning("%s: the broker refused a subscription (packet %d)", self.client_id, mid)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            message = Message(msg.topic, bytes(msg.payload), bool(msg.retain))
        except UnicodeDecodeError:
            log.warning("%s: dropped a message whose topic is not UTF-8", self.client_id)
            return
        with self._lock:
            self._counts["messages_in"] += 1
            self._counts["bytes_in"] += len(message.payload)
            handlers = [
                s.handler for s in self._subscriptions.values() if s.filter.matches(message.topic)
            ]
        self._handling.active = True
        try:
            for handler in handlers:
                try:
                    handler(message)
                except Exception:
                    self._count(handler_errors=1)
                    log.exception("%s: handler for %s failed", self.client_id, message.topic)
        finally:
            self._handling.active = False


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Send small MQTT packets at once: with Nagle's algorithm each waited ~40 ms per hop
    (bench/round.py: a 10-device round went from ~0.10 s to ~0.02 s on amqtt)."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _require_concrete(topic: Topic) -> None:
    if topic.is_filter:
        raise PublishError(topic.path, "a subscription filter is not a topic to publish to")
