"""`tern gateway` / `python -m gateway`: run one gateway until SIGINT or SIGTERM.

It waits for its upstream broker (without end unless --connect-timeout); anything that
keeps it from starting exits 1 with one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from broker.chunking import add_max_message_argument
from broker.cli import (
    listen_failure,
    load_member,
    quiet_third_party_tracebacks,
    seconds,
    start_unless_stopped,
)
from broker.lifecycle import load_login, stop_on_signals
from broker.logs import add_log_arguments, setup_logging
from broker.marks import add_state_dir_argument, default_state_dir
from broker.tls import add_client_arguments, add_server_arguments
from gateway.config import DEFAULT_LISTEN_PORT, DEFAULT_MARGIN, GatewayConfig, GatewayError
from gateway.downstream import tls_settings
from gateway.service import Gateway
from tern.errors import TernError
from tern.mcu import DEFAULT_IN_EXP

__all__ = ["add_arguments", "build_parser", "main", "parse_listen", "run"]

log = logging.getLogger("gateway")


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT, or :PORT for loopback) -> (host, port)."""
    shown = repr(text) if len(text) <= 80 else f"{len(text)} characters"
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"{shown} is a URL; --listen takes the HOST:PORT to serve on, like 0.0.0.0:1884"
        )
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or "/" in host:
        raise argparse.ArgumentTypeError(f"{shown} is not HOST:PORT, like 0.0.0.0:1884")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", required=True, help="this gateway's id in the fleet file")
    p.add_argument("--fleet-file", required=True, help="the fleet's public JSON file")
    p.add_argument("--key", required=True, help="this gateway's secret key file (tern keygen)")
    p.add_argument(
        "--upstream", required=True, help="its parent's broker, mqtt://host:port or mqtts://..."
    )
    down = p.add_mutually_exclusive_group()
    down.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", DEFAULT_LISTEN_PORT),
        help=f"serve devices on an embedded broker at HOST:PORT (127.0.0.1:{DEFAULT_LISTEN_PORT})",
    )
    down.add_argument("--downstream", help="serve devices on this external broker instead")
    p.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"seconds closed before the deadline per tree level ({DEFAULT_MARGIN})",
    )
    p.add_argument(
        "--boards",
        metavar="FILE",
        help="its microcontroller boards (JSON with their keys); SIGHUP re-reads it",
    )
    p.add_argument(
        "--mcu-in-exp",
        type=int,
        default=DEFAULT_IN_EXP,
        metavar="N",
        help=f"input exponent of the boards' int8 models: x stands for x/2^N ({DEFAULT_IN_EXP})",
    )
    add_state_dir_argument(p)
    p.add_argument(
        "--connect-timeout",
        type=seconds,
        default=None,
        metavar="S",
        help="give up (exit 1) if the upstream broker is not reached within S seconds"
        " (default: wait without end, logging each retry)",
    )
    add_max_message_argument(p)
    p.add_argument(
        "--max-packet-bytes",
        type=int,
        default=None,
        metavar="N",
        help="the largest MQTT packet its own broker (--listen) takes (default: as large as"
        " the fleet's largest model); with --max-message-bytes below it, big messages"
        " travel in chunks",
    )
    p.add_argument(
        "--verbose", "-v", action="store_true", help="log amqtt's own messages and tracebacks"
    )
    add_client_arguments(p)
    add_server_arguments(p, "ID", "TLS and WebSockets listeners of its own broker (--listen)")
    add_log_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tern gateway", description="Run a tern gateway.")
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    setup_logging(args.id, args.quiet, args.log_json, verbose=args.verbose)
    if not args.verbose:
        quiet_third_party_tracebacks()
    with stop_on_signals(log) as stop, _hangups() as hangup:
        return _serve(args, stop, hangup)


@contextmanager
def _hangups() -> Iterator[threading.Event]:
    """An Event set by SIGHUP (the usual "re-read your configuration") while the block runs."""
    hangup = threading.Event()
    if not hasattr(signal, "SIGHUP"):  # Windows
        yield hangup
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        hangup.set()

    previous = signal.signal(signal.SIGHUP, on_signal)
    try:
        yield hangup
    finally:
        signal.signal(signal.SIGHUP, previous)


def _serve(args: argparse.Namespace, stop: threading.Event, hangup: threading.Event) -> int:
    host, port = args.listen
    try:
        fleet, key = load_member(args.fleet_file, args.key, args.id)
        state_dir = args.state_dir or default_state_dir(fleet.fleet, args.id)
        config = GatewayConfig(
            args.id,
            args.upstream,
            downstream_url=args.downstream,
            listen_host=host,
            listen_port=port,
            margin=args.margin,
            boards_file=args.boards,
            mcu_in_exp=args.mcu_in_exp,
            login=load_login(args.key),
            state_dir=state_dir,
            max_message_bytes=args.max_message_bytes,
            max_packet_bytes=args.max_packet_bytes,
            **tls_settings(args),
        )
        gateway = Gateway(config, fleet, key)
        if not start_unless_stopped(lambda: gateway.start(args.connect_timeout), stop):
            gateway.stop()  # stopped while it waited for its upstream broker
            return 0
    except (OSError, TernError, GatewayError) as exc:
        failure = listen_failure(exc) if args.downstream is None else None
        if failure is not None:
            print(f"tern gateway: cannot listen on {host}:{port}: {failure}", file=sys.stderr)
        else:
            print(f"tern gateway: {exc}", file=sys.stderr)
        return 1
    # The line a supervisor or a test reads to find the downstream broker.
    print(f"gateway {args.id} serving on {gateway.downstream_url}", flush=True)
    if gateway.downstream_ws_url is not None:
        print(f"gateway {args.id} serving WebSockets on {gateway.downstream_ws_url}", flush=True)
    while not stop.wait(0.5):
        if hangup.is_set():
            hangup.clear()
            _reload(gateway)
    gateway.stop()
    return 0


def _reload(gateway: Gateway) -> None:
    try:
        boards = gateway.reload_boards()
    except GatewayError as exc:  # a bad file: keep serving the boards we had
        log.error("SIGHUP: boards not reloaded: %s", exc)
        return
    log.info("SIGHUP: serving %d boards", len(boards.boards))


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
