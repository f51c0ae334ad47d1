"""An in-memory MQTT bus: the transport interface with no broker, no sockets, no sleeps.

`MemoryBus` holds retained messages and subscriptions (``+``/``#`` filters, as MQTT
matches them) and queues every delivery; `MemoryTransport` is one client of it and
implements `broker.transport.Transport`. Nothing is delivered until someone calls
`deliver()`, so a test (or the in-memory fleet, tern's fast simulation) decides exactly
when messages move, and the same inputs give the same run. `restart()` models a broker
restart: retained messages and subscriptions are lost, clients reconnect with their
subscriptions (in `reconnect_order`), and messages in flight are dropped.

Not a broker for production (no QoS, no sessions, no access control): the fleet's
brokers are amqtt and Mosquitto.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from broker.acl import matches
from broker.errors import TransportError
from broker.transport import Handler, Message, TransportStats
from tern.topics import Topic

__all__ = ["MemoryBus", "MemoryTransport"]


@dataclass(frozen=True, slots=True)
class _Delivery:
    handler: Handler
    message: Message
    client: str


class MemoryBus:
    """One in-memory broker. Not thread-safe: drive it from one thread."""

    def __init__(self) -> None:
        self._clients: dict[str, MemoryTransport] = {}
        self._retained: dict[str, bytes] = {}
        self._queue: deque[_Delivery] = deque()
        self.published = 0
        self.bytes = 0
        self.down = False  # a restarted broker is down until `up()`

    def transport(self, client_id: str) -> MemoryTransport:
        """A new client (not yet connected)."""
        return MemoryTransport(self, client_id)

    # -- what clients call -----------------------------------------------------------------

    def _attach(self, client: MemoryTransport) -> None:
        old = self._clients.get(client.client_id)
        if old is not None and old is not client:
            old._drop()  # MQTT: a second connection with the same id takes over
        self._clients[client.client_id] = client

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.published += 1
        self.bytes += len(payload)
        if retain:
            if payload:
                self._retained[topic] = payload
            else:
                self._retained.pop(topic, None)
        for client in self._clients.values():
            for flt, handler in client._subs.items():
                if matches(flt, topic):
                    self._queue.append(
                        _Delivery(handler, Message(topic, payload, False), client.client_id)
                    )

    def _retained_for(self, client: MemoryTransport, flt: str, handler: Handler) -> None:
        for topic, payload in self._retained.items():
            if matches(flt, topic):
                self._queue.append(
                    _Delivery(handler, Message(topic, payload, True), client.client_id)
                )

    # -- what the driver calls ---------------------------------------------------------

    def deliver(
        self, limit: int | None = None, *, hold: Callable[[Message], bool] | None = None
    ) -> int:
        """Hand queued messages to their handlers (and those they publish, in turn), up to
        `limit`; the number delivered. Messages `hold` picks stay queued (in flight), so a
        test can lose them with `restart()`."""
        n = 0
        held: deque[_Delivery] = deque()
        while self._queue and (limit is None or n < limit):
            d = self._queue.popleft()
            if hold is not None and hold(d.message):
                held.append(d)
                continue
            client = self._clients.get(d.client)
            if client is None or not client.connected:
                continue
            client._count(d.message)
            d.handler(d.message)
            n += 1
        self._queue.extendleft(reversed(held))
        return n

    @property
    def pending(self) -> int:
        return len(self._queue)

    def restart(self) -> None:
        """The broker goes down: retained messages, sessions and queued deliveries are
        lost and every client is disconnected until `up()`."""
        self.down = True
        self._retained.clear()
        self._queue.clear()
        for client in self._clients.values():
            client._connected = False

    def up(self, reconnect_order: Callable[[list[str]], list[str]] = sorted) -> None:
        """The broker is back: clients reconnect (in `reconnect_order` of their ids) and
        subscribe again; each counts a reconnect."""
        self.down = False
        for cid in reconnect_order(list(self._clients)):
            client = self._clients[cid]
            if not client._closed:
                client._reconnect()


class MemoryTransport:
    """A client of a MemoryBus; the `Transport` interface."""

    def __init__(self, bus: MemoryBus, client_id: str) -> None:
        self.bus = bus
        self.client_id = client_id
        self._subs: dict[str, Handler] = {}
        self._connected = False
        self._closed = False
        self._stats = {"messages_in": 0, "bytes_in": 0, "messages_out": 0, "bytes_out": 0,
                       "reconnects": 0}  # fmt: skip

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def stats(self) -> TransportStats:
        return TransportStats(**self._stats)

    def connect(self, timeout: float | None = 10.0) -> MemoryTransport:
        if self.bus.down:
            raise TransportError(f"{self.client_id}: the in-memory broker is down")
        self._closed = False
        self._connected = True
        self.bus._attach(self)
        for flt, handler in self._subs.items():
            self.bus._retained_for(self, flt, handler)
        return self

    def publish(
        self,
        topic: Topic | str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> None:
        if not self._connected:
            if qos == 0 or wait:
                raise TransportError(f"{self.client_id}: not connected")
            return  # lost with the connection, as QoS 1 is without a persistent session
        self._stats["messages_out"] += 1
        self._stats["bytes_out"] += len(payload)
        self.bus._publish(str(topic), bytes(payload), retain)

    def subscribe(
        self, filter: Topic | str, handler: Handler, *, qos: int = 1, timeout: float = 10.0
    ) -> None:
        flt = str(filter)
        self._subs[flt] = handler
        if self._connected:
            self.bus._retained_for(self, flt, handler)

    def unsubscribe(self, filter: Topic | str) -> None:
        self._subs.pop(str(filter), None)

    def close(self, timeout: float = 5.0) -> None:
        self._closed = True
        self._connected = False

    def _count(self, message: Message) -> None:
        self._stats["messages_in"] += 1
        self._stats["bytes_in"] += len(message.payload)

    def _drop(self) -> None:
        self._connected = False

    def _reconnect(self) -> None:
        self._connected = True
        self._stats["reconnects"] += 1
        for flt, handler in self._subs.items():
            self.bus._retained_for(self, flt, handler)
