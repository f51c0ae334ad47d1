"""The same broker rights for Mosquitto: ``password_file``, ``acl_file`` and ``mosquitto.conf``.

`tern mosquitto-config` writes them from a fleet's `broker.fleet_access.broker_policy`,
so a fleet runs on Mosquitto with the rights the embedded broker enforces:

- every member logs in with its ``<id>.login`` (the same ``$7$`` PBKDF2-SHA512 hash is in
  the fleet file and in ``password_file``); anonymous clients are refused;
- ``use_username_as_clientid`` makes a client's id its user name, so nobody can take a
  member's client id (and its session) without its password;
- ``acl_file`` grants ``write`` on each publish filter, ``read`` on each subscribe filter,
  and ``deny`` on each denied topic (Mosquitto puts deny lines first, so they win);
- optionally TLS (1.2 or later, the fleet CA's server certificate for this broker, client
  certificates with ``--require-client-cert``), MQTT over WebSockets, and a plaintext
  listener on loopback for development. ``per_listener_settings false`` makes the logins
  and the ACL apply to every listener alike.

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
from tern.pki import CA_CERT, server_files

if TYPE_CHECKING:
    from gateway.boards import Boards

__all__ = [
    "Listeners",
    "MosquittoFiles",
    "acl_file_text",
    "mosquitto_conf_text",
    "password_file_text",
    "write_mosquitto_config",
]

MAX_QUEUED_MESSAGES = 10_000
MAX_INFLIGHT_MESSAGES = 64
MIN_CONNECTIONS = 1024
TLS_MIN_VERSION = "tlsv1.2"  # Mosquitto 2.0: the lowest version the listener accepts
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Listeners:
    """The listeners of a broker beside its main one on `port`.

    `tls_dir`: serve TLS on the main listener (and the WebSockets one) with the fleet
    directory's ``ca.crt`` and ``{broker}.server.crt/.key``; `require_client_cert`: also
    require a client certificate from the fleet CA (logins still apply); `ws_port`: MQTT
    over WebSockets; `plain_port`: plaintext MQTT on loopback only, for development."""

    tls_dir: Path | None = None
    require_client_cert: bool = False
    ws_port: int | None = None
    plain_port: int | None = None


@dataclass(frozen=True, slots=True)
class MosquittoFiles:
    """Where `write_mosquitto_config` put each file."""

    conf: Path
    password_file: Path
    acl_file: Path
    persistence: Path
    tls: tuple[Path, ...] = ()  # ca.crt, the server certificate and its key (0600)


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
    listeners: Listeners | None = None,
) -> str:
    """``mosquitto.conf`` for `broker` of `fleet`, its files in `directory` (absolute;
    with TLS, the certificates too, as `write_mosquitto_config` copies them there)."""
    directory = directory.resolve()
    extra = listeners or Listeners()
    connections = max(MIN_CONNECTIONS, 4 * accounts)
    tls: list[str] = []
    if extra.tls_dir is not None:
        cert, key = server_files(broker)
        tls = [
            f"cafile {directory / CA_CERT}",
            f"certfile {directory / cert}",
            f"keyfile {directory / key}",
            f"tls_version {TLS_MIN_VERSION}",
        ]
        if extra.require_client_cert:
            tls += [
                "# Mutual TLS: a certificate from the fleet CA, and the login still applies.",
                "require_certificate true",
                "use_identity_as_username false",
            ]
    secure = " with TLS" if tls else ""
    blocks = [_listener(f"The fleet's listener{secure}:", port, host, "mqtt", connections, tls)]
    if extra.ws_port is not None:
        title = f"MQTT over WebSockets{secure}, for browsers (any path, e.g. /mqtt):"
        blocks.append(_listener(title, extra.ws_port, host, "websockets", connections, tls))
    if extra.plain_port is not None:
        title = "Plaintext MQTT on loopback only, for development on this machine:"
        blocks.append(_listener(title, extra.plain_port, LOOPBACK, "mqtt", connections, []))
    return f"""\
# Mosquitto (2.0 or later) for the {broker} broker of tern fleet {fleet.fleet}: written by
# `tern mosquitto-config`. Regenerate it when the fleet file or the boards file changes,
# then send mosquitto SIGHUP: it reads password_file and acl_file again.
# One set of logins and rights for every listener below: with per_listener_settings false,
# allow_anonymous, password_file and acl_file are global. Listener options (protocol, TLS,
# use_username_as_clientid, max_connections) belong to the listener line above them.
per_listener_settings false

# Every client logs in with its tern login; anonymous clients get nothing.
allow_anonymous false
password_file {directory / "password_file"}
acl_file {directory / "acl_file"}

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

# On every listener: a client's id is its user name (use_username_as_clientid), so nobody
# can take over a member's session by using its client id without its password (tern's own
# client ids are replaced); and max_connections: each login holds one connection, the rest
# is head room for reconnects, so a flood of connections cannot exhaust file descriptors.
{"".join(blocks)}"""


def _listener(
    title: str, port: int, host: str, protocol: str, connections: int, tls: list[str]
) -> str:
    lines = [
        "",
        f"# {title}",
        f"listener {port} {host}" if host else f"listener {port}",
        f"protocol {protocol}",
        "use_username_as_clientid true",
        f"max_connections {connections}",
        *tls,
    ]
    return "\n".join(lines) + "\n"


def write_mosquitto_config(
    fleet: Fleet,
    out: Path,
    *,
    broker: str = COORDINATOR,
    boards: Boards | None = None,
    host: str = "0.0.0.0",
    port: int = 1883,
    listeners: Listeners | None = None,
) -> MosquittoFiles:
    """Write ``mosquitto.conf``, ``password_file`` (0600), ``acl_file`` and the
    persistence directory ``data/`` into `out`, for `broker` of `fleet`. With TLS, copy
    ``ca.crt`` and the broker's server certificate and key (0600) from the fleet directory
    into `out` too, so Mosquitto's user needs to read `out` only, never the fleet's secrets."""
    extra = listeners or Listeners()
    ports = [port, *(p for p in (extra.ws_port, extra.plain_port) if p is not None)]
    for p in ports:
        if not 0 < p <= 65535:
            raise BrokerConfigError(f"port {p} is not in 1..65535")
    if len(set(ports)) < len(ports):
        raise BrokerConfigError(f"each listener needs its own port, not {ports}")
    if any(c.isspace() for c in host):
        raise BrokerConfigError("a host has no white space")
    if extra.require_client_cert and extra.tls_dir is None:
        raise BrokerConfigError("client certificates need TLS (--tls)")
    policy = broker_policy(fleet, broker, boards)
    sources = _tls_sources(extra.tls_dir, broker) if extra.tls_dir is not None else []
    out.mkdir(parents=True, exist_ok=True)
    files = MosquittoFiles(
        out / "mosquitto.conf",
        out / "password_file",
        out / "acl_file",
        out / "data",
        tuple(out / src.name for src in sources),
    )
    files.persistence.mkdir(mode=0o700, exist_ok=True)
    for src, dst in zip(sources, files.tls, strict=True):
        write_atomic(dst, src.read_bytes())  # 0600, the key's mode; the rest is public
        if dst.suffix == ".crt":
            os.chmod(dst, 0o644)
    write_atomic(files.password_file, password_file_text(policy).encode("utf-8"))
    write_atomic(files.acl_file, acl_file_text(policy).encode("utf-8"))
    conf = mosquitto_conf_text(
        fleet,
        broker,
        out,
        host=host,
        port=port,
        accounts=len(policy.accounts),
        listeners=extra,
    )
    write_atomic(files.conf, conf.encode("utf-8"))
    os.chmod(files.conf, 0o644)  # no secret in it; the other two stay 0600
    return files


def _tls_sources(tls_dir: Path, broker: str) -> list[Path]:
    """The fleet directory's CA certificate and `broker`'s server certificate and key,
    each checked to exist (BrokerConfigError naming what is missing)."""
    sources = [tls_dir / CA_CERT, *(tls_dir / name for name in server_files(broker))]
    for src in sources:
        if not src.is_file():
            raise BrokerConfigError(
                f"{src} is missing: `tern fleet init` (or add-gateway) writes the fleet's PKI"
            )
    return sources
