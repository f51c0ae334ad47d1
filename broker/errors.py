"""The MQTT layer's errors: one base, a subclass per way the broker or a connection fails.

Third-party errors (amqtt, paho, the socket layer) are wrapped at this boundary with
``raise ... from exc``, so components catch `BrokerError` and nothing else.
"""

from __future__ import annotations

__all__ = [
    "BrokerConfigError",
    "BrokerError",
    "BrokerStartError",
    "BrokerStopError",
    "ConnectRefused",
    "ConnectTimeout",
    "PublishError",
    "PublishTimeout",
    "SubscribeError",
    "SubscribeTimeout",
    "TransportError",
]


class BrokerError(Exception):
    """Base of every error raised by `broker` (the embedded broker and the transport)."""


class BrokerConfigError(BrokerError):
    """The broker configuration (file or mapping) cannot be read or is not valid."""

    def __init__(self, message: str, source: str = "") -> None:
        super().__init__(f"{source}: {message}" if source else message)
        self.source = source


class BrokerStartError(BrokerError):
    """The embedded broker did not come up (port in use, bad config, deadline passed)."""

    def __init__(self, message: str, host: str, port: int) -> None:
        super().__init__(f"broker on {host}:{port}: {message}")
        self.host = host
        self.port = port


class BrokerStopError(BrokerError):
    """The embedded broker did not shut down within its deadline."""


class TransportError(BrokerError):
    """A client connection to a broker failed."""


class ConnectTimeout(TransportError):
    """No CONNACK (or no SUBACK for a remembered subscription) before the deadline;
    `reason`: why the last attempt failed, when known (a TLS failure, a refused socket)."""

    def __init__(self, url: str, timeout: float, reason: str | None = None) -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(f"no connection to {url} within {timeout:g} s{why}")
        self.url = url
        self.timeout = timeout
        self.reason = reason


class ConnectRefused(TransportError):
    """The broker answered the CONNECT with a refusal (bad credentials, not authorised...)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url} refused the connection: {reason}")
        self.url = url
        self.reason = reason


class PublishError(TransportError):
    """A message could not be handed to the client (not a concrete topic, queue full)."""

    def __init__(self, topic: str, message: str) -> None:
        super().__init__(f"publish to {topic}: {message}")
        self.topic = topic


class PublishTimeout(PublishError):
    """A QoS >= 1 message was not acknowledged (PUBACK) before the deadline."""

    def __init__(self, topic: str, timeout: float) -> None:
        super().__init__(topic, f"no acknowledgement within {timeout:g} s")
        self.timeout = timeout


class SubscribeError(TransportError):
    """The broker refused a subscription (SUBACK failure code, e.g. an ACL denial)."""

    def __init__(self, filter: str, message: str) -> None:
        super().__init__(f"subscribe to {filter}: {message}")
        self.filter = filter


class SubscribeTimeout(SubscribeError):
    """A subscription was not acknowledged (SUBACK) before the deadline."""

    def __init__(self, filter: str, timeout: float) -> None:
        super().__init__(filter, f"no acknowledgement within {timeout:g} s")
        self.timeout = timeout
