"""`tern broker` / `python -m broker`: the embedded broker until SIGINT or SIGTERM.

Without `--fleet-file` it is an open broker (anonymous, every topic) with the default
limits; with it, the coordinator's broker of that fleet: members log in with their
logins, strangers are refused, everyone has the rights of topics.md, and the largest
packet follows the fleet's largest model. `--tls` serves TLS with the fleet's
``coordinator.server.crt``; `--ws-port` adds MQTT over WebSockets (broker.tls).

Also what the component commands (coordinator, gateway, device) share to fail in one
line: reading the fleet file and a member's key, saying why a listener did not start,
and starting a service that may wait for its broker while SIGINT/SIGTERM still work.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path

from nacl.signing import SigningKey

from broker.access import AccessControl
from broker.errors import BrokerError, BrokerStartError, BrokerStopError
from broker.fleet_access import broker_policy
from broker.lifecycle import load_login, login_path, stop_on_signals
from broker.limits import BrokerLimits, fleet_limits
from broker.logs import add_log_arguments, setup_logging
from broker.tls import add_server_arguments, server_tls_from_args
from tern.errors import MalformedMessage, TernError, brief
from tern.fleet import COORDINATOR, MAX_FLEET_BYTES, Fleet
from tern.keys import signing_key_from_text

__all__ = [
    "add_arguments",
    "limits_from_args",
    "listen_failure",
    "load_member",
    "main",
    "quiet_third_party_tracebacks",
    "read_fleet",
    "run",
    "seconds",
    "start_unless_stopped",
]

_MAX_KEY_BYTES = 4096  # a key file is 64 hex digits and a newline

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
    add_server_arguments(parser, COORDINATOR, "TLS and WebSockets listeners")
    parser.add_argument("--verbose", "-v", action="store_true", help="log amqtt's own messages")
    add_log_arguments(parser)


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
    # imported here: devices import this module's helpers and must not need amqtt
    from broker.embedded import EmbeddedBroker

    setup_logging("broker", args.quiet, args.log_json, verbose=args.verbose)
    if not args.verbose:
        quiet_third_party_tracebacks()
    with stop_on_signals(log) as stop:
        try:
            fleet = _read_fleet(args.fleet_file)
            access = None if fleet is None else AccessControl(broker_policy(fleet, COORDINATOR))
            limits = limits_from_args(args, fleet)
            tls = server_tls_from_args(args, COORDINATOR, args.fleet_file)
            embedded = EmbeddedBroker(
                args.host,
                args.port,
                config=args.config,
                access=access,
                limits=limits,
                tls=tls,
                ws_port=args.ws_port,
            ).start()
        except (BrokerError, TernError, OSError) as exc:
            failure = listen_failure(exc)
            if failure is not None:
                log.error("cannot listen on %s:%d: %s", args.host, args.port, failure)
            else:
                log.error("%s", exc)
            return 1
        if args.ws_port is not None:
            log.info("WebSockets (browsers) on %s", embedded.ws_url)
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
    fleet = read_fleet(fleet_file)
    log.info("fleet %s: serving as its coordinator's broker", fleet.fleet)
    return fleet


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker", description="Run tern's embedded MQTT broker (amqtt)."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


# -- what the component commands share --------------------------------------------------


def _read_bounded(path: str | Path, limit: int) -> bytes:
    with Path(path).open("rb") as fh:
        return fh.read(limit + 1)


def read_fleet(path: str | Path) -> Fleet:
    """The fleet file at `path`, read with a bound whatever it holds (OSError: unreadable;
    MalformedMessage naming the file: not UTF-8, not JSON, not a fleet)."""
    try:
        return Fleet.from_json(_read_bounded(path, MAX_FLEET_BYTES))
    except TernError as exc:
        message = exc.message.removeprefix("fleet file: ").removeprefix("fleet file is ")
        raise MalformedMessage(f"fleet file {path}: {message}") from exc


def load_member(
    fleet_file: str | Path, key_file: str | Path, member: str
) -> tuple[Fleet, SigningKey]:
    """The fleet file and `member`'s secret key, refused (TernError) unless the key is the
    one the fleet file has for `member` and the login beside it (if any) is `member`'s."""
    fleet = read_fleet(fleet_file)
    data = _read_bounded(key_file, _MAX_KEY_BYTES)
    try:
        key = signing_key_from_text(data.decode("utf-8"))
    except (UnicodeDecodeError, TernError):
        raise MalformedMessage(f"{key_file} is not a key file (64 hex digits)") from None
    if bytes(key.verify_key) != bytes(fleet.key_of(member)):
        raise TernError(
            f"{key_file} is not {member}'s key: fleet file {fleet_file} has another key for"
            f" {member} (a key of another member, or of an older fleet?)"
        )
    login = load_login(key_file)
    if login is not None and login.username != member:
        raise TernError(
            f"{login_path(key_file)} is the login of {brief(login.username, 64)}, not {member}"
        )
    return fleet, key


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{brief(text)} is not a number of seconds >= 0")
    return value


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and all(cause is not seen for seen in chain):
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def listen_failure(exc: BaseException) -> str | None:
    """Why a broker did not start listening, in a few words, when `exc` is (or was caused
    by) a BrokerStartError that says so: the address is in use, not this machine's, or
    not an address at all. None for any other error."""
    chain = _causes(exc)
    starts = [i for i, e in enumerate(chain) if isinstance(e, BrokerStartError)]
    for cause in chain[starts[0] :] if starts else []:
        if isinstance(cause, socket.gaierror):
            return "not a host name or address this machine can resolve"
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            return "the address is in use (another broker, or another run of this one?)"
        if isinstance(cause, OSError) and cause.errno == errno.EADDRNOTAVAIL:
            return "not an address of this machine"
        if isinstance(cause, OSError) and cause.errno == errno.EACCES:
            return "permission denied (ports below 1024 need privileges)"
    return None


class _NoTraceback(logging.Filter):
    """Keeps amqtt's error lines without their tracebacks, and drops its "startup
    failed" line: our own one-line error says what failed, and why."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.partition(".")[0] != "amqtt":
            return True
        record.exc_info = None
        record.exc_text = None
        return record.msg != "Broker startup failed"


def quiet_third_party_tracebacks() -> None:
    """No amqtt tracebacks on the root logger's handlers (run with --verbose to see them)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NoTraceback) for f in handler.filters):
            handler.addFilter(_NoTraceback())


def start_unless_stopped(start: Callable[[], object], stop: threading.Event) -> bool:
    """Run `start` (which may wait for a broker without end) on a thread of its own, so
    the main thread keeps handling signals. True once `start` returned; False as soon as
    `stop` is set first: the caller then stops the service, which ends the wait. What
    `start` raises is raised here."""
    done = threading.Event()
    failed: list[BaseException] = []

    def target() -> None:
        try:
            start()
        except BaseException as exc:  # handed to the caller below
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=target, name="start", daemon=True).start()
    while not done.wait(0.2):
        if stop.is_set():
            return False
    if failed:
        raise failed[0]
    return True
