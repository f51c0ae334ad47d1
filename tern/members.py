"""A new fleet's members in memory: the public fleet file and every member's secrets.

`tern fleet init` writes what this makes to disk; the demo, the benchmarks and the tests
use it directly. Pure: keys and passwords come from the operating system's randomness,
or, for reproducible tests, from an explicit `numpy.random.Generator`.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from nacl.signing import SigningKey

from tern.errors import TernError, brief
from tern.fleet import COORDINATOR, DEFAULT_MAX_PARAMS, Fleet, GatewayEntry
from tern.logins import (
    OBSERVER,
    SALT_BYTES,
    Login,
    hash_password,
    is_observer,
    new_login,
    observer_name,
)

__all__ = ["Layout", "Members", "add_members", "new_members"]

Layout = Mapping[str, tuple[str, Sequence[str]]]  # gateway -> (parent, its devices)


@dataclass(frozen=True)
class Members:
    """A fleet file and its secrets: every member's signing key and broker login, and
    the observer's login."""

    fleet: Fleet
    keys: Mapping[str, SigningKey]  # member id -> secret key
    logins: Mapping[str, Login]  # member id and "observer" -> login

    def login(self, user: str) -> tuple[str, str]:
        """`user`'s (user name, password), as MqttTransport's `login=` takes it."""
        return self.logins[user].username, self.logins[user].password


def new_members(
    fleet_id: str,
    layout: Layout,
    *,
    rng: np.random.Generator | None = None,
    max_params: int = DEFAULT_MAX_PARAMS,
    max_weight: Mapping[str, float] | None = None,
) -> Members:
    """Keys and logins for the coordinator, every gateway and device of `layout`, and the
    observer; the fleet file holds the logins' hashes. With `rng`, reproducible."""
    ids = [COORDINATOR, *layout, *(d for _, ds in layout.values() for d in ds)]
    if rng is None:
        keys = {cid: SigningKey.generate() for cid in ids}
        logins = {user: new_login(user) for user in [*ids, OBSERVER]}
        hashes = {user: hash_password(lg.password) for user, lg in logins.items()}
    else:
        keys = {cid: SigningKey(rng.bytes(32)) for cid in ids}
        logins = {
            user: Login(user, base64.urlsafe_b64encode(rng.bytes(32)).decode().rstrip("="))
            for user in [*ids, OBSERVER]
        }
        hashes = {
            user: hash_password(lg.password, salt=rng.bytes(SALT_BYTES))
            for user, lg in logins.items()
        }
    gateways = {
        gw: GatewayEntry(keys[gw].verify_key, parent, {d: keys[d].verify_key for d in devices})
        for gw, (parent, devices) in layout.items()
    }
    fleet = Fleet(
        fleet_id,
        keys[COORDINATOR].verify_key,
        gateways,
        logins=hashes,
        max_params=max_params,
        max_weight=dict(max_weight or {}),
    )
    return Members(fleet, keys, logins)


def add_members(
    fleet: Fleet,
    gateways: Layout | None = None,
    devices: Mapping[str, Sequence[str]] | None = None,
) -> Members:
    """`fleet` grown by new `gateways` (gateway -> (parent, its devices), as in
    `new_members`) and new `devices` under gateways it already has; the keys and logins of
    the new members only. An id the fleet already has (or the observer's) is refused."""
    gateways, devices = dict(gateways or {}), dict(devices or {})
    new = [*gateways, *(d for _, ds in gateways.values() for d in ds)]
    new += [d for ds in devices.values() for d in ds]
    taken = {*fleet.members, OBSERVER}
    seen: set[str] = set()
    for cid in new:
        if cid in seen:
            raise TernError(f"{brief(cid, 64)} is given twice")
        seen.add(cid)
        if is_observer(cid):
            raise TernError(f"{brief(cid, 64)}: {OBSERVER} and {OBSERVER}-* name observers")
        if cid in taken:
            raise TernError(f"{brief(cid, 64)} is already in fleet {fleet.fleet}")
    for gw in devices:
        if gw not in fleet.gateways:
            raise TernError(f"no gateway {brief(gw, 64)} in fleet {fleet.fleet}")
    keys = {cid: SigningKey.generate() for cid in new}
    logins = {cid: new_login(cid) for cid in new}
    entries = dict(fleet.gateways)
    for gw, extra in devices.items():
        old = entries[gw]
        grown = {**old.devices, **{d: keys[d].verify_key for d in extra}}
        entries[gw] = GatewayEntry(old.key, old.parent, grown)
    for gw, (parent, ds) in gateways.items():
        entries[gw] = GatewayEntry(keys[gw].verify_key, parent, {d: keys[d].verify_key for d in ds})
    hashes = {**fleet.logins, **{cid: hash_password(lg.password) for cid, lg in logins.items()}}
    # Fleet checks the result whole: parents that exist, no cycle, no id twice, bounds
    return Members(replace(fleet, gateways=entries, logins=hashes), keys, logins)


def add_observer(fleet: Fleet, name: str) -> tuple[Fleet, Login]:
    """`fleet` with one more read-only login, ``observer-NAME``, and that login: one per
    dashboard or viewer, so they do not share a client id on a broker that binds client
    ids to user names (Mosquitto)."""
    user = observer_name(name)
    if user in fleet.logins:
        raise TernError(f"fleet {fleet.fleet} already has the observer login {user}")
    login = new_login(user)
    return replace(fleet, logins={**fleet.logins, user: hash_password(login.password)}), login
