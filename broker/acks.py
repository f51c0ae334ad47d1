"""Acknowledgements (PUBACK, SUBACK) that callers of the transport wait for."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["Ack", "Acks"]


@dataclass(slots=True)
class Ack:
    event: threading.Event = field(default_factory=threading.Event)
    ok: bool = True


class Acks:
    """Acknowledgements (PUBACK, SUBACK) that callers wait for, by packet id.

    paho can process an acknowledgement on its thread before `publish()` has even
    returned the packet id to the caller, so an ack nobody waits for is kept while a
    registration is in progress (and only then, so the set stays small).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, Ack] = {}
        self._early: dict[int, bool] = {}
        self._opening = 0

    def begin(self) -> None:
        with self._lock:
            self._opening += 1

    def register(self, mid: int) -> Ack:
        ack = Ack()
        with self._lock:
            if mid in self._early:
                ack.ok = self._early.pop(mid)
                ack.event.set()
            else:
                self._waiting[mid] = ack
            self._end()
        return ack

    def cancel(self) -> None:
        with self._lock:
            self._end()

    def forget(self, mid: int) -> None:
        with self._lock:
            self._waiting.pop(mid, None)

    def ack(self, mid: int, ok: bool) -> bool:
        """Record the ack of `mid`; True when somebody was waiting for it."""
        with self._lock:
            ack = self._waiting.pop(mid, None)
            if ack is None:
                if self._opening:
                    self._early[mid] = ok
                return False
        ack.ok = ok
        ack.event.set()
        return True

    def _end(self) -> None:
        self._opening -= 1
        if self._opening == 0:
            self._early.clear()
