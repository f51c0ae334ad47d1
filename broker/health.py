"""`tern health`: a container healthcheck that asks MQTT and the kernel, not the process table.

- `--broker URL`: the broker answers an MQTT CONNECT with a CONNACK (over TLS, with the
  fleet CA, for ``mqtts://``). Without `--login` the CONNECT is anonymous, and a broker
  that refuses anonymous clients (every broker of a fleet) still answers: that refusal is
  the healthy answer. It logs in as nobody, so it never takes over a member's or the
  observer's session (a client's id is its user name), whatever the healthcheck's interval.
- `--login FILE`: the broker must accept that login; with `--fleet F --status ID`, ID's
  retained status on that broker must say ``online`` (a component publishes ``online``
  once connected and leaves ``offline`` as its last will). For a person checking from
  elsewhere: connecting with a login takes over any other session of that login.
- `--connected PORT`: this network namespace (a container's) has an established TCP
  connection to remote port PORT: the component in the container is connected to its
  broker (Linux: /proc/net/tcp and tcp6).

Exit 0 when every check given holds; 1 with one line on stderr otherwise. Every wait has
the `--timeout` deadline.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from broker.errors import ConnectRefused, TransportError
from broker.tls import CA_FILE, add_client_arguments, client_tls
from broker.transport import Message, MqttTransport
from broker.transport_types import TlsClient
from tern import topics
from tern.errors import TernError, brief
from tern.logins import MAX_LOGIN_BYTES, Login
from tern.reports import State, Status

__all__ = ["HealthError", "check", "established_to", "main"]

_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_ESTABLISHED = "01"
_MAX_TABLE_BYTES = 16 << 20  # a busy host's table; a container's holds a few lines


class HealthError(Exception):
    """The broker or the component is not healthy; the message says why."""


def check(
    url: str,
    *,
    login: Login | None,
    status_of: tuple[str, str] | None = None,
    timeout: float = 5.0,
    tls: TlsClient | None = None,
) -> str:
    """Connect to `url` with `login` (None: anonymously, and a refusal is an answer);
    with `status_of` (fleet, id), require that id's retained status to be online.
    Returns what was seen; raises HealthError."""
    seen = threading.Event()
    found: list[bytes] = []

    def on_status(message: Message) -> None:
        found.append(message.payload)
        seen.set()

    credentials = None if login is None else (login.username, login.password)
    transport = MqttTransport(url, "tern-health", login=credentials, backoff_max=1.0, tls=tls)
    if status_of is not None:
        transport.subscribe(topics.status(*status_of), on_status)
    try:
        transport.connect(timeout)
        if status_of is None:
            return f"{url} accepts {login.username if login else 'anonymous clients'}"
        if not seen.wait(timeout):
            raise HealthError(f"no status of {status_of[1]} on {url} within {timeout:g} s")
        try:
            status = Status.from_json(found[0])
        except TernError as exc:
            raise HealthError(f"status of {status_of[1]}: {exc}") from exc
        if status.state != State.ONLINE:
            raise HealthError(f"{status_of[1]} is {status.state} ({brief(status.detail, 80)})")
        return f"{status_of[1]} is online on {url}"
    except ConnectRefused as exc:
        if login is None:  # it answered CONNECT: the broker is up and speaks MQTT
            return f"{url} answers MQTT (and refuses anonymous clients)"
        raise HealthError(str(exc)) from exc
    except TransportError as exc:
        raise HealthError(str(exc)) from exc
    finally:
        transport.close(1.0)


def established_to(port: int, tables: Sequence[str] = _TCP_TABLES) -> int:
    """How many TCP connections of this network namespace to remote `port` are
    established (the kernel's tables: `rem_address` is HEXIP:HEXPORT, `st` 01)."""
    count = 0
    for table in tables:
        try:
            with open(table, "rb") as fh:
                lines = fh.read(_MAX_TABLE_BYTES).decode("ascii", "replace").splitlines()[1:]
        except FileNotFoundError:  # no IPv6 here
            continue
        except OSError as exc:
            raise HealthError(f"cannot read {table}: {exc.strerror or exc}") from exc
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != _ESTABLISHED:
                continue
            _, _, remote_port = fields[2].rpartition(":")
            try:
                count += int(remote_port, 16) == port
            except ValueError:
                continue
    return count


def _read_login(path: str) -> Login:
    try:
        with Path(path).open("rb") as fh:
            data = fh.read(MAX_LOGIN_BYTES + 1)
        return Login.from_json(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, TernError) as exc:
        raise HealthError(f"login {path}: {exc}") from exc


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port")
    return port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tern health", description=__doc__.split("\n")[0])
    p.add_argument("--broker", help="broker URL, mqtt://host:port or mqtts://host:port")
    p.add_argument(
        "--login", help="log in with this file (ID.login, observer.json); default: anonymous"
    )
    add_client_arguments(p)  # for mqtts://: ca.crt (and a client certificate) beside --login
    p.add_argument("--fleet", help="fleet id (with --status)")
    p.add_argument("--status", metavar="ID", help="with --login: ID's retained status is online")
    p.add_argument(
        "--connected",
        type=_port,
        action="append",
        default=[],
        metavar="PORT",
        help="a TCP connection to remote PORT is established here (repeatable)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per wait (default 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when healthy")
    return p


def _checks(args: argparse.Namespace) -> list[str]:
    seen = []
    for port in args.connected:
        if not established_to(port):
            raise HealthError(f"no established connection to port {port}")
        seen.append(f"connected to port {port}")
    if args.broker is not None:
        login = None if args.login is None else _read_login(args.login)
        beside = Path(args.login or args.ca_file or CA_FILE)  # the fleet directory's files
        member = login.username if login is not None else "anonymous"
        try:
            tls = client_tls(
                args.broker, beside, beside, member, args.ca_file, args.cert_file,
                args.cert_key_file,
            )  # fmt: skip
        except TransportError as exc:  # a TLS file that is not there
            raise HealthError(str(exc)) from exc
        status_of = None if args.status is None else (args.fleet, args.status)
        seen.append(
            check(args.broker, login=login, status_of=status_of, timeout=args.timeout, tls=tls)
        )
    return seen


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.broker is None and not args.connected:
        parser.error("give --broker URL, --connected PORT or both")
    if (args.status is None) != (args.fleet is None) or (args.status and not args.login):
        parser.error("--status goes with --fleet and --login")
    try:
        seen = _checks(args)
    except HealthError as exc:
        print(f"tern health: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print("healthy: " + "; ".join(seen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
