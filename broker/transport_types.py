"""The publish/subscribe interface every component talks through, and the values it carries.

Components depend on `Transport` (a Protocol) and receive `Message` values; neither knows
paho. `broker.transport` re-exports all of these next to its paho client, `MqttTransport`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from broker.errors import TransportError
from tern.topics import Topic

__all__ = ["Counters", "Handler", "Message", "TlsClient", "Transport", "TransportStats"]


@dataclass(frozen=True, slots=True)
class Message:
    """One delivered message; `retain` is set when it is a broker's retained copy."""

    topic: str
    payload: bytes
    retain: bool


Handler = Callable[[Message], None]


@dataclass(frozen=True, slots=True)
class TlsClient:
    """How a client speaks TLS to an ``mqtts://`` broker: the CA that signed the broker's
    certificate (the fleet CA, ``ca.crt``), and its own certificate and key for brokers
    that ask for one (mTLS), both or neither. The broker's host name is always checked
    against its certificate. `broker.tls.client_context` makes the ssl context."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TransportError(
                "a client certificate needs its key file, and a key its certificate"
            )


class Transport(Protocol):
    """What components need from MQTT. Implemented by MqttTransport; tests may fake it."""

    @property
    def connected(self) -> bool: ...

    @property
    def stats(self) -> TransportStats:
        """Counters since it was made; `reconnects` tells a loop its link came back."""
        ...

    def connect(self, timeout: float | None = 10.0) -> object: ...

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

    def unsubscribe(self, filter: Topic) -> None:
        """Stop delivering `filter`'s messages (and stop subscribing after reconnects)."""
        ...

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


class Counters:
    """The running counts behind `TransportStats`, under the owner's lock."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._counts = dict.fromkeys(TransportStats.__dataclass_fields__, 0)

    def add(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                self._counts[name] += value

    def snapshot(self) -> TransportStats:
        with self._lock:
            return TransportStats(**self._counts)
