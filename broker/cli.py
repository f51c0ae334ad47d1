"""`tern broker` / `python -m broker`: the embedded broker until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from broker.embedded import EmbeddedBroker
from broker.errors import BrokerError, BrokerStopError
from broker.lifecycle import configure_logging, stop_on_signals

__all__ = ["add_arguments", "main", "run"]

log = logging.getLogger("broker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="port; 0 picks a free one (1883)")
    parser.add_argument("--config", help="amqtt config (YAML or JSON) merged over the defaults")
    parser.add_argument("--verbose", "-v", action="store_true", help="log amqtt's own messages")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, then shut down cleanly (exit status 0)."""
    configure_logging(args.verbose)
    with stop_on_signals(log) as stop:
        try:
            embedded = EmbeddedBroker(args.host, args.port, config=args.config).start()
        except BrokerError as exc:
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker", description="Run tern's embedded MQTT broker (amqtt)."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
