"""The one loop of a tern process: feeds a round machine (tern.rounds) and does its I/O.

Transport handlers, a training worker and the operator only `post` events; one thread
(`start`) takes them in order, with the timers the machine set, hands each to the
machine with the time on the injected clock, and carries out the actions it returns,
in order: publish on a link, set or cancel a timer, write a log line (rate-limited),
or anything a component registers an executor for (persist, train, a round closed).
No lock is held while the machine works, so a long fold or an evaluation never stalls
a transport's network thread.

`run_pending` does one batch of that work on the caller's thread; the in-memory fleet
(tests, benchmarks) drives many loops that way with a virtual clock, deterministically.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from broker.errors import BrokerError
from broker.ratelog import LogLimiter
from broker.transport import Message, Transport
from tern.rounds.events import (
    CancelTimer,
    Link,
    Linked,
    Note,
    Publish,
    Received,
    SetTimer,
    Subscribe,
    Timer,
    Unlinked,
    Unsubscribe,
)

__all__ = ["Loop", "Machine"]

log = logging.getLogger(__name__)

Machine = Callable[[object, float], list[object]]  # (event, now) -> actions
Executor = Callable[[Any], None]

_POLL = 0.25  # seconds: how often the loop checks its links for a reconnect


class Loop:
    """Runs `machine` for component `name`, publishing on `links`."""

    def __init__(
        self,
        name: str,
        machine: Machine,
        *,
        clock: Callable[[], float] = time.time,
        links: Mapping[Link, Transport] | None = None,
        executors: Mapping[type, Executor] | None = None,
        logger: logging.Logger = log,
    ) -> None:
        self.name = name
        self.machine = machine
        self.clock = clock
        self.links: dict[Link, Transport] = dict(links or {})
        self.executors: dict[type, Executor] = dict(executors or {})
        self.logger = logger
        self.timers: dict[str, float] = {}
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._logs = LogLimiter()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._reconnects: dict[Link, int] = {}
        self._down: set[Link] = set()  # links known to be down
        self.failures = 0  # actions that raised (logged)

    # -- feeding ------------------------------------------------------------------------

    def post(self, event: object) -> None:
        """Queue `event` for the machine. Thread-safe; never blocks."""
        self._events.put(event)

    def handler(self, link: Link) -> Callable[[Message], None]:
        """A transport handler that posts what arrives on `link`."""

        def on_message(message: Message) -> None:
            self.post(Received(link, message.topic, message.payload, message.retain))

        return on_message

    def linked(self, link: Link) -> None:
        """Tell the machine `link` is up (call once, after its first connect)."""
        self._reconnects[link] = self.links[link].stats.reconnects
        self.post(Linked(link))

    # -- running ------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        return min(self.timers.values(), default=None)

    def run_pending(self) -> int:
        """Handle every queued event and every due timer; the number handled."""
        handled = 0
        self._watch_links()
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                event = self._due_timer()
                if event is None:
                    return handled
            self.feed(event)
            handled += 1

    def feed(self, event: object) -> None:
        """Hand one event to the machine now and carry out its actions."""
        try:
            actions = self.machine(event, self.clock())
        except Exception:  # a machine bug must not end the process: log it and go on
            self.failures += 1
            self.logger.exception("%s: handling %s failed", self.name, type(event).__name__)
            return
        for action in actions:
            self.execute(action)

    def execute(self, action: object) -> None:
        try:
            if isinstance(action, Publish):
                self._publish(action)
            elif isinstance(action, SetTimer):
                self.timers[action.key] = action.at
            elif isinstance(action, CancelTimer):
                self.timers.pop(action.key, None)
            elif isinstance(action, Note):
                self._note(action)
            elif isinstance(action, Subscribe | Unsubscribe):
                self._subscription(action)
            else:
                self.executors[type(action)](action)
        except Exception:
            self.failures += 1
            self.logger.exception("%s: carrying out %s failed", self.name, type(action).__name__)

    def _publish(self, p: Publish) -> None:
        transport = self.links.get(p.link)
        if transport is None:
            return
        try:
            transport.publish(p.topic, p.payload, qos=p.qos, retain=p.retain)
        except BrokerError as exc:  # one lost message must not end the round
            self._logs.log(self.logger, str(p.topic), "publish_failed",
                           "%s: publish to %s failed: %s", self.name, p.topic, exc)  # fmt: skip

    def _subscription(self, action: Subscribe | Unsubscribe) -> None:
        transport = self.links.get(action.link)
        if transport is None:
            return
        try:
            if isinstance(action, Subscribe):
                transport.subscribe(action.topic, self.handler(action.link))
            else:
                transport.unsubscribe(action.topic)
        except BrokerError as exc:  # kept by the transport: sent again on reconnect
            self._logs.log(self.logger, str(action.topic), "subscribe_failed",
                           "%s: subscription to %s: %s", self.name, action.topic, exc)  # fmt: skip

    def _note(self, note: Note) -> None:
        if not note.key:
            self.logger.log(note.level, note.text, *note.args)
        else:
            self._logs.log(self.logger, note.key, note.reason, note.text, *note.args,
                           level=note.level)  # fmt: skip

    def _due_timer(self) -> Timer | None:
        if not self.timers:
            return None
        key = min(self.timers, key=lambda k: self.timers[k])
        if self.timers[key] > self.clock():
            return None
        del self.timers[key]
        return Timer(key)

    def _watch_links(self) -> None:
        """A link that went down, or came back since last time: tell the machine (once
        back, it restores what it keeps retained there, and its peers resend what the
        broker may have lost)."""
        for link, seen in list(self._reconnects.items()):
            transport = self.links[link]
            count = transport.stats.reconnects
            if not transport.connected:
                if link not in self._down:
                    self._down.add(link)
                    self.post(Unlinked(link))
            elif count != seen:
                self._reconnects[link] = count
                self._down.discard(link)
                self.post(Linked(link, again=True))

    def start(self) -> Loop:
        """Run on a thread of its own until `stop()`."""
        self._thread = threading.Thread(target=self._serve, name=f"{self.name}-loop", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stopping.is_set():
            self.run_pending()
            at = self.next_timer()
            wait = _POLL if at is None else min(_POLL, max(0.0, at - self.clock()))
            try:
                event = self._events.get(timeout=wait)
            except queue.Empty:
                continue
            if not self._stopping.is_set():
                self.feed(event)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after the event in hand; queued events are dropped."""
        self._stopping.set()
        self.post(None)  # wake it
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
