"""The fleet file: who is in a fleet, who reports to whom, their public keys and logins.

One JSON file, public only (no secrets: passwords appear only as hashes), shared by every
component::

    {"fleet": "demo",
     "coordinator": "<hex verify key>",
     "gateways": {"gw-1": {"key": "<hex>", "parent": "coordinator",
                           "devices": {"dev-01": "<hex>", ...}},
                  "gw-1a": {"key": "<hex>", "parent": "gw-1", "devices": {...}}},
     "logins": {"coordinator": "$7$101$...", "gw-1": "$7$101$...", "observer": "$7$..."},
     "max_params": 1048576,
     "max_weight": {"dev-01": 500.0}}

A gateway's parent is ``coordinator`` or another gateway, so the tree has any depth.
``logins`` (user name -> `tern.logins` password hash), ``max_params`` and ``max_weight``
are optional and written only when they differ from their defaults.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from nacl.signing import VerifyKey

from tern.errors import MalformedMessage, TernError, brief
from tern.jsontext import parse_json
from tern.keys import verify_key_from_text, verify_key_to_text
from tern.logins import OBSERVER, is_observer, is_password_hash
from tern.spec import MAX_PARAMS
from tern.topics import validate_id

__all__ = [
    "COORDINATOR",
    "DEFAULT_MAX_PARAMS",
    "MAX_FLEET_BYTES",
    "Fleet",
    "GatewayEntry",
    "client_id",
]

COORDINATOR = "coordinator"
DEFAULT_MAX_PARAMS = 1 << 20  # the largest model a fleet accepts unless its file says more
MAX_FLEET_BYTES = 64 << 20  # about 150,000 members with their keys and logins

_TOP_KEYS = {"fleet", "coordinator", "gateways"}
_OPTIONAL_KEYS = {"logins", "max_params", "max_weight"}
_GATEWAY_KEYS = {"key", "parent", "devices"}


def client_id(fleet: str, member: str, link: str = "") -> str:
    """The MQTT client id a gateway or a device of `fleet` connects with: a device's
    ``tern-{fleet}-{device}``; a gateway's ``tern-{fleet}-{gateway}-up`` to its parent's
    broker and ``...-down`` to its own (`link`). The coordinator's is ``coordinator``."""
    name = f"tern-{fleet}-{member}"
    return f"{name}-{link}" if link else name


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
    logins: Mapping[str, str] = field(default_factory=dict)  # user -> tern.logins hash
    max_params: int = DEFAULT_MAX_PARAMS
    max_weight: Mapping[str, float] = field(default_factory=dict)  # device -> bound

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet")
        seen: set[str] = {COORDINATOR}
        for gw, entry in self.gateways.items():
            validate_id(gw, "gateway")
            validate_id(entry.parent, "parent")
            if entry.parent != COORDINATOR and entry.parent not in self.gateways:
                raise MalformedMessage(f"gateway {gw!r} has an unknown parent {entry.parent!r}")
            for dev in entry.devices:
                validate_id(dev, "device")
            ids = {gw, *entry.devices}
            if ids & seen or gw in entry.devices:
                again = sorted((ids & seen) | ({gw} & set(entry.devices)))
                raise MalformedMessage(f"ids repeat in the fleet: {again[:5]}")
            seen |= ids
        if any(is_observer(cid) for cid in seen):
            raise MalformedMessage(f"{OBSERVER!r} and {OBSERVER}-* are reserved for observers")
        for gw in self.gateways:  # no cycles: every chain of parents reaches the coordinator
            chain, node = [gw], self.gateways[gw].parent
            while node != COORDINATOR:
                if node in chain:
                    raise MalformedMessage(f"gateway parents form a cycle: {chain[:8]}")
                chain.append(node)
                node = self.gateways[node].parent
        self._check_limits(seen)

    def _check_limits(self, members: set[str]) -> None:
        for user, hashed in self.logins.items():
            if user not in members and not is_observer(user):
                raise MalformedMessage(f"a login for {brief(user, 64)}, who is not in the fleet")
            if not is_password_hash(hashed):
                raise MalformedMessage(f"the login of {user!r} is not a $7$ password hash")
        if not _is_int(self.max_params) or not 1 <= self.max_params <= MAX_PARAMS:
            raise MalformedMessage(f"max_params must be an integer in 1..{MAX_PARAMS}")
        devices = self._device_set
        weights: dict[str, float] = {}
        for device, bound in self.max_weight.items():
            if device not in devices:
                raise MalformedMessage(f"max_weight for {brief(device, 64)}: not a device here")
            if not _is_finite(bound) or bound < 1:
                raise MalformedMessage(f"max_weight of {device!r} must be a finite number >= 1")
            weights[device] = float(bound)
        # Read-only, so a Fleet shared between threads cannot change under a reader.
        object.__setattr__(self, "logins", MappingProxyType(dict(self.logins)))
        object.__setattr__(self, "max_weight", MappingProxyType(weights))

    def children(self, parent: str) -> list[str]:
        """Gateways whose parent is `parent` (a gateway id or ``coordinator``), sorted."""
        return sorted(g for g, e in self.gateways.items() if e.parent == parent)

    def gateways_below(self, gateway: str) -> list[str]:
        """`gateway` and every gateway below it, parents before their children."""
        out = [gateway]
        for child in self.children(gateway):
            out += self.gateways_below(child)
        return out

    def devices_below(self, node: str) -> list[str]:
        """Every device under `node` (its own and its descendants'), sorted."""
        own = list(self.gateways[node].devices) if node in self.gateways else []
        for child in self.children(node):
            own += self.devices_below(child)
        return sorted(own)

    @cached_property
    def devices(self) -> list[str]:
        return self.devices_below(COORDINATOR)

    @cached_property
    def _device_set(self) -> frozenset[str]:
        return frozenset(self.devices)

    @property
    def members(self) -> list[str]:
        """Every id of the fleet: the coordinator, the gateways and the devices, sorted."""
        return list(self._members)

    @cached_property
    def _members(self) -> tuple[str, ...]:
        return tuple(sorted([COORDINATOR, *self.gateways, *self.devices]))

    def client_ids(self, member: str) -> frozenset[str]:
        """The MQTT client ids `member` connects with (on any broker)."""
        if member == COORDINATOR:
            return frozenset({COORDINATOR})
        if member in self.gateways:
            return frozenset(client_id(self.fleet, member, link) for link in ("up", "down"))
        if member in self._device_set:
            return frozenset({client_id(self.fleet, member)})
        raise TernError(f"{brief(member, 64)} is not a member of fleet {self.fleet!r}")

    def key_of(self, member: str) -> VerifyKey:
        """`member`'s verify key: the coordinator's, a gateway's or a device's."""
        if member == COORDINATOR:
            return self.coordinator_key
        if member in self.gateways:
            return self.gateways[member].key
        if member in self._device_set:
            return self.gateways[self.gateway_of(member)].devices[member]
        raise TernError(f"{brief(member, 64)} is not a member of fleet {self.fleet!r}")

    def gateway_of(self, device: str) -> str:
        for gw, entry in self.gateways.items():
            if device in entry.devices:
                return gw
        raise TernError(f"device {brief(device, 64)} is not in fleet {self.fleet!r}")

    def height(self, gateway: str) -> int:
        """1 for a gateway with no child gateways; 1 + the tallest child's otherwise."""
        return 1 + max((self.height(c) for c in self.children(gateway)), default=0)

    def to_json(self) -> str:
        doc: dict[str, Any] = {
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
        }
        if self.logins:
            doc["logins"] = dict(self.logins)
        if self.max_params != DEFAULT_MAX_PARAMS:
            doc["max_params"] = self.max_params
        if self.max_weight:
            doc["max_weight"] = dict(self.max_weight)
        return json.dumps(doc, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Fleet:
        """Parse a fleet file, as text or as the file's bytes (UTF-8); MalformedMessage
        says what is wrong, whatever the input."""
        if not isinstance(text, str | bytes) or len(text) > MAX_FLEET_BYTES:
            raise MalformedMessage(f"a fleet file is JSON text of at most {MAX_FLEET_BYTES} bytes")
        doc = parse_json(text, "fleet file", MAX_FLEET_BYTES)
        try:
            return cls._from_doc(doc)
        except MalformedMessage:
            raise
        except TernError as exc:
            raise MalformedMessage(f"fleet file is not valid: {exc.message}") from exc

    @classmethod
    def _from_doc(cls, doc: object) -> Fleet:
        v = _object(doc, "the fleet file", _TOP_KEYS, _OPTIONAL_KEYS)
        gateways = {}
        for g, e in _object(v["gateways"], "gateways").items():
            entry = _object(e, f"gateway {brief(g, 64)}", _GATEWAY_KEYS)
            devices = _object(entry["devices"], f"devices of gateway {brief(g, 64)}")
            gateways[g] = GatewayEntry(
                _key(entry["key"]),
                _text(entry["parent"], "a gateway's parent"),
                {d: _key(k) for d, k in devices.items()},
            )
        logins = _object(v.get("logins", {}), "logins")
        for hashed in logins.values():
            _text(hashed, "a login hash")
        return cls(
            _text(v["fleet"], "fleet"),
            _key(v["coordinator"]),
            gateways,
            logins,
            v.get("max_params", DEFAULT_MAX_PARAMS),
            _object(v.get("max_weight", {}), "max_weight"),
        )


def _object(
    value: object, what: str, required: set[str] | None = None, optional: set[str] | None = None
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedMessage(f"{what} must be a JSON object")
    if required is not None:
        missing, extra = required - set(value), set(value) - required - (optional or set())
        if missing or extra:
            raise MalformedMessage(
                f"{what} needs exactly {sorted(required)}"
                + (f", optionally {sorted(optional)}" if optional else "")
                + f" ({len(missing)} missing, {len(extra)} unknown)"
            )
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedMessage(f"{what} must be a string")
    return value


def _key(value: object) -> VerifyKey:
    return verify_key_from_text(_text(value, "a verify key"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False
