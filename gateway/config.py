"""A gateway's settings and its errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker.errors import TransportError
from broker.tls import TlsServer
from broker.transport import TlsClient, parse_url
from tern.fleet import Fleet
from tern.logins import Login
from tern.topics import validate_id

__all__ = ["DEFAULT_LISTEN_PORT", "DEFAULT_MARGIN", "GatewayConfig", "GatewayError"]

DEFAULT_MARGIN = 0.5  # seconds per level of the tree below a gateway (docs/rounds.md)
DEFAULT_LISTEN_PORT = 1884


class GatewayError(Exception):
    """Base of the gateway's errors."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Where a gateway connects and serves.

    `downstream_url` None: serve devices on an embedded broker on
    `listen_host`:`listen_port` (port 0 picks a free one); otherwise use that
    external broker. `login`: its fleet login (``<id>.login`` beside its key), on both
    brokers. `state_dir`: where its high-water marks survive restarts (None: memory).

    TLS: `upstream_tls` for an ``mqtts://`` upstream (required then, refused otherwise);
    `listen_tls` makes its own broker serve TLS, and `ws_port` adds MQTT over WebSockets
    to it (broker.embedded); `downstream_tls` is what its own client uses on the
    downstream broker: required when that one speaks TLS (an ``mqtts://``
    `downstream_url`, or `listen_tls`), refused otherwise.

    Big messages (broker.chunking): `max_message_bytes` sends a message whose MQTT packet
    exceeds it in chunks, on both links (None: every message whole); `max_packet_bytes`
    caps the packets its own broker takes (None: as large as the fleet's largest model).
    """

    id: str
    upstream_url: str
    downstream_url: str | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = DEFAULT_LISTEN_PORT
    margin: float = DEFAULT_MARGIN
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    boards_file: str | None = None  # the microcontroller boards it serves (gateway.boards)
    mcu_in_exp: int = 5  # input exponent of the boards' models (tern.mcu.DEFAULT_IN_EXP)
    login: Login | None = None
    state_dir: Path | None = None
    upstream_tls: TlsClient | None = None
    downstream_tls: TlsClient | None = None
    listen_tls: TlsServer | None = None
    ws_port: int | None = None
    max_message_bytes: int | None = None
    max_packet_bytes: int | None = None

    def __post_init__(self) -> None:
        validate_id(self.id, "gateway")
        try:
            upstream_secure = parse_url(self.upstream_url).tls
            own = self.downstream_url is None
            down_secure = (
                self.listen_tls is not None
                if self.downstream_url is None
                else parse_url(self.downstream_url).tls
            )
        except TransportError as exc:
            raise GatewayError(str(exc)) from exc
        _check_tls("upstream", self.upstream_url, upstream_secure, self.upstream_tls)
        _check_tls("downstream", self.downstream_url or "(its own broker)", down_secure,
                   self.downstream_tls)  # fmt: skip
        if not own and (self.listen_tls is not None or self.ws_port is not None):
            raise GatewayError("TLS and WebSockets listeners are its own broker's, not an"
                               " external downstream broker's")  # fmt: skip
        if not own and self.max_packet_bytes is not None:
            raise GatewayError("max_packet_bytes is its own broker's, not an external one's")
        for name in ("max_message_bytes", "max_packet_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value >= 1024):
                raise GatewayError(f"{name} must be at least 1024 bytes")
        if self.margin < 0:
            raise GatewayError("margin must be non-negative")
        if not -128 <= self.mcu_in_exp <= 127:
            raise GatewayError("mcu_in_exp must fit a signed byte (-128..127)")

    def check(self, fleet: Fleet) -> None:
        if self.id not in fleet.gateways:
            raise GatewayError(f"gateway {self.id!r} is not in fleet {fleet.fleet!r}")


def _check_tls(link: str, url: str, secure: bool, tls: TlsClient | None) -> None:
    if secure and tls is None:
        raise GatewayError(f"{link} {url} speaks TLS: the gateway needs the fleet CA (--ca-file)")
    if tls is not None and not secure:
        raise GatewayError(f"{link} {url} is plaintext, and TLS settings were given for it")
