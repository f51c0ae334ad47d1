"""The fleet, board entries and gateway the board tests share (tests/test_gateway_boards*.py)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np

from gateway import Gateway, GatewayConfig
from gateway.boards import BoardEntry
from tern.fleet import COORDINATOR
from tests.fleet_fixtures import build_fleet

__all__ = ["FLEET", "KIT", "entry", "start_gateway"]

KIT = build_fleet({"gw-1": (COORDINATOR, ["dev-01"])})
FLEET = KIT.fleet.fleet


def entry(seed: int) -> BoardEntry:
    return BoardEntry(bytes([seed]) * 32, f"user-{seed}", f"password-{seed}")


def start_gateway(
    stack: ExitStack, upstream_url: str, boards_file: Path, downstream_url: str | None = None
) -> Gateway:
    config = GatewayConfig(
        "gw-1",
        upstream_url,
        downstream_url=downstream_url,
        listen_port=0,
        backoff_min=0.05,
        backoff_max=0.3,
        boards_file=str(boards_file),
        login=KIT.logins["gw-1"],
    )
    gateway = Gateway(config, KIT.fleet, KIT.keys["gw-1"], rng=np.random.default_rng(1))
    stack.callback(gateway.stop)
    return gateway.start()
