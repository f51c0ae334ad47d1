"""`tern device` / `python -m device`: run one device agent until SIGINT or SIGTERM.

It waits for its gateway's broker (without end unless --connect-timeout); anything that
keeps it from starting exits 1 with one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from broker.chunking import add_max_message_argument
from broker.cli import load_member, seconds, start_unless_stopped
from broker.errors import TransportError
from broker.lifecycle import load_login, stop_on_signals
from broker.logs import add_log_arguments, setup_logging
from broker.marks import add_state_dir_argument, default_state_dir
from broker.tls import add_client_arguments, client_tls_from_args
from device.agent import DeviceAgent, DeviceError
from device.kernels import default_cache_dir
from device.trainer import trainer_for
from tern.errors import TernError

__all__ = ["add_arguments", "build_parser", "main", "run"]

log = logging.getLogger("device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", required=True, help="this device's id in the fleet file")
    p.add_argument("--fleet-file", required=True, help="the fleet's public JSON file")
    p.add_argument("--key", required=True, help="this device's secret key file (tern keygen)")
    p.add_argument(
        "--gateway-url", required=True, help="its gateway's broker, mqtt://host:port or mqtts://..."
    )
    p.add_argument("--data", required=True, help=".npz file with x (n, features) and y (n,)")
    p.add_argument(
        "--trainer",
        default="wasm",
        choices=("wasm", "numpy"),
        help="wasm (default): the fleet's WebAssembly kernel each schedule names, sandboxed;"
        " numpy: the reference trainer, as a fallback",
    )
    p.add_argument(
        "--kernel-cache",
        type=Path,
        default=None,
        help=f"where verified kernels are kept (default {default_cache_dir()})",
    )
    add_state_dir_argument(p)
    p.add_argument(
        "--connect-timeout",
        type=seconds,
        default=None,
        metavar="S",
        help="give up (exit 1) if the gateway's broker is not reached within S seconds"
        " (default: wait without end, logging each retry)",
    )
    p.add_argument(
        "--slowdown",
        type=seconds,
        default=0.0,
        metavar="S",
        help="pause S seconds before each training: a straggler, for drills (default 0)",
    )
    add_max_message_argument(p)
    add_client_arguments(p)
    add_log_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tern device", description="Run a tern device agent.")
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    setup_logging(args.id, args.quiet, args.log_json)
    with stop_on_signals(log) as stop:
        return _serve(args, stop)


def _serve(args: argparse.Namespace, stop: threading.Event) -> int:
    try:
        fleet, key = load_member(args.fleet_file, args.key, args.id)
        with np.load(args.data) as data:
            x, y = np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int64)
        agent = DeviceAgent(
            args.id,
            fleet,
            key,
            args.gateway_url,
            x,
            y,
            trainer=None if args.trainer == "wasm" else trainer_for(args.trainer),
            kernel_cache=args.kernel_cache or default_cache_dir(),
            login=load_login(args.key),
            state_dir=args.state_dir or default_state_dir(fleet.fleet, args.id),
            slowdown=args.slowdown,
            tls=client_tls_from_args(args, args.gateway_url, args.id),
            max_message_bytes=args.max_message_bytes,
        )
        if not start_unless_stopped(lambda: agent.start(args.connect_timeout), stop):
            agent.stop()  # stopped while it waited for its gateway's broker
            return 0
    except (OSError, KeyError, ValueError, TernError, TransportError, DeviceError) as exc:
        print(f"tern device: {exc}", file=sys.stderr)
        return 1
    log.info("device %s: %d samples, gateway %s", args.id, x.shape[0], args.gateway_url)
    while not stop.wait(0.5):
        pass
    agent.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
