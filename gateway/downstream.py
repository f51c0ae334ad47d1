"""A gateway's own broker: the embedded broker its devices, child gateways and boards use,
with the fleet's logins and rights (broker.fleet_access) and safe limits.

The policy follows the boards file: a reload swaps it while the broker runs (clients
already connected stay connected). Everything the broker refuses is counted in
`refused` and reaches the gateway's metrics as ``access_<reason>``. With `listen_tls` it
serves TLS, with `ws_port` MQTT over WebSockets too, under the same rights and limits.
`tls_settings` reads the gateway's TLS flags (broker.tls) into GatewayConfig's fields.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from broker.access import AccessControl
from broker.acl import AccessPolicy
from broker.embedded import EmbeddedBroker
from broker.errors import BrokerError
from broker.limits import fleet_limits, sized_for_packets
from broker.tls import client_tls_from_args, server_tls_from_args
from broker.urls import format_url
from gateway.access import gateway_policy
from gateway.boards import Boards, BoardsError, load_boards
from gateway.config import GatewayConfig, GatewayError
from tern.fleet import Fleet

__all__ = ["OwnBroker", "read_boards", "tls_settings"]


def read_boards(path: str, fleet: Fleet, gateway: str) -> Boards:
    """The boards file of `gateway` in `fleet`; BoardsError if it lists another's boards."""
    boards = load_boards(path)
    if (boards.fleet, boards.gateway) != (fleet.fleet, gateway):
        raise BoardsError(
            f"lists boards of gateway {boards.gateway!r} in fleet {boards.fleet!r}, "
            f"not {gateway!r} in {fleet.fleet!r}",
            path,
        )
    return boards


class OwnBroker:
    """The embedded broker of gateway `config.id`, on `config.listen_host`:`listen_port`."""

    def __init__(self, config: GatewayConfig, fleet: Fleet, boards: Boards | None) -> None:
        self.id, self.fleet = config.id, fleet
        self._access = AccessControl(self._policy(boards))
        # Packets as large as the fleet's largest model; the gateway's own client (which
        # relays every board's model at once) and its child gateways are not rate-limited.
        limits = fleet_limits(fleet, config.id)
        if config.max_packet_bytes is not None:  # a broker with a message limit (chunks)
            limits = sized_for_packets(limits, config.max_packet_bytes)
        self._broker = EmbeddedBroker(
            config.listen_host,
            config.listen_port,
            access=self._access,
            limits=limits,
            tls=config.listen_tls,
            ws_port=config.ws_port,
        )

    def start(self, timeout: float) -> OwnBroker:
        self._broker.start(timeout)
        return self

    def stop(self, timeout: float) -> None:
        self._broker.stop(timeout)

    @property
    def url(self) -> str:
        return self._broker.url

    @property
    def ws_url(self) -> str | None:
        """Browsers' URL of its WebSockets listener; None without one."""
        return None if self._broker.config["listeners"].get("ws") is None else self._broker.ws_url

    @property
    def refused(self) -> Counter[str]:
        """Everything the broker has refused, by reason (its access policy and its limits)."""
        return self._broker.refused

    def set_boards(self, boards: Boards) -> None:
        """Apply the rights of `boards` from the next connection on."""
        self._access.set_policy(self._policy(boards))

    def _policy(self, boards: Boards | None) -> AccessPolicy:
        try:
            return gateway_policy(self.fleet, self.id, boards)
        except BrokerError as exc:
            raise GatewayError(f"gateway {self.id}: {exc}") from exc


def tls_settings(args: argparse.Namespace) -> dict[str, Any]:
    """GatewayConfig's TLS fields from the flags of `tern gateway` (broker.tls's client and
    server flags, --upstream, --listen or --downstream): GatewayError for a missing file
    or flags that do not go together."""
    try:
        if args.downstream is not None:
            if args.tls or args.ws_port is not None:
                raise GatewayError("--tls and --ws-port are for its own broker (--listen)")
            down_url = args.downstream
            listen_tls = None
        else:
            listen_tls = server_tls_from_args(args, args.id, args.fleet_file)
            host, port = args.listen
            down_url = format_url(host, port, tls=listen_tls is not None)
        return {
            "upstream_tls": client_tls_from_args(args, args.upstream, args.id),
            "downstream_tls": client_tls_from_args(args, down_url, args.id),
            "listen_tls": listen_tls,
            "ws_port": args.ws_port,
        }
    except BrokerError as exc:
        raise GatewayError(str(exc)) from exc
