"""`tern broker` / `python -m broker`: the embedded broker until SIGINT or SIGTERM.

Without `--fleet-file` it is an open broker (anonymous, every topic) with the default
limits; with it, the coordinator's broker of that fleet: members log in with their
logins, strangers are refused, everyone has the rights of topics.md, and the largest
packet follows the fleet's largest model.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.errors import BrokerError, BrokerStopError
from broker.fleet_access import broker_policy
from broker.lifecycle import configure_logging, stop_on_signals
from broker.limits import BrokerLimits, fleet_limits
from tern.errors import TernError
from tern.fleet import COORDINATOR, Fleet

__all__ = ["add_arguments", "limits_from_args", "main", "run"]

log = logging.getLogger("broker")

_DEFAULTS = BrokerLimits()
# flag -> (BrokerLimits field, type, help); the defaults come from BrokerLimits
_LIMIT_FLAGS: dict[str, tuple[str, type, str]] = {
    "--max-packet-bytes": ("max_packet_bytes", int, "largest packet, header included"),
    "--max-connections": ("max_connections", int, "open connections; beyond, closed at once"),
    "--connect-timeout": ("connect_timeout", float, "seconds a connection has to send CONNECT"),
    "--max-retained": ("max_retained", int, "retained messages"),
    "--max-retained-bytes": ("max_retained_bytes", int, "bytes of retained messages and topics"),
    "--max-inflight": ("max_inflight", int, "unacknowledged QoS 1/2 messages to one client"),
    "--max-queued": ("max_queued", int, "messages waiting for one client, in flight included"),
    "--max-queued-bytes": ("max_queued_bytes", int, "bytes waiting for one client"),
    "--publish-rate": ("publish_rate", float, "messages a second one client may publish"),
    "--publish-burst": ("publish_burst", int, "messages one client may publish at once"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="port; 0 picks a free one (1883)")
    parser.add_argument("--config", help="amqtt config (YAML or JSON) merged over the defaults")
    parser.add_argument(
        "--fleet-file",
        metavar="FILE",
        help="serve as the coordinator's broker of this fleet: its logins and rights, and"
        " --max-packet-bytes from its largest model unless given",
    )
    limits = parser.add_argument_group("limits (defaults: safe for a gateway's Pi)")
    for flag, (name, kind, text) in _LIMIT_FLAGS.items():
        default = getattr(_DEFAULTS, name)
        limits.add_argument(
            flag,
            type=kind,
            dest=name,
            metavar="BYTES" if flag.endswith("bytes") else "S" if flag.endswith("timeout") else "N",
            help=f"{text} ({default:g})" if kind is float else f"{text} ({default})",
        )
    limits.add_argument(
        "--unlimited-user",
        action="append",
        default=[],
        dest="unlimited_users",
        metavar="USER",
        help="a login exempt from the publish rate (repeatable)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log amqtt's own messages")


def limits_from_args(args: argparse.Namespace, fleet: Fleet | None = None) -> BrokerLimits:
    """The limits the flags ask for, over the defaults, or over `fleet`'s limits for its
    coordinator's broker (`broker.limits.fleet_limits`: packets as large as its models,
    no publish rate for the coordinator and its gateways)."""
    base = BrokerLimits(unlimited_users=frozenset(args.unlimited_users))
    if fleet is not None:
        base = fleet_limits(fleet, COORDINATOR, base)
    given = {
        f.name: getattr(args, f.name)
        for f in fields(BrokerLimits)
        if f.name != "unlimited_users" and getattr(args, f.name, None) is not None
    }
    return replace(base, **given)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, then shut down cleanly (exit status 0)."""
    configure_logging(args.verbose)
    with stop_on_signals(log) as stop:
        try:
            fleet = _read_fleet(args.fleet_file)
            access = None if fleet is None else AccessControl(broker_policy(fleet, COORDINATOR))
            limits = limits_from_args(args, fleet)
            embedded = EmbeddedBroker(
                args.host, args.port, config=args.config, access=access, limits=limits
            ).start()
        except (BrokerError, TernError, OSError) as exc:
            log.error("%s", exc)
            return 1
        # Wake up now and then to notice a broker thread that died on its own.
        while not stop.wait(0.5):
            if not embedded.running:
                log.error("the broker stopped unexpectedly")
                return 1
    try:
        embedded.stop()
    except BrokerStopError as exc:
        log.error("%s", exc)
        return 1
    refused = embedded.refused
    if refused:
        log.info("refused: %s", ", ".join(f"{k} {v}" for k, v in sorted(refused.items())))
    return 0


def _read_fleet(fleet_file: str | None) -> Fleet | None:
    if fleet_file is None:
        return None
    fleet = Fleet.from_json(Path(fleet_file).read_text(encoding="utf-8"))
    log.info("fleet %s: serving as its coordinator's broker", fleet.fleet)
    return fleet


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker", description="Run tern's embedded MQTT broker (amqtt)."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
