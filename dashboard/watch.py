"""`tern watch`: a live terminal view of a fleet, logged in as its read-only observer.

It subscribes on the top broker to the fleet's metrics, status, views and telemetry
(topics.md "JSON payloads") and redraws, twice a second, the coordinator's rounds with
an accuracy sparkline, each gateway's contributors and refusals, and the fleet tree with
every device's and board's state. `--once` prints one snapshot of what the broker holds
retained and exits (for scripts and tests). Exit code 1 when it cannot start (login file,
broker), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console, RenderableType
from rich.live import Live

from broker.errors import BrokerError
from broker.lifecycle import stop_on_signals
from broker.tls import add_client_arguments, client_tls
from broker.transport import Message, MqttTransport
from broker.urls import parse_url
from dashboard.common import client_id, read_login
from dashboard.errors import DashboardError
from dashboard.render import screen
from dashboard.state import ViewerState, filters
from tern.errors import TernError
from tern.logins import OBSERVER
from tern.topics import validate_id

__all__ = ["Watcher", "build_parser", "main"]

log = logging.getLogger("dashboard.watch")

SETTLE = 0.5  # --once: print after this long without a new message


class Watcher:
    """A `ViewerState` fed by an observer's subscriptions on one broker."""

    def __init__(self, transport: MqttTransport, fleet: str) -> None:
        self.transport = transport
        self.state = ViewerState(fleet)
        self.lock = threading.Lock()
        self.last_message = time.monotonic()

    def _on_message(self, message: Message) -> None:
        with self.lock:
            self.state.feed(message.topic, message.payload)
            self.last_message = time.monotonic()

    def start(self, timeout: float | None) -> Watcher:
        self.transport.connect(timeout)
        for topic in filters(self.state.fleet):
            self.transport.subscribe(topic, self._on_message)
        return self

    def settle(self, timeout: float) -> None:
        """Wait until the retained messages have come (quiet for SETTLE s) or `timeout`."""
        deadline = time.monotonic() + timeout
        time.sleep(min(SETTLE, timeout))
        while time.monotonic() < deadline:
            with self.lock:
                quiet = time.monotonic() - self.last_message
            if quiet >= SETTLE:
                return
            time.sleep(0.05)

    def render(self, title: str) -> RenderableType:
        with self.lock:
            return screen(self.state, title)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tern watch", description=__doc__)
    p.add_argument(
        "--broker", required=True, help="the top broker, mqtt://host:port or mqtts://host:port"
    )
    p.add_argument("--fleet", required=True, help="fleet id")
    p.add_argument(
        "--login", type=Path, help="login file: the fleet's observer.json (read-only rights)"
    )
    add_client_arguments(p)  # defaults beside --login: ca.crt, observer.client.crt/.key
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the broker (and, with --once, for its retained messages)",
    )
    p.add_argument("--width", type=int, default=None, help="columns (default: the terminal's)")
    return p


def run(args: argparse.Namespace) -> int:
    fleet = validate_id(args.fleet, "fleet")
    parse_url(args.broker)
    login = read_login(args.login) if args.login is not None else None
    # The observer's files sit in the fleet directory: ca.crt and, with mTLS, its
    # client certificate are found beside its login.
    folder = Path(".") if args.login is None else args.login.parent
    tls = client_tls(
        args.broker,
        folder / "fleet.json",
        folder / "observer.json",
        OBSERVER,
        args.ca_file,
        args.cert_file,
        args.cert_key_file,
    )
    transport = MqttTransport(
        args.broker,
        client_id("watch", fleet),
        login=None if login is None else (login.username, login.password),
        tls=tls,
    )
    title = f"tern watch  fleet {fleet}  {args.broker}"
    console = Console(width=args.width)
    with transport:
        watcher = Watcher(transport, fleet).start(args.timeout)
        if args.once:
            watcher.settle(args.timeout)
            console.print(watcher.render(title))
            return 0
        with stop_on_signals(log) as stop, Live(console=console, auto_refresh=False) as live:
            while not stop.wait(0.5):
                live.update(watcher.render(title), refresh=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings only: log lines would tear the live view (and pad --once's snapshot).
    logging.basicConfig(level=logging.WARNING)
    try:
        return run(args)
    except (DashboardError, TernError, BrokerError, OSError) as exc:
        print(f"tern watch: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
