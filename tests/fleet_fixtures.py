"""Fleets with generated keys for tests: any number of gateways, any depth.

`build_fleet({"gw-1": ("coordinator", ["dev-01", "dev-02"]), "gw-1a": ("gw-1", [...])})`
returns the public `Fleet` and every secret key and broker login (coordinator, gateways,
devices, and the observer's login). Keys and logins come from a seeded generator, so a
test run is reproducible; `write_fleet` puts the fleet file, one key file and one login
file per component and ``observer.json`` on disk, as `tern fleet init` does.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nacl.signing import SigningKey

from device.agent import DeviceAgent
from gateway import Gateway, GatewayConfig
from tern.fleet import COORDINATOR, DEFAULT_MAX_PARAMS, Fleet
from tern.keys import signing_key_to_text
from tern.logins import OBSERVER, Login
from tern.members import new_members

__all__ = ["RIGHTS_LAYOUT", "FleetKit", "FleetRig", "build_fleet", "simple_layout", "write_fleet"]

Layout = Mapping[str, tuple[str, Sequence[str]]]  # gateway -> (parent, its devices)


@dataclass(frozen=True)
class FleetKit:
    fleet: Fleet
    keys: Mapping[str, SigningKey]  # component id (and "coordinator") -> secret key
    logins: Mapping[str, Login] = field(default_factory=dict)  # id and "observer" -> login

    @property
    def coordinator_key(self) -> SigningKey:
        return self.keys[COORDINATOR]

    def login(self, user: str) -> tuple[str, str]:
        """`user`'s (user name, password), as MqttTransport's `login=` takes it."""
        return self.logins[user].username, self.logins[user].password


# Two levels and two top gateways: every row of the rights tables has a member to play it.
RIGHTS_LAYOUT: Layout = {
    "gw-1": (COORDINATOR, ["dev-01", "dev-02"]),
    "gw-1a": ("gw-1", ["dev-03"]),
    "gw-2": (COORDINATOR, ["dev-04"]),
}


def build_fleet(
    layout: Layout,
    fleet_id: str = "test-fleet",
    seed: int = 0,
    *,
    max_params: int | None = None,
    max_weight: Mapping[str, float] | None = None,
) -> FleetKit:
    """A Fleet for `layout`, with a fresh deterministic key and login for every component
    and an observer login; the fleet file holds the logins' hashes."""
    members = new_members(
        fleet_id,
        layout,
        rng=np.random.default_rng(seed),
        max_params=DEFAULT_MAX_PARAMS if max_params is None else max_params,
        max_weight=max_weight,
    )
    return FleetKit(members.fleet, members.keys, members.logins)


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
    """Write fleet.json, <id>.key and <id>.login for every component and observer.json;
    return the fleet file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fleet.json"
    path.write_text(kit.fleet.to_json())
    for component, key in kit.keys.items():
        (directory / f"{component}.key").write_text(signing_key_to_text(key) + "\n")
    for user, login in kit.logins.items():
        name = "observer.json" if user == OBSERVER else f"{user}.login"
        (directory / name).write_text(login.to_json() + "\n")
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
            login=self.kit.logins.get(gw),
        )
        gateway = Gateway(config, self.kit.fleet, self.kit.keys[gw], rng=np.random.default_rng(1))
        self.stack.callback(gateway.stop)
        self.gateways[gw] = gateway.start()
        return gateway

    def device(self, dev: str, *, trainer: Any = None, slowdown: float = 0.0) -> DeviceAgent:
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
            login=self.kit.logins.get(dev),
            slowdown=slowdown,
        )
        self.stack.callback(agent.stop)
        self.devices[dev] = agent.start()
        return agent
