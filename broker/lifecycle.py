"""What every long-running tern program does the same way: logging, and stopping
cleanly on SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from nacl.signing import SigningKey

from tern.errors import MalformedMessage
from tern.fleet import Fleet
from tern.keys import signing_key_from_text
from tern.logins import MAX_LOGIN_BYTES, Login

__all__ = [
    "configure_logging",
    "load_identity",
    "load_login",
    "login_path",
    "quiet_third_party_logs",
    "stop_on_signals",
    "write_atomic",
]

_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def quiet_third_party_logs(level: int = logging.WARNING) -> None:
    """amqtt logs every connection, `transitions` every state change and websockets
    every listener at INFO; above that they drown our own lines."""
    for name in ("amqtt", "transitions", "websockets"):
        logging.getLogger(name).setLevel(level)


def configure_logging(verbose: bool = False) -> None:
    """INFO for tern's own loggers; third-party chatter only with `verbose`."""
    logging.basicConfig(level=logging.INFO, format=_FORMAT)
    if not verbose:
        quiet_third_party_logs()


@contextmanager
def stop_on_signals(log: logging.Logger) -> Iterator[threading.Event]:
    """An Event set by SIGINT or SIGTERM while the block runs; old handlers restored after.

    Wait on it with a timeout in a loop (``while not stop.wait(0.5)``): Python runs
    signal handlers on the main thread between waits.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def load_identity(fleet_file: str | Path, key_file: str | Path) -> tuple[Fleet, SigningKey]:
    """The fleet file and this component's own secret key (OSError or TernError)."""
    fleet = Fleet.from_json(Path(fleet_file).read_text(encoding="utf-8"))
    return fleet, signing_key_from_text(Path(key_file).read_text(encoding="utf-8"))


def login_path(key_file: str | Path) -> Path:
    """Where a component's broker login lives: ``<id>.login`` next to its ``<id>.key``."""
    key = Path(key_file)
    return key.with_name(f"{key.stem}.login")


def load_login(key_file: str | Path) -> Login | None:
    """The login next to `key_file`; None when there is none (OSError if it cannot be read,
    MalformedMessage when it is not a login)."""
    try:
        with login_path(key_file).open("rb") as fh:
            data = fh.read(MAX_LOGIN_BYTES + 1)
    except FileNotFoundError:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage(f"{login_path(key_file)} is not UTF-8 text") from None
    return Login.from_json(text)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the whole new one, never a
    part: a temporary file in the same directory, flushed to disk, then renamed over.
    The file is readable by its owner only (mkstemp creates it 0600): secrets rely on it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
