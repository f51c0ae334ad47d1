"""The same broker rights for Mosquitto: ``password_file``, ``acl_file`` and ``mosquitto.conf``.

`tern mosquitto-config` writes them from a fleet's `broker.fleet_access.broker_policy`,
so a fleet runs on Mosquitto with the rights the embedded broker enforces:

- every member logs in with its ``<id>.login`` (the same ``$7$`` PBKDF2-SHA512 hash is in
  the fleet file and in ``password_file``); anonymous clients are refused;
- ``use_username_as_clientid`` makes a client's id its user name, so nobody can take a
  member's client id (and its session) without its password;
- ``acl_file`` grants ``write`` on each publish filter, ``read`` on each subscribe filter,
  and ``deny`` on each denied topic (Mosquitto puts deny lines first, so they win).

What Mosquitto cannot say: it has no per-topic retain right (whoever may write a topic may
retain on it), it grants every subscription and filters each delivery by the read rights
instead of refusing the SUBSCRIBE, and a ``deny`` line also hides the topic from that user's
subscriptions (no account here reads a topic it is denied).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from broker.acl import AccessPolicy, Account
from broker.errors import BrokerConfigError
from broker.fleet_access import broker_policy, max_packet_bytes
from broker.lifecycle import write_atomic
from tern.fleet import COORDINATOR, Fleet

if TYPE_CHECKING:
    from gateway.boards import Boards

__all__ = [
    "MosquittoFiles",
    "acl_file_text",
    "mosquitto_conf_text",
    "password_file_text",
    "write_mosquitto_config",
]

MAX_QUEUED_MESSAGES = 10_000
MAX_INFLIGHT_MESSAGES = 64
MIN_CONNECTIONS = 1024


@dataclass(frozen=True, slots=True)
class MosquittoFiles:
    """Where `write_mosquitto_config` put each file."""

    conf: Path
    password_file: Path
    acl_file: Path
    persistence: Path


def password_file_text(policy: AccessPolicy) -> str:
    """``user:$7$...`` for every account, sorted by user."""
    _check_expressible(policy)
    return "".join(f"{user}:{policy.accounts[user].secret}\n" for user in sorted(policy.accounts))


def acl_file_text(policy: AccessPolicy) -> str:
    """One ``user`` block per account: its deny, readwrite, write and read lines."""
    _check_expressible(policy)
    blocks = [
        "# Broker rights written by `tern mosquitto-config` from the fleet file: regenerate,\n"
        "# do not edit. No line before the first `user` line: anonymous clients get nothing.\n"
    ]
    for user in sorted(policy.accounts):
        blocks.append(_acl_block(user, policy.accounts[user]))
    return "\n".join(blocks)


def _acl_block(user: str, account: Account) -> str:
    rights = account.rights
    publish, subscribe = set(rights.publish), set(rights.subscribe)
    lines = [f"user {user}"]
    lines += [f"topic deny {t}" for t in rights.deny]
    lines += [f"topic readwrite {t}" for t in rights.publish if t in subscribe]
    lines += [f"topic write {t}" for t in rights.publish if t not in subscribe]
    lines += [f"topic read {t}" for t in rights.subscribe if t not in publish]
    return "\n".join(lines) + "\n"


def _check_expressible(policy: AccessPolicy) -> None:
    if policy.anonymous is not None:
        raise BrokerConfigError("a policy with anonymous rights: Mosquitto here refuses them")
    for user, account in policy.accounts.items():
        if not user or any(c.isspace() or c in ":#+" for c in user):
            raise BrokerConfigError(f"user {user!r} cannot be written to a Mosquitto file")
        for t in (*account.rights.publish, *account.rights.subscribe, *account.rights.deny):
            if any(c.isspace() for c in t):
                raise BrokerConfigError(f"a filter of user {user!r} has white space")


def mosquitto_conf_text(
    fleet: Fleet,
    broker: str,
    directory: Path,
    *,
    host: str,
    port: int,
    accounts: int,
) -> str:
    """``mosquitto.conf`` for `broker` of `fleet`, its files in `directory` (absolute)."""
    directory = directory.resolve()
    listener = f"listener {port} {host}" if host else f"listener {port}"
    connections = max(MIN_CONNECTIONS, 4 * accounts)
    return f"""\
# Mosquitto (2.0 or later) for the {broker} broker of tern fleet {fleet.fleet}: written by
# `tern mosquitto-config`. Regenerate it when the fleet file or the boards file changes,
# then send mosquitto SIGHUP: it reads password_file and acl_file again.
per_listener_settings false
{listener}

# Every client logs in with its tern login; anonymous clients get nothing.
allow_anonymous false
password_file {directory / "password_file"}
acl_file {directory / "acl_file"}
# A client's id is its user name: nobody can take over a member's session by using its
# client id without its password (tern's own client ids are replaced by the user name).
use_username_as_clientid true

# Retained models, schedules, kernels, statuses and metrics survive a restart of this
# broker, so devices that reconnect find the current model at once instead of waiting for
# the next round; Mosquitto writes the file at shutdown and every autosave_interval s.
persistence true
persistence_location {directory / "data"}/
autosave_interval 300

# The default (1000) silently drops QoS 1 messages queued for a slow subscriber, and a
# gateway receiving a burst of device updates is one.
max_queued_messages {MAX_QUEUED_MESSAGES}
# QoS 1 messages on their way to one client before it acknowledges them.
max_inflight_messages {MAX_INFLIGHT_MESSAGES}
# Small MQTT packets otherwise wait ~40 ms for Nagle's algorithm.
set_tcp_nodelay true
# The largest model the fleet accepts (max_params = {fleet.max_params}: 4 bytes a
# parameter) plus framing, or a 1 MiB kernel: nothing larger is read into memory.
max_packet_size {max_packet_bytes(fleet)}
# Each login holds at most one connection (its user name is its client id); the rest is
# head room for reconnects, so a flood of connections cannot exhaust file descriptors.
max_connections {connections}
"""


def write_mosquitto_config(
    fleet: Fleet,
    out: Path,
    *,
    broker: str = COORDINATOR,
    boards: Boards | None = None,
    host: str = "0.0.0.0",
    port: int = 1883,
) -> MosquittoFiles:
    """Write ``mosquitto.conf``, ``password_file`` (0600), ``acl_file`` and the
    persistence directory ``data/`` into `out`, for `broker` of `fleet`."""
    if not 0 < port <= 65535:
        raise BrokerConfigError(f"port {port} is not in 1..65535")
    if any(c.isspace() for c in host):
        raise BrokerConfigError("a host has no white space")
    policy = broker_policy(fleet, broker, boards)
    out.mkdir(parents=True, exist_ok=True)
    files = MosquittoFiles(
        out / "mosquitto.conf", out / "password_file", out / "acl_file", out / "data"
    )
    files.persistence.mkdir(mode=0o700, exist_ok=True)
    write_atomic(files.password_file, password_file_text(policy).encode("utf-8"))
    write_atomic(files.acl_file, acl_file_text(policy).encode("utf-8"))
    conf = mosquitto_conf_text(
        fleet, broker, out, host=host, port=port, accounts=len(policy.accounts)
    )
    write_atomic(files.conf, conf.encode("utf-8"))
    os.chmod(files.conf, 0o644)  # no secret in it; the other two stay 0600
    return files
