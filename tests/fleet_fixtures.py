"""Fleets with generated keys for tests: any number of gateways, any depth.

`build_fleet({"gw-1": ("coordinator", ["dev-01", "dev-02"]), "gw-1a": ("gw-1", [...])})`
returns the public `Fleet` and every secret key (coordinator, gateways, devices).
Keys come from a seeded generator, so a test run is reproducible; `write_fleet`
puts the fleet file and one key file per component on disk for the command lines.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nacl.signing import SigningKey

from device.agent import DeviceAgent
from gateway import Gateway, GatewayConfig
from tern.fleet import COORDINATOR, Fleet, GatewayEntry
from tern.keys import signing_key_to_text

__all__ = ["FleetKit", "FleetRig", "build_fleet", "simple_layout", "write_fleet"]

Layout = Mapping[str, tuple[str, Sequence[str]]]  # gateway -> (parent, its devices)


@dataclass(frozen=True)
class FleetKit:
    fleet: Fleet
    keys: Mapping[str, SigningKey]  # component id (and "coordinator") -> secret key

    @property
    def coordinator_key(self) -> SigningKey:
        return self.keys[COORDINATOR]


def build_fleet(layout: Layout, fleet_id: str = "test-fleet", seed: int = 0) -> FleetKit:
    """A Fleet for `layout`, with a fresh deterministic key for every component."""
    rng = np.random.default_rng(seed)
    ids = [COORDINATOR]
    for gw, (_, devices) in layout.items():
        ids += [gw, *devices]
    keys = {i: SigningKey(rng.bytes(32)) for i in ids}
    gateways = {
        gw: GatewayEntry(keys[gw].verify_key, parent, {d: keys[d].verify_key for d in devices})
        for gw, (parent, devices) in layout.items()
    }
    return FleetKit(Fleet(fleet_id, keys[COORDINATOR].verify_key, gateways), keys)


def simple_layout(gateways: int, devices: int, depth: int = 1) -> dict[str, tuple[str, list[str]]]:
    """`gateways` chains of `depth` gateways each, `devices` devices on every gateway.

    Chain i is gw-i (parent coordinator), gw-i-2 (parent gw-i), ...; devices are
    named dev-<gateway>-NN so ids never repeat.
    """
    layout: dict[str, tuple[str, list[str]]] = {}
    for i in range(1, gateways + 1):
        parent = COORDINATOR
        for level in range(1, depth + 1):
            gw = f"gw-{i}" if level == 1 else f"gw-{i}-{level}"
            layout[gw] = (parent, [f"dev-{gw[3:]}-{d:02d}" for d in range(1, devices + 1)])
            parent = gw
    return layout


def write_fleet(kit: FleetKit, directory: Path) -> Path:
    """Write fleet.json and <id>.key for every component; return the fleet file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fleet.json"
    path.write_text(kit.fleet.to_json())
    for component, key in kit.keys.items():
        (directory / f"{component}.key").write_text(signing_key_to_text(key) + "\n")
    return path


def device_data(device: str) -> tuple[np.ndarray, np.ndarray]:
    """A small synthetic data set, different per device, the same every run."""
    rng = np.random.default_rng(zlib.crc32(device.encode()))
    n = 20 + zlib.crc32(device.encode()) % 13
    x = rng.standard_normal((n, 8), dtype=np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)


class FleetRig:
    """Real gateways and devices of one fleet under one upstream broker, stopped at the end.

    Short backoffs (tests restart brokers) and seeded jitter; a gateway's parent must
    have been started first.
    """

    def __init__(self, kit: FleetKit, upstream_url: str, stack: ExitStack) -> None:
        self.kit, self.upstream_url, self.stack = kit, upstream_url, stack
        self.gateways: dict[str, Gateway] = {}
        self.devices: dict[str, DeviceAgent] = {}

    def gateway(
        self, gw: str, *, listen_port: int = 0, downstream_url: str | None = None
    ) -> Gateway:
        parent = self.kit.fleet.gateways[gw].parent
        url = self.upstream_url if parent == COORDINATOR else self.gateways[parent].downstream_url
        config = GatewayConfig(
            gw,
            url,
            listen_port=listen_port,
            downstream_url=downstream_url,
            margin=0.3,
            backoff_min=0.05,
            backoff_max=0.3,
        )
        gateway = Gateway(config, self.kit.fleet, self.kit.keys[gw], rng=np.random.default_rng(1))
        self.stack.callback(gateway.stop)
        self.gateways[gw] = gateway.start()
        return gateway

    def device(self, dev: str, *, trainer: Any = None) -> DeviceAgent:
        x, y = device_data(dev)
        agent = DeviceAgent(
            dev,
            self.kit.fleet,
            self.kit.keys[dev],
            self.gateways[self.kit.fleet.gateway_of(dev)].downstream_url,
            x,
            y,
            trainer=trainer,
            backoff_min=0.05,
            backoff_max=0.3,
            rng=np.random.default_rng(2),
        )
        self.stack.callback(agent.stop)
        self.devices[dev] = agent.start()
        return agent
