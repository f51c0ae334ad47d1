"""Broker URLs: ``mqtt://host[:port]`` (plain) and ``mqtts://host[:port]`` (TLS), the one way
components name a broker; ``ws://`` / ``wss://`` URLs name a broker's WebSockets listener
for browsers."""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

from broker.errors import TransportError

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TLS_PORT",
    "WS_PATH",
    "BrokerUrl",
    "format_url",
    "format_ws_url",
    "parse_url",
]

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
WS_PATH = "/mqtt"  # where MQTT.js and paho look for MQTT over WebSockets

_SCHEMES = {"mqtt": False, "mqtts": True}


class BrokerUrl(NamedTuple):
    """A broker's address, and whether it speaks TLS (``mqtts://``)."""

    host: str
    port: int
    tls: bool


def parse_url(url: str) -> BrokerUrl:
    """``mqtt[s]://host[:port]`` -> BrokerUrl; TransportError when it is not one."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise TransportError(f"{url!r} is not a broker URL: {exc}") from exc
    tls = _SCHEMES.get(parts.scheme)
    if tls is None or not host or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise TransportError(f"{url!r} is not a broker URL (mqtt://host:port or mqtts://host:port)")
    if port is None:
        port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    return BrokerUrl(host, port, tls)


def _client_host(host: str) -> str:
    """The address a client uses to reach a listener on `host` (loopback for a wildcard)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def format_url(host: str, port: int, tls: bool = False) -> str:
    """The URL a client uses to reach a listener on `host` (loopback for a wildcard):
    ``mqtts://`` when the listener speaks TLS."""
    return f"{'mqtts' if tls else 'mqtt'}://{_client_host(host)}:{port}"


def format_ws_url(host: str, port: int, tls: bool = False) -> str:
    """The URL a browser (MQTT.js) uses to reach a WebSockets listener on `host`:
    ``ws://host:port/mqtt``, ``wss://`` when it speaks TLS."""
    return f"{'wss' if tls else 'ws'}://{_client_host(host)}:{port}{WS_PATH}"
