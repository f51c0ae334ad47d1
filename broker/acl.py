"""Who may connect to a broker, and publish or subscribe on it: a pure policy.

No amqtt and no I/O here: `broker.access` applies a policy on a running broker (through
the amqtt plugin in `broker.plugins`), and the gateway builds its policy from its
boards file (`gateway.access`). Each check returns ``None`` to allow, or the reason it
refuses.

Deny by default, where a policy speaks: a user name that no account has is refused,
an account publishes and subscribes only where it is listed, and a reserved topic is
published only by its owners. What a policy does not mention stays open to anonymous
clients when `allow_anonymous` is set (devices and dashboards, whose updates are
signed anyway).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

__all__ = [
    "AccessPolicy",
    "Account",
    "Refusal",
    "check_connect",
    "check_publish",
    "check_subscribe",
]


class Refusal(StrEnum):
    """Why a client was refused; the names are the keys of the refusal counters."""

    ANONYMOUS = "anonymous"  # no user name, and the policy wants one
    UNKNOWN_USER = "unknown_user"
    BAD_PASSWORD = "bad_password"
    CLIENT_ID = "client_id_reserved"  # the client id belongs to another user
    PUBLISH = "publish_denied"
    SUBSCRIBE = "subscribe_denied"
    WILL = "will_denied"  # a last will on a topic the client may not publish on


@dataclass(frozen=True, slots=True)
class Account:
    """A user that logs in with a password.

    `publish` lists the concrete topics it may publish on, `subscribe` the filters it
    may subscribe to (exactly as written); ``None`` leaves that side unrestricted,
    except for topics reserved to other users.
    """

    password: str = field(repr=False)
    publish: frozenset[str] | None = None
    subscribe: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Accounts, topics only some users may publish on, and client ids bound to a user.

    `reserved` maps a concrete topic to the users that alone may publish on it;
    `reserved_prefixes` does the same for every topic under a prefix ending in ``/``.
    `client_ids` maps a client id to the one user that may connect with it (so that
    nobody can take over a board's session by reusing its client id).
    """

    accounts: Mapping[str, Account] = field(default_factory=dict)
    reserved: Mapping[str, frozenset[str]] = field(default_factory=dict)
    reserved_prefixes: Mapping[str, frozenset[str]] = field(default_factory=dict)
    client_ids: Mapping[str, str] = field(default_factory=dict)
    allow_anonymous: bool = True

    def __post_init__(self) -> None:
        for prefix in self.reserved_prefixes:
            if not prefix.endswith("/"):
                raise ValueError(f"a reserved prefix ends with '/': {prefix!r}")
        for name in ("accounts", "reserved", "reserved_prefixes", "client_ids"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


def check_connect(
    policy: AccessPolicy,
    client_id: str,
    user: str | None,
    password: str | None,
    will_topic: str | None = None,
) -> Refusal | None:
    """Whether a CONNECT with these credentials (and this last will) may come in.

    The broker publishes a will without asking the topic check, so it is checked here:
    a client may leave a will only where it may publish.
    """
    owner = policy.client_ids.get(client_id)
    if not user:
        if owner is not None:
            return Refusal.CLIENT_ID
        if not policy.allow_anonymous:
            return Refusal.ANONYMOUS
    else:
        account = policy.accounts.get(user)
        if account is None:
            return Refusal.UNKNOWN_USER
        given = (password or "").encode()
        if not hmac.compare_digest(given, account.password.encode()):
            return Refusal.BAD_PASSWORD
        if owner is not None and owner != user:
            return Refusal.CLIENT_ID
    if will_topic is not None and check_publish(policy, user or None, will_topic) is not None:
        return Refusal.WILL
    return None


def check_publish(policy: AccessPolicy, user: str | None, topic: str) -> Refusal | None:
    """Whether `user` (``None``: anonymous) may publish on the concrete `topic`."""
    owners = policy.reserved.get(topic)
    if owners is None:
        owners = _owners_by_prefix(policy, topic)
    if owners is not None and user not in owners:
        return Refusal.PUBLISH
    account = policy.accounts.get(user) if user else None
    if account is not None and account.publish is not None and topic not in account.publish:
        return Refusal.PUBLISH
    return None


def check_subscribe(policy: AccessPolicy, user: str | None, topic_filter: str) -> Refusal | None:
    """Whether `user` may subscribe to `topic_filter`; a listed account only as listed."""
    account = policy.accounts.get(user) if user else None
    listed = None if account is None else account.subscribe
    return Refusal.SUBSCRIBE if listed is not None and topic_filter not in listed else None


def _owners_by_prefix(policy: AccessPolicy, topic: str) -> frozenset[str] | None:
    for prefix, owners in policy.reserved_prefixes.items():
        if topic.startswith(prefix):
            return owners
    return None
