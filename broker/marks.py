"""A gateway's or a device's high-water marks on disk (tern.freshness.Watermarks).

One small JSON file, written atomically whenever a mark moves, so a restarted
component still refuses every model and schedule older than the last it accepted.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from broker.lifecycle import write_atomic
from tern.errors import TernError
from tern.freshness import Watermarks

__all__ = ["MarkFile", "MarksError", "add_state_dir_argument", "default_state_dir"]

log = logging.getLogger(__name__)

_MAX_BYTES = 4096


class MarksError(Exception):
    """The marks file exists but cannot be read or trusted."""


def default_state_dir(fleet: str, component: str) -> Path:
    """``$XDG_STATE_HOME/tern/<fleet>/<component>`` (``~/.local/state/...`` by default)."""
    root = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(root) / "tern" / fleet / component


def add_state_dir_argument(p: argparse.ArgumentParser) -> None:
    """`--state-dir`, as a gateway and a device take it."""
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where its high-water marks survive restarts"
        " (default: $XDG_STATE_HOME/tern/FLEET/ID, ~/.local/state/tern/FLEET/ID)",
    )


class MarkFile:
    """`marks.json` in `directory`; `directory` None keeps the marks in memory only."""

    def __init__(self, directory: Path | None) -> None:
        self.path = None if directory is None else Path(directory) / "marks.json"

    def load(self) -> Watermarks:
        """The saved marks; none when there is no file. MarksError for a damaged one:
        starting over from nothing would accept replays, so the component refuses to
        start (delete the file to accept anything the coordinator signed again)."""
        if self.path is None or not self.path.exists():
            return Watermarks()
        try:
            data = self.path.read_bytes()
            if len(data) > _MAX_BYTES:
                raise MarksError(f"{self.path} is larger than {_MAX_BYTES} bytes")
            return Watermarks.from_json(data.decode("utf-8"))
        except (OSError, UnicodeDecodeError, TernError) as exc:
            raise MarksError(f"cannot read the high-water marks {self.path}: {exc}") from exc

    def save(self, marks: Watermarks) -> None:
        """Write `marks`. A failed write is logged, not raised: the marks in memory still
        hold, and the next mark that moves writes them again."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, marks.to_json().encode())
        except OSError as exc:
            log.error("high-water marks not saved to %s: %s", self.path, exc)
