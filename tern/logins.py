"""Broker logins of a fleet's members: user names, passwords and their hashes. Pure, no I/O.

`tern fleet init` makes a `Login` for every member (and the read-only observer) and writes
it next to the member's key (``<id>.login``); the fleet file keeps only the hash. The hash
is Mosquitto's PBKDF2-SHA512 format, so the same string goes into fleet.json, into the
embedded broker's policy and into Mosquitto's ``password_file``::

    $7$<iterations>$<base64 of a 12-byte salt>$<base64 of the 64-byte PBKDF2-SHA512 hash>

Passwords are 256 random bits, so the low iteration count Mosquitto uses by default (101)
costs an attacker nothing useful: there is no dictionary to try.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field

from tern.errors import MalformedMessage, TernError
from tern.jsontext import parse_json
from tern.topics import validate_id

__all__ = [
    "DEFAULT_ITERATIONS",
    "MAX_ITERATIONS",
    "OBSERVER",
    "Login",
    "check_password",
    "hash_password",
    "is_observer",
    "is_password_hash",
    "new_login",
    "observer_name",
]

OBSERVER = "observer"  # the read-only login for dashboards; no member may use this id


def is_observer(user: str) -> bool:
    """`observer`, or one viewer's own read-only login `observer-NAME` (tern fleet
    add-observer): a broker that binds client ids to user names (Mosquitto) lets one
    connection per login, so each dashboard or `tern watch` can have its own."""
    return user == OBSERVER or user.startswith(OBSERVER + "-")


def observer_name(name: str) -> str:
    """The user name of viewer `name`'s own observer login."""
    return validate_id(f"{OBSERVER}-{name}", "observer name")


DEFAULT_ITERATIONS = 101  # what mosquitto_passwd writes
MAX_ITERATIONS = 100_000  # beyond it a hash is malformed: checking it would cost too much
SALT_BYTES = 12
HASH_BYTES = 64
MAX_PASSWORD_CHARS = 256
MAX_LOGIN_BYTES = 4096  # a login file is about 100 bytes
_PASSWORD_BYTES = 32  # 256 bits
_MAX_HASH_CHARS = 160  # "$7$100000$" + 16 + 1 + 88 characters, with room to spare
_PRINTABLE = re.compile(r"[\x21-\x7e]+")  # what a password may hold: no spaces, no controls
_ITERATIONS = re.compile(r"[1-9][0-9]{0,5}")


@dataclass(frozen=True, slots=True)
class Login:
    """A user name and its password in clear: what a component logs in with."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.username, str) or not isinstance(self.password, str):
            raise MalformedMessage("a login's username and password are strings")
        try:
            validate_id(self.username[:65], "username")
        except TernError as exc:
            raise MalformedMessage(f"login: {exc.message}") from None
        if len(self.password) > MAX_PASSWORD_CHARS or not _PRINTABLE.fullmatch(self.password):
            raise MalformedMessage(
                f"a login's password is 1-{MAX_PASSWORD_CHARS} printable ASCII characters"
            )

    def to_json(self) -> str:
        return json.dumps({"password": self.password, "username": self.username}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Login:
        """Parse ``{"username": .., "password": ..}``; MalformedMessage for anything else."""
        if not isinstance(text, str) or len(text) > MAX_LOGIN_BYTES:
            raise MalformedMessage(f"a login is a JSON text of at most {MAX_LOGIN_BYTES} bytes")
        doc = parse_json(text, "a login", MAX_LOGIN_BYTES)
        if set(doc) != {"username", "password"}:
            raise MalformedMessage("a login is an object with exactly username and password")
        return cls(doc["username"], doc["password"])


def new_login(username: str) -> Login:
    """A fresh login for `username`: 256 random bits as URL-safe text."""
    return Login(username, secrets.token_urlsafe(_PASSWORD_BYTES))


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> str:
    """`password` in Mosquitto's ``$7$`` PBKDF2-SHA512 format (a random salt if none given)."""
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    if len(salt) != SALT_BYTES:
        raise ValueError(f"the salt is {SALT_BYTES} bytes, not {len(salt)}")
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be in 1..{MAX_ITERATIONS}")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, HASH_BYTES)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def check_password(hashed: str, password: str) -> bool:
    """Whether `password` hashes to `hashed`. Constant time in the comparison; False for a
    malformed hash or password, never raises; at most MAX_ITERATIONS rounds of work."""
    parsed = _parse(hashed)
    if parsed is None or not isinstance(password, str) or len(password) > 65535:
        return False
    iterations, salt, expected = parsed
    try:
        given = password.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no hash was ever made of it
        return False
    digest = hashlib.pbkdf2_hmac("sha512", given, salt, iterations, HASH_BYTES)
    return hmac.compare_digest(digest, expected)


def is_password_hash(text: object) -> bool:
    """Whether `text` is a well-formed ``$7$`` hash that `check_password` would accept."""
    return _parse(text) is not None


def _parse(hashed: object) -> tuple[int, bytes, bytes] | None:
    if not isinstance(hashed, str) or len(hashed) > _MAX_HASH_CHARS:
        return None
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        return None
    if not _ITERATIONS.fullmatch(parts[2]) or int(parts[2]) > MAX_ITERATIONS:
        return None
    try:
        salt = base64.b64decode(parts[3], validate=True)
        digest = base64.b64decode(parts[4], validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(salt) != SALT_BYTES or len(digest) != HASH_BYTES:
        return None
    return int(parts[2]), salt, digest


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
