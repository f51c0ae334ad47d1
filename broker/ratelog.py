"""Refusal logging that a flood cannot turn into a log flood.

A receiver counts every refusal exactly (metrics), but logs a given client's refusals
for one reason at most once per period: the first one, and then, once the period has
passed, one line saying how many were held back in between.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LogLimiter"]


@dataclass(slots=True)
class _Entry:
    last: float
    held: int = 0


class LogLimiter:
    """At most one log line per (client, reason) per `period` seconds. Thread-safe.

    Memory is bounded: at most `max_keys` (client, reason) pairs are remembered; when
    a flood of distinct client ids fills the table, entries older than `period` are
    dropped, and if none are, further new pairs are not logged (still counted by the
    caller) until some expire.
    """

    def __init__(
        self,
        period: float = 60.0,
        *,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if period <= 0 or max_keys < 1:
            raise ValueError("period must be > 0 and max_keys >= 1")
        self.period = period
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self.suppressed = 0  # lines not written, in all

    def allow(self, client: str, reason: str) -> int | None:
        """None: do not log now. Otherwise log, mentioning the returned number of
        refusals of this pair held back since its last line (0 the first time)."""
        now = self._clock()
        key = (client[:128], reason[:64])
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if now - entry.last < self.period:
                    entry.held += 1
                    self.suppressed += 1
                    return None
                held, entry.last, entry.held = entry.held, now, 0
                return held
            if len(self._entries) >= self.max_keys:
                self._forget_older_than(now - self.period)
                if len(self._entries) >= self.max_keys:
                    self.suppressed += 1
                    return None
            self._entries[key] = _Entry(now)
            return 0

    def log(
        self,
        logger: logging.Logger,
        client: str,
        reason: str,
        message: str,
        *args: object,
        level: int = logging.WARNING,
    ) -> bool:
        """`logger.log(level, message % args)` if `allow(client, reason)`; True when written."""
        held = self.allow(client, reason)
        if held is None:
            return False
        if held:
            logger.log(level, message + " (and %d more like it in the last %g s)", *args, held,
                       self.period)  # fmt: skip
        else:
            logger.log(level, message, *args)
        return True

    def _forget_older_than(self, cutoff: float) -> None:
        for key in [k for k, e in self._entries.items() if e.last < cutoff]:
            del self._entries[key]
