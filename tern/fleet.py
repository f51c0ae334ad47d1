"""The fleet file: who is in a fleet, who reports to whom, and their public keys.

One JSON file, public only (no secrets), shared by every component::

    {"fleet": "demo",
     "coordinator": "<hex verify key>",
     "gateways": {"gw-1": {"key": "<hex>", "parent": "coordinator",
                           "devices": {"dev-01": "<hex>", ...}},
                  "gw-1a": {"key": "<hex>", "parent": "gw-1", "devices": {...}}}}

A gateway's parent is ``coordinator`` or another gateway, so the tree has any depth.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from nacl.signing import VerifyKey

from tern.errors import MalformedMessage, TernError
from tern.keys import verify_key_from_text, verify_key_to_text
from tern.topics import validate_id

__all__ = ["COORDINATOR", "Fleet", "GatewayEntry"]

COORDINATOR = "coordinator"


@dataclass(frozen=True, slots=True)
class GatewayEntry:
    key: VerifyKey
    parent: str
    devices: Mapping[str, VerifyKey]


@dataclass(frozen=True)
class Fleet:
    fleet: str
    coordinator_key: VerifyKey
    gateways: Mapping[str, GatewayEntry]

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet")
        seen: set[str] = {COORDINATOR}
        for gw, entry in self.gateways.items():
            validate_id(gw, "gateway")
            if entry.parent != COORDINATOR and entry.parent not in self.gateways:
                raise MalformedMessage(f"gateway {gw!r} has an unknown parent {entry.parent!r}")
            for dev in entry.devices:
                validate_id(dev, "device")
            ids = {gw, *entry.devices}
            if ids & seen:
                raise MalformedMessage(f"ids repeat in the fleet: {sorted(ids & seen)}")
            seen |= ids
        for gw in self.gateways:  # no cycles: every chain of parents reaches the coordinator
            chain, node = [gw], self.gateways[gw].parent
            while node != COORDINATOR:
                if node in chain:
                    raise MalformedMessage(f"gateway parents form a cycle: {chain}")
                chain.append(node)
                node = self.gateways[node].parent

    def children(self, parent: str) -> list[str]:
        """Gateways whose parent is `parent` (a gateway id or ``coordinator``), sorted."""
        return sorted(g for g, e in self.gateways.items() if e.parent == parent)

    def devices_below(self, node: str) -> list[str]:
        """Every device under `node` (its own and its descendants'), sorted."""
        own = list(self.gateways[node].devices) if node in self.gateways else []
        for child in self.children(node):
            own += self.devices_below(child)
        return sorted(own)

    @cached_property
    def devices(self) -> list[str]:
        return self.devices_below(COORDINATOR)

    def gateway_of(self, device: str) -> str:
        for gw, entry in self.gateways.items():
            if device in entry.devices:
                return gw
        raise TernError(f"device {device!r} is not in fleet {self.fleet!r}")

    def height(self, gateway: str) -> int:
        """1 for a gateway with no child gateways; 1 + the tallest child's otherwise."""
        return 1 + max((self.height(c) for c in self.children(gateway)), default=0)

    def to_json(self) -> str:
        return json.dumps(
            {
                "fleet": self.fleet,
                "coordinator": verify_key_to_text(self.coordinator_key),
                "gateways": {
                    g: {
                        "key": verify_key_to_text(e.key),
                        "parent": e.parent,
                        "devices": {d: verify_key_to_text(k) for d, k in e.devices.items()},
                    }
                    for g, e in self.gateways.items()
                },
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Fleet:
        try:
            v = json.loads(text)
            gateways = {
                str(g): GatewayEntry(
                    verify_key_from_text(e["key"]),
                    str(e["parent"]),
                    {str(d): verify_key_from_text(k) for d, k in e["devices"].items()},
                )
                for g, e in v["gateways"].items()
            }
            return cls(str(v["fleet"]), verify_key_from_text(v["coordinator"]), gateways)
        except TernError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MalformedMessage(f"fleet file is not valid: {exc!r}") from exc
