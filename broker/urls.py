"""Broker URLs: ``mqtt://host[:port]``, the one way components name a broker."""

from __future__ import annotations

from urllib.parse import urlsplit

from broker.errors import TransportError

__all__ = ["DEFAULT_PORT", "format_url", "parse_url"]

DEFAULT_PORT = 1883


def parse_url(url: str) -> tuple[str, int]:
    """``mqtt://host[:port]`` -> (host, port); TransportError when it is not one."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise TransportError(f"{url!r} is not a broker URL: {exc}") from exc
    if parts.scheme != "mqtt" or not host or parts.path not in ("", "/"):
        raise TransportError(f"{url!r} is not a broker URL (mqtt://host:port)")
    return host, DEFAULT_PORT if port is None else port


def format_url(host: str, port: int) -> str:
    """The URL a client uses to reach a listener on `host` (loopback for a wildcard)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"mqtt://[{host}]:{port}" if ":" in host else f"mqtt://{host}:{port}"
