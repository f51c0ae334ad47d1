"""The paho-mqtt client behind the `Transport` interface every component talks through.

Components depend on `Transport` (a Protocol) and receive `Message` values; only this
module and its helpers know paho. Topics are `tern.topics.Topic` values, never
hand-built strings. The interface and its values live in `broker.transport_types`,
re-exported here; the subscription table in `broker.subscriptions`, reconnect backoff in
`broker.reconnect`, and making and stopping the paho client in `broker.paho_client`.

`MqttTransport` speaks MQTT 3.1.1 with a clean session. paho's network loop runs in
paho's own thread (`loop_start`), and so do message handlers: a handler should be
quick and hand heavy work to another thread. Subscriptions are remembered and sent
again after every reconnect, so a broker restart costs a gap, not the subscription.
Reconnects back off exponentially with jitter drawn from an explicit Generator, so a
fleet does not come back to a restarted broker in one instant. A broker that is not up
yet is waited for the same way, with a log line saying so ("waiting for mqtt://...").
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from functools import partial
from types import TracebackType

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from broker.acks import Acks
from broker.errors import ConnectRefused, PublishError, PublishTimeout, TransportError
from broker.paho_client import capture_errors, new_client, require_concrete, stop_loop
from broker.reconnect import Backoff, await_connack, backoff_delay, hung_up
from broker.subscriptions import Subscription, Subscriptions
from broker.tls import connect_failure, context_for
from broker.transport_types import (
    Counters,
    Handler,
    Message,
    TlsClient,
    Transport,
    TransportStats,
)
from broker.urls import DEFAULT_PORT, BrokerUrl, format_url, parse_url
from tern.topics import Topic

__all__ = [
    "DEFAULT_PORT",
    "BrokerUrl",
    "Handler",
    "Message",
    "MqttTransport",
    "TlsClient",
    "Transport",
    "TransportStats",
    "backoff_delay",
    "format_url",
    "parse_url",
]

log = logging.getLogger(__name__)

_SUBACK_TIMEOUT = 10.0  # after the CONNACK of a connect() that waits without end


class MqttTransport:
    """A paho-mqtt client behind the Transport interface. One connect() per instance.

    `will` is (topic, payload), published by the broker (QoS 1, retained) if this
    client vanishes without a clean close(): the offline `tern.reports.Status`.
    `login` is (user, password), for a broker that wants them (see broker.access).
    `rng` draws the reconnect jitter; the default is freshly seeded so that devices
    do not share a sequence. `tls`: the CA (and client certificate) mqtts:// needs.
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
        tls: TlsClient | None = None,
    ) -> None:
        if not 0 < backoff_min <= backoff_max:
            raise TransportError("backoff needs 0 < backoff_min <= backoff_max")
        self.url = url
        self.host, self.port, secure = parse_url(url)
        self.tls, context = tls, context_for(url, secure, tls)  # TransportError: disagree
        self.client_id, self.keepalive = client_id, keepalive
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        rng = rng if rng is not None else np.random.default_rng()
        self._backoff = Backoff(client_id, url, backoff_min, backoff_max, rng)
        self._lock = threading.RLock()  # subscriptions, connection state, counters
        self._connected = False
        self._counts = Counters(self._lock)
        self._acks = Acks()
        self._connack = threading.Event()
        self._disconnected = threading.Event()
        self._closing = threading.Event()
        self._refusal: str | None = None
        self._started = False

        client = new_client(client_id, will, login, context)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        capture_errors(client, client_id, self._backoff.socket_errors)
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._client = client
        self._subscriptions = Subscriptions(client, self._acks, self._lock, client_id)
        client.on_subscribe = self._subscriptions.on_subscribe

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
        return self._counts.snapshot()

    def connect(self, timeout: float | None = 10.0) -> MqttTransport:
        """Connect; return after the CONNACK and the SUBACKs of earlier subscribe() calls.

        While the broker is unreachable it keeps trying, with jittered backoff, and logs
        that it is waiting: until `timeout` seconds have passed (ConnectTimeout), or
        without end when `timeout` is None. close() from another thread ends the wait
        (TransportError); a broker that refuses the login ends it at once (ConnectRefused).
        """
        if self._started:
            raise TransportError("connect() is called once per MqttTransport")
        if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
            raise TransportError("the connect timeout must be None or a finite number >= 0")
        if self._closing.is_set():
            raise TransportError(f"{self.client_id} was closed before it connected")
        self._started = True
        started = time.monotonic()
        try:
            self._client.connect_async(self.host, self.port, self.keepalive)
        except ValueError as exc:
            raise TransportError(f"cannot connect to {self.url}: {exc}") from exc
        self._client.loop_start()
        try:
            await_connack(self._connack, self._closing, started, timeout, self._backoff)
            if self._refusal is not None:
                raise ConnectRefused(self.url, self._refusal)
            # Once connected the broker is up: its SUBACKs get a deadline either way.
            limit = _SUBACK_TIMEOUT if timeout is None else timeout
            deadline = (time.monotonic() if timeout is None else started) + limit
            self._subscriptions.await_resent(deadline, limit)
        except BaseException:  # a KeyboardInterrupt too: never leave paho's thread running
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
        require_concrete(topic)
        waiting = wait and qos > 0
        if waiting and self._subscriptions.in_handler():
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
            self._counts.add(dropped_out=1)
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._acks.forget(info.mid)
            raise PublishError(topic.path, mqtt.error_string(info.rc))
        self._counts.add(messages_out=1, bytes_out=len(payload))
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
        sub = Subscription(filter, handler, qos)
        with self._lock:
            self._subscriptions.add(sub)
            ack = self._subscriptions.send(sub) if self._connected else None
        if ack is not None and not self._subscriptions.in_handler():
            self._subscriptions.await_ack(sub, ack, timeout, timeout)

    def unsubscribe(self, filter: Topic) -> None:
        """Forget `filter`: no more deliveries to its handler, not subscribed again after a
        reconnect; an UNSUBSCRIBE goes out now when connected (its ack is not awaited)."""
        with self._lock:
            self._subscriptions.remove(filter.path)
            if self._connected:
                self._client.unsubscribe(filter.path)

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker does not publish the will) and stop the loop."""
        if self._closing.is_set():
            return
        self._closing.set()  # also wakes a backoff sleep on paho's thread
        if not self._started:
            return
        was_connected = self.connected
        self._client.disconnect()
        if self._subscriptions.in_handler():
            self._client.loop_stop()  # from paho's own thread it does not join
            return
        if was_connected and not self._disconnected.wait(timeout):
            log.warning("%s: no clean disconnect within %g s", self.client_id, timeout)
        stop_loop(self._client, self.client_id, timeout)

    def __enter__(self) -> MqttTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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
                self._counts.add(reconnects=1)
                log.info("%s reconnected to %s", self.client_id, self.url)
            self._connected = True
            self._backoff.reset()
            self._disconnected.clear()
            self._subscriptions.send_all()
        self._connack.set()
        if self._closing.is_set():  # close() ran while we were reconnecting
            client.disconnect()

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        failure = sys.exc_info()[1]  # paho calls this in its `except OSError:` block
        if failure is not None and not self._closing.is_set():
            self._backoff.failed(connect_failure(failure))
        self._backoff.before_retry(self._client, self._closing)

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
        elif not self._closing.is_set():  # ended before its CONNACK: TLS refused, or no TLS
            self._backoff.failed(self._backoff.socket_errors.last or hung_up(self.tls))
        self._backoff.before_retry(self._client, self._closing)

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object
    ) -> None:
        self._acks.ack(mid, ok=True)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            message = Message(msg.topic, bytes(msg.payload), bool(msg.retain))
        except UnicodeDecodeError:
            log.warning("%s: dropped a message whose topic is not UTF-8", self.client_id)
            return
        with self._lock:
            self._counts.add(messages_in=1, bytes_in=len(message.payload))
            handlers = self._subscriptions.handlers(message.topic)
        self._subscriptions.deliver(message, handlers, partial(self._counts.add, handler_errors=1))
