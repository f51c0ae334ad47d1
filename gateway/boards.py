"""The registry of a gateway's microcontroller boards: a JSON file that holds secrets.

Each board has a 32-byte HMAC key (what its models are sealed with) and MQTT
credentials for its gateway's broker. The file is written atomically with mode 0600,
since anyone who reads it can forge models for every board it lists.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from broker.lifecycle import write_atomic
from gateway.config import GatewayError
from tern.errors import TernError, brief
from tern.mcu import KEY_BYTES
from tern.topics import validate_id

__all__ = [
    "BoardEntry",
    "Boards",
    "BoardsError",
    "load_boards",
    "new_board_entry",
    "save_boards",
]

_PASSWORD_BYTES = 16
_MAX_FILE_CHARS = 16 << 20  # about 100,000 boards


class BoardsError(GatewayError):
    """A boards file (or entry) that cannot be read, parsed or trusted."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message if path is None else f"boards file {path}: {message}")
        self.path = path


@dataclass(frozen=True, slots=True)
class BoardEntry:
    key: bytes
    mqtt_user: str
    mqtt_password: str

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise BoardsError(f"a board key is {KEY_BYTES} bytes, not {len(self.key)}")
        if not self.mqtt_user or not self.mqtt_password:
            raise BoardsError("a board needs an MQTT user and password")

    def __repr__(self) -> str:  # never put a key or password in a log line
        return f"BoardEntry(mqtt_user={self.mqtt_user!r})"


@dataclass(frozen=True, slots=True)
class Boards:
    fleet: str
    gateway: str
    boards: Mapping[str, BoardEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            validate_id(self.fleet, "fleet")
            validate_id(self.gateway, "gateway")
            for device in self.boards:
                validate_id(device, "device")
        except TernError as exc:
            raise BoardsError(str(exc)) from exc
        # Read-only, so a Boards shared between threads cannot change under a reader.
        object.__setattr__(self, "boards", MappingProxyType(dict(self.boards)))

    def with_board(self, device: str, entry: BoardEntry) -> Boards:
        """A copy with `device` added (or its entry replaced)."""
        return Boards(self.fleet, self.gateway, {**self.boards, device: entry})

    def to_json(self) -> str:
        boards = {
            d: {"key": e.key.hex(), "mqtt_user": e.mqtt_user, "mqtt_password": e.mqtt_password}
            for d, e in sorted(self.boards.items())
        }
        doc = {"fleet": self.fleet, "gateway": self.gateway, "boards": boards}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Boards:
        """Parse; BoardsError says what is wrong."""
        if len(text) > _MAX_FILE_CHARS:
            raise BoardsError(f"larger than {_MAX_FILE_CHARS} characters")
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:  # bad JSON, text not UTF-8, deep nesting
            raise BoardsError(f"not JSON: {str(exc)[:120]}") from exc
        if not isinstance(doc, dict) or set(doc) != {"fleet", "gateway", "boards"}:
            raise BoardsError("expected an object with exactly fleet, gateway and boards")
        if not isinstance(doc["fleet"], str) or not isinstance(doc["gateway"], str):
            raise BoardsError("fleet and gateway must be strings")
        if not isinstance(doc["boards"], dict):
            raise BoardsError("boards must be an object of device id -> entry")
        entries = {}
        for device, e in doc["boards"].items():
            if not isinstance(e, dict) or set(e) != {"key", "mqtt_user", "mqtt_password"}:
                raise BoardsError(
                    f"board {brief(device)} needs exactly key, mqtt_user, mqtt_password"
                )
            if not all(isinstance(v, str) for v in e.values()):
                raise BoardsError(
                    f"board {brief(device)}: key, mqtt_user, mqtt_password are strings"
                )
            try:
                key = bytes.fromhex(e["key"])
            except ValueError:
                key = b""
            if len(key) != KEY_BYTES:
                raise BoardsError(f"board {brief(device)}: key must be {2 * KEY_BYTES} hex digits")
            entries[device] = BoardEntry(key, e["mqtt_user"], e["mqtt_password"])
        return cls(doc["fleet"], doc["gateway"], entries)


def load_boards(path: str | os.PathLike[str]) -> Boards:
    """Read a boards file; BoardsError says which file and what is wrong with it."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BoardsError(f"cannot be read: {exc}", name) from exc
    try:
        return Boards.from_json(text)
    except BoardsError as exc:
        raise BoardsError(str(exc), name) from exc


def save_boards(path: str | os.PathLike[str], boards: Boards) -> None:
    """Write atomically, readable by its owner only (it holds every board's key)."""
    target = Path(os.fspath(path))
    try:
        # mkstemp creates the temporary file 0600 and the rename keeps that mode.
        write_atomic(target, boards.to_json().encode("utf-8"))
    except OSError as exc:
        raise BoardsError(f"cannot be written: {exc}", str(target)) from exc


def new_board_entry(device: str) -> BoardEntry:
    """Fresh credentials for `device`: a random key and password, the device id as user."""
    try:
        validate_id(device, "device")
    except TernError as exc:
        raise BoardsError(str(exc)) from exc
    return BoardEntry(secrets.token_bytes(KEY_BYTES), device, secrets.token_hex(_PASSWORD_BYTES))
