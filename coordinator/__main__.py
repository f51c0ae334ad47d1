"""`tern coordinator` / `python -m coordinator`: run a fleet's rounds until done or signalled.

It waits for its broker (without end unless --connect-timeout), stops cleanly on SIGINT or
SIGTERM, re-reads --kernel on SIGHUP (and ignores SIGHUP without it). A usage error exits
2; anything that keeps it from starting (files, the state directory, the broker) exits 1
with one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import numpy as np

from broker.chunking import add_max_message_argument
from broker.cli import load_member, seconds, start_unless_stopped
from broker.errors import BrokerError
from broker.lifecycle import load_login, stop_on_signals
from broker.logs import add_log_arguments, setup_logging
from broker.tls import add_client_arguments, client_tls_from_args
from broker.urls import parse_url
from coordinator.compression import (
    add_compression_arguments,
    downlink_from_args,
    partials_from_args,
)
from coordinator.config import ConfigError, CoordinatorConfig, CoordinatorError
from coordinator.privacy import add_privacy_arguments, privacy_from_args
from coordinator.service import Coordinator, TestSet, check_test_set
from kernels.wasm import DEFAULT_FUEL, DEFAULT_MEMORY_LIMIT
from tern.cli import missing_extra
from tern.codecs import CodecName
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.messages import DEFAULT_MAX_NORM, DEFAULT_MAX_WEIGHT, TrainConfig
from tern.policy import KNOWN_STRATEGIES

__all__ = ["add_arguments", "build_parser", "command", "main", "run"]


log = logging.getLogger("coordinator")


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 40,100,100,10") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer >= 1") from None
    return value


_TRAIN = TrainConfig()
_DEFAULTS = CoordinatorConfig(broker_url="mqtt://localhost", state_dir=Path())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The coordinator's flags, shared by `python -m coordinator` and `tern coordinator`."""
    p.add_argument(
        "--broker", required=True, help="broker URL, mqtt://host:port or mqtts://host:port (TLS)"
    )
    p.add_argument("--fleet-file", required=True, type=Path, help="the fleet's JSON file")
    p.add_argument("--key", required=True, type=Path, help="the coordinator's secret key file")
    p.add_argument("--state-dir", required=True, type=Path, help="models and round records")
    p.add_argument(
        "--keep-models",
        type=_positive,
        default=_DEFAULTS.keep_models,
        metavar="N",
        help="model versions the state directory keeps, the newest; older ones are deleted"
        f" once a newer round is recorded (default {_DEFAULTS.keep_models})",
    )
    p.add_argument(
        "--connect-timeout",
        type=seconds,
        default=None,
        metavar="S",
        help="give up (exit 1) if the broker is not reached within S seconds (default: wait"
        " without end, logging each retry)",
    )
    p.add_argument(
        "--layers",
        type=_layers,
        default=(40, 100, 100, 10),
        help="MLP layer sizes, input first (default: 40,100,100,10)",
    )
    p.add_argument("--init-seed", type=int, default=0, help="seed of the initial weights")
    p.add_argument(
        "--codec",
        choices=[str(c) for c in CodecName],
        default=str(CodecName.TERNARY),
        help="how devices encode their updates (default: ternary)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="stop after this round (default: run until stopped)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="seconds between round openings (default 0: back to back)",
    )
    p.add_argument("--round-timeout", type=float, default=30.0, help="seconds per round")
    p.add_argument(
        "--min-contributors", type=int, default=1, help="devices a round needs to produce a model"
    )
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of devices sampled")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and local training")
    p.add_argument(
        "--max-weight",
        type=float,
        default=DEFAULT_MAX_WEIGHT,
        help="most a device's update may weigh (its training samples) unless the fleet file"
        f" gives the device its own bound ({DEFAULT_MAX_WEIGHT:g})",
    )
    p.add_argument(
        "--max-norm",
        type=float,
        default=DEFAULT_MAX_NORM,
        help="largest L2 norm of an update's mean delta; beyond it an update is refused"
        f" ({DEFAULT_MAX_NORM:g})",
    )
    p.add_argument("--server-lr", type=float, default=1.0, help="FedAvg's server learning rate")
    p.add_argument("--server-momentum", type=float, default=0.0, help="FedAvg's momentum")
    p.add_argument(
        "--strategy",
        choices=sorted(KNOWN_STRATEGIES),
        default="fedavg",
        help="the server step; it travels in every schedule's policy (fedavg)",
    )
    p.add_argument(
        "--strategy-param",
        type=_strategy_param,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter of the strategy, e.g. lr=0.01 or beta1=0.9 for fedadam (repeatable)",
    )
    p.add_argument("--epochs", type=int, default=_TRAIN.epochs)
    p.add_argument("--batch-size", type=int, default=_TRAIN.batch_size)
    p.add_argument("--lr", type=float, default=_TRAIN.lr, help="devices' learning rate")
    p.add_argument(
        "--kernel",
        type=Path,
        default=None,
        help="the WebAssembly training kernel to publish (default: the packaged mlp.wasm);"
        " SIGHUP re-reads it and switches the fleet to it from the next round",
    )
    p.add_argument(
        "--kernel-fuel", type=int, default=DEFAULT_FUEL, help="fuel per device per round"
    )
    p.add_argument(
        "--kernel-memory",
        type=int,
        default=DEFAULT_MEMORY_LIMIT,
        help="bytes of Wasm linear memory per device",
    )
    p.add_argument(
        "--test-set",
        type=Path,
        default=None,
        help=".npz with x_test, y_test (or x, y) to evaluate every model on",
    )
    add_privacy_arguments(p)
    add_compression_arguments(p)
    add_max_message_argument(p)
    add_client_arguments(p)
    add_log_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tern coordinator", description=__doc__)
    add_arguments(p)
    return p


def _strategy_param(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError(text)
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not NAME=VALUE: {text[:40]!r}") from None


def load_test_set(path: Path, layers: Sequence[int] | None = None) -> TestSet:
    """The test set in `path`, checked against the model's `layers` when given: as many
    features as its input layer, finite, labels that are classes of its output layer."""
    try:
        with np.load(path, allow_pickle=False) as data:
            names = ("x_test", "y_test") if "x_test" in data else ("x", "y")
            x, y = (np.asarray(data[n]) for n in names)
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise CoordinatorError(f"cannot read the test set {path}: {exc!r}"[:300]) from exc
    if layers is not None:
        try:
            check_test_set(x, y, layers)
        except CoordinatorError as exc:
            raise CoordinatorError(f"test set {path}: {exc}") from None
    elif x.ndim != 2 or y.shape != (x.shape[0],):
        raise CoordinatorError(f"test set {path}: x must be (n, features) and y (n,)")
    return TestSet(x.astype(np.float32), y.astype(np.int64))


def run(args: argparse.Namespace) -> int:
    """Run with parsed arguments; SIGINT/SIGTERM stop cleanly, even while it waits for
    its broker."""
    with _hangups() as hangup:
        parse_url(args.broker)  # TransportError: before anything is read or locked
        privacy = privacy_from_args(args)
        config = CoordinatorConfig(
            broker_url=args.broker,
            state_dir=args.state_dir,
            layers=args.layers,
            init_seed=args.init_seed,
            codec=CodecName(args.codec),
            rounds=args.rounds,
            interval=args.interval,
            round_timeout=args.round_timeout,
            min_contributors=args.min_contributors,
            fraction=args.fraction,
            seed=args.seed,
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
            strategy=args.strategy,
            strategy_params=tuple(args.strategy_param),
            train=TrainConfig(args.epochs, args.batch_size, args.lr),
            kernel_fuel=args.kernel_fuel,
            kernel_memory=args.kernel_memory,
            max_weight=args.max_weight,
            max_norm=args.max_norm,
            login=load_login(args.key),
            connect_timeout=args.connect_timeout,
            keep_models=args.keep_models,
            tls=client_tls_from_args(args, args.broker, COORDINATOR),
            privacy=privacy,
            partials=partials_from_args(args, privacy.dp_terms_unset()),
            density=args.density,
            downlink=downlink_from_args(args),
            max_message_bytes=args.max_message_bytes,
        )
        fleet, key = load_member(args.fleet_file, args.key, COORDINATOR)
        test_set = None if args.test_set is None else load_test_set(args.test_set, args.layers)
        kernel = args.kernel.read_bytes() if args.kernel is not None else None
        coordinator = Coordinator(config, fleet, key, test_set=test_set, kernel=kernel)
        with stop_on_signals(log) as stop:
            try:
                if not start_unless_stopped(coordinator.start, stop):
                    return 0  # stopped while it waited for the broker
                # wake up now and then: signal handlers run on the main thread between waits
                while not stop.is_set() and not coordinator.wait_finished(0.2):
                    if hangup.is_set():
                        hangup.clear()
                        _hangup(coordinator, args.kernel)
            finally:
                coordinator.stop()
    return 0


@contextmanager
def _hangups() -> Iterator[threading.Event]:
    """An Event set by SIGHUP while the block runs. Without a handler SIGHUP would end
    the process (a closed terminal, or a `kill -HUP` meant to reload the kernel)."""
    hangup = threading.Event()
    if not hasattr(signal, "SIGHUP"):  # Windows
        yield hangup
        return

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        hangup.set()

    previous = signal.signal(signal.SIGHUP, on_hangup)
    try:
        yield hangup
    finally:
        signal.signal(signal.SIGHUP, previous)


def _hangup(coordinator: Coordinator, kernel: Path | None) -> None:
    if kernel is None:
        log.warning("SIGHUP ignored: started without --kernel, there is no kernel to re-read")
    else:
        _reload_kernel(coordinator, kernel)


def _reload_kernel(coordinator: Coordinator, path: Path) -> None:
    """SIGHUP: publish the kernel file again; a bad file is logged and changes nothing."""
    try:
        ref = coordinator.publish_kernel(path.read_bytes())
    except (OSError, CoordinatorError) as exc:
        log.error("kernel %s not switched: %s", path, exc)
        return
    log.info("kernel switched to %s… from the next round", ref.sha256[:12])


def command(args: argparse.Namespace) -> int:
    """`run` with logging set up and errors reported in one line: exit code 2 for a flag
    value the configuration refuses, 1 for anything else that keeps it from starting."""
    setup_logging("coordinator", args.quiet, args.log_json)
    try:
        return run(args)
    except ConfigError as exc:
        print(f"tern coordinator: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # differential privacy's accountant: an extra
        print(f"tern coordinator: {missing_extra(exc)}", file=sys.stderr)
        return 2
    except (CoordinatorError, TernError, BrokerError, OSError) as exc:
        print(f"tern coordinator: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    return command(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
