"""Who may connect to a broker, and publish, retain or subscribe on it: a pure policy.

No amqtt and no I/O here: `broker.access` applies a policy on a running broker (through
the amqtt plugin in `broker.plugins`), `broker.fleet_access` builds a fleet's policy for
each of its brokers, and `broker.mosquitto_config` writes the same policy for Mosquitto.
Each check returns ``None`` to allow, or the reason it refuses.

Deny by default: a client without a user name is refused unless the policy gives
anonymous clients rights; an account publishes, retains and subscribes only where its
filters say (MQTT filter semantics, ``+`` and ``#``); a client id reserved for one user is
refused to everyone else.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from tern.logins import check_password

__all__ = [
    "NOTHING",
    "AccessPolicy",
    "Account",
    "Refusal",
    "Rights",
    "check_connect",
    "check_publish",
    "check_subscribe",
    "covers",
    "is_filter",
    "is_topic",
    "matches",
]

_MAX_TOPIC_CHARS = 65535  # MQTT's limit on a UTF-8 string, in bytes; chars are at most that


class Refusal(StrEnum):
    """Why a client was refused; the values are the keys of the refusal counters."""

    ANONYMOUS = "anonymous"  # no user name, and the policy wants one
    UNKNOWN_USER = "unknown_user"
    BAD_PASSWORD = "bad_password"
    CLIENT_ID = "client_id_reserved"  # the client id belongs to another user
    PUBLISH = "publish_denied"
    SUBSCRIBE = "subscribe_denied"
    RETAIN = "retain_denied"  # may publish on the topic, but not keep it retained
    WILL = "will_denied"  # a last will the client could not publish (or retain) itself


def is_topic(topic: object) -> bool:
    """Whether `topic` is a topic a client may publish on: no wildcards, not empty."""
    return (
        isinstance(topic, str)
        and 0 < len(topic) <= _MAX_TOPIC_CHARS
        and "+" not in topic
        and "#" not in topic
        and "\x00" not in topic
    )


def is_filter(topic_filter: object) -> bool:
    """Whether `topic_filter` is a valid subscription filter (MQTT 3.1.1, 4.7.1)."""
    if not isinstance(topic_filter, str) or not 0 < len(topic_filter) <= _MAX_TOPIC_CHARS:
        return False
    if "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


@functools.lru_cache(maxsize=1 << 16)
def _valid_filter(topic_filter: str) -> bool:
    # Remembered: a fleet's gateways share most of their (long) deny lists.
    return is_filter(topic_filter)


def matches(topic_filter: str, topic: str) -> bool:
    """Whether the concrete `topic` falls under `topic_filter` (MQTT 3.1.1, 4.7).

    ``+`` matches one whole level, ``#`` the level it stands on and everything below
    (``a/#`` matches ``a``); a filter starting with a wildcard does not match a topic
    starting with ``$``. False when either is not valid.
    """
    if not is_filter(topic_filter) or not is_topic(topic):
        return False
    return _matches(topic_filter.split("/"), topic.split("/"))


def _matches(wanted: list[str], levels: list[str]) -> bool:
    if levels[0].startswith("$") and wanted[0] in ("+", "#"):
        return False
    for i, w in enumerate(wanted):
        if w == "#":
            return True
        if i >= len(levels) or (w != "+" and w != levels[i]):
            return False
    return len(wanted) == len(levels)


def covers(allowed: str, requested: str) -> bool:
    """Whether every topic that filter `requested` can match, filter `allowed` matches too.

    ``tern/f/#`` covers ``tern/f/status/+``; ``tern/f/+/x`` does not cover
    ``tern/f/#``, and ``tern/f/status/+`` does not cover ``tern/f/status/#`` (which also
    matches ``tern/f/status``). False when either is not a valid filter. Sound, not
    complete: it may answer False for an equivalent pair written differently (``+/#``
    and ``#``), never True for a pair that is not covered.
    """
    if not is_filter(allowed) or not is_filter(requested):
        return False
    a, r = allowed.split("/"), requested.split("/")
    if r[0].startswith("$") and a[0] in ("+", "#"):
        return False
    for i, level in enumerate(a):
        if level == "#":
            return True
        if i >= len(r):
            return False  # `requested` is shorter: `allowed` needs more levels
        if r[i] == "#":
            return False  # `requested` also matches the parent and deeper levels
        if level != "+" and r[i] != level:
            return False  # a literal level covers only itself, not '+'
    return len(r) == len(a)  # if `requested` is longer, `allowed` misses its deeper topics


class _Filters:
    """Filters split for speed and memory: concrete topics in a sorted tuple (searched by
    bisection), wildcard filters split into levels. A child gateway's deny list names
    every other member of the fleet; given sorted, as `broker.fleet_access` does, it is
    kept as it is, not copied."""

    __slots__ = ("exact", "wild")

    def __init__(self, filters: tuple[str, ...]) -> None:
        exact = [f for f in filters if is_topic(f)]
        if len(exact) == len(filters) and all(a < b for a, b in itertools.pairwise(filters)):
            self.exact: tuple[str, ...] = filters
        else:
            self.exact = tuple(sorted(set(exact)))
        self.wild = tuple(f.split("/") for f in filters if not is_topic(f))

    def match(self, topic: str) -> bool:
        """`topic` must be valid (`is_topic`)."""
        i = bisect.bisect_left(self.exact, topic)
        if i < len(self.exact) and self.exact[i] == topic:
            return True
        if not self.wild:
            return False
        levels = topic.split("/")
        return any(_matches(w, levels) for w in self.wild)


@dataclass(frozen=True, slots=True, repr=False)
class Rights:
    """Filters: where a client may publish, retain and subscribe.

    Publishing on a topic needs a matching `publish` filter and no matching `deny`
    filter; a retained publish also needs a matching `retain` filter. Subscribing to a
    filter needs a `subscribe` filter that covers it (`deny` applies to publishing only).
    """

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    retain: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    _publish: _Filters = field(init=False, repr=False, compare=False)
    _retain: _Filters = field(init=False, repr=False, compare=False)
    _deny: _Filters = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("publish", "subscribe", "retain", "deny"):
            filters = tuple(getattr(self, name))
            bad = [f for f in filters if not _valid_filter(f)]
            if bad:
                raise ValueError(f"{len(bad)} {name} filter(s) are not valid MQTT filters")
            object.__setattr__(self, name, filters)
        object.__setattr__(self, "_publish", _Filters(self.publish))
        object.__setattr__(self, "_retain", _Filters(self.retain))
        object.__setattr__(self, "_deny", _Filters(self.deny))

    def __repr__(self) -> str:  # a child gateway's deny list names every other member
        deny = repr(self.deny) if len(self.deny) <= 4 else f"<{len(self.deny)} filters>"
        return (
            f"Rights(publish={self.publish!r}, subscribe={self.subscribe!r},"
            f" retain={self.retain!r}, deny={deny})"
        )

    def may_publish(self, topic: str) -> bool:
        return is_topic(topic) and self._publish.match(topic) and not self._deny.match(topic)

    def may_retain(self, topic: str) -> bool:
        return self.may_publish(topic) and self._retain.match(topic)

    def may_subscribe(self, topic_filter: str) -> bool:
        return any(covers(f, topic_filter) for f in self.subscribe)


NOTHING = Rights()


@dataclass(frozen=True, slots=True)
class Account:
    """A user that logs in with a password whose `tern.logins` hash is `secret`.

    `client_ids`: the client ids it may connect with; ``None``: any client id that is
    not reserved for another user.
    """

    secret: str = field(repr=False)
    rights: Rights
    client_ids: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Accounts by user name, client ids reserved for one user each, and what anonymous
    clients may do (``None``: an anonymous CONNECT is refused)."""

    accounts: Mapping[str, Account] = field(default_factory=dict)
    reserved_client_ids: Mapping[str, str] = field(default_factory=dict)
    anonymous: Rights | None = None

    def __post_init__(self) -> None:
        for name in ("accounts", "reserved_client_ids"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        for user, account in self.accounts.items():
            for client_id in account.client_ids or ():
                if self.reserved_client_ids.get(client_id, user) != user:
                    raise ValueError(f"user {user!r} may use a client id reserved for another")

    def rights(self, user: str | None) -> Rights | None:
        """What `user` may do (``None`` user: anonymous); None when nothing at all."""
        if not user:
            return self.anonymous
        account = self.accounts.get(user)
        return None if account is None else account.rights


def check_connect(
    policy: AccessPolicy,
    client_id: str,
    user: str | None,
    password: str | None,
    will_topic: str | None = None,
    will_retain: bool = False,
) -> Refusal | None:
    """Whether a CONNECT with these credentials (and this last will) may come in.

    The broker publishes a will without asking the topic checks, so it is checked here:
    a client may leave a will only where it may publish, and retain it.
    """
    owner = policy.reserved_client_ids.get(client_id)
    if not user:
        if policy.anonymous is None:
            return Refusal.ANONYMOUS
        if owner is not None:
            return Refusal.CLIENT_ID
    else:
        account = policy.accounts.get(user)
        if account is None:
            return Refusal.UNKNOWN_USER
        if password is None or not check_password(account.secret, password):
            return Refusal.BAD_PASSWORD
        if owner is not None and owner != user:
            return Refusal.CLIENT_ID
        if account.client_ids is not None and client_id not in account.client_ids:
            return Refusal.CLIENT_ID
    if will_topic is not None and check_publish(policy, user, will_topic, will_retain):
        return Refusal.WILL
    return None


def check_publish(
    policy: AccessPolicy, user: str | None, topic: str, retain: bool = False
) -> Refusal | None:
    """Whether `user` (``None``: anonymous) may publish on the concrete `topic`, and keep
    it retained when `retain`."""
    rights = policy.rights(user)
    if rights is None or not rights.may_publish(topic):
        return Refusal.PUBLISH
    if retain and not rights.may_retain(topic):
        return Refusal.RETAIN
    return None


def check_subscribe(policy: AccessPolicy, user: str | None, topic_filter: str) -> Refusal | None:
    """Whether `user` (``None``: anonymous) may subscribe to `topic_filter`."""
    rights = policy.rights(user)
    if rights is None or not rights.may_subscribe(topic_filter):
        return Refusal.SUBSCRIBE
    return None
