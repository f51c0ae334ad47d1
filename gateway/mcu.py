"""A gateway's microcontroller boards: int8 models down to them, their reports up.

Boards cannot train or check Ed25519, so the gateway does the work for them: it
quantizes each verified global model once (tern.mcu.quantize) and seals a copy per
board under that board's HMAC key, retained on the board's topic downstream. In the
other direction it relays each registered board's telemetry and status upstream after
checking them, so an unregistered client on the gateway's broker cannot speak for the
fleet. Handlers run on paho's threads; one lock guards the boards and the model.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Protocol

from broker.transport import Message
from gateway.boards import Boards
from tern import topics
from tern.errors import TernError
from tern.mcu import quantize, seal_mcu
from tern.messages import GlobalModel
from tern.reports import Status, Telemetry

__all__ = ["BoardRelay", "Publish"]

log = logging.getLogger(__name__)


class Publish(Protocol):
    def __call__(self, topic: topics.Topic, data: bytes, *, retain: bool, qos: int = 1) -> None: ...


class BoardRelay:
    """Serves the boards of `boards` (fleet `boards.fleet`) through two publish callables.

    `stats` counts what happened, by name: ``models`` (sealed copies published),
    ``model_skipped`` (a global model that is not an MLP, or cannot be quantized),
    ``model_stale`` (a global model older, by (run, version), than the last one derived from),
    ``telemetry`` / ``status`` (relayed), ``telemetry_malformed`` / ``status_malformed``
    (dropped), ``unregistered`` (telemetry from a board this gateway does not serve).
    """

    def __init__(self, boards: Boards, in_exp: int, down: Publish, up: Publish) -> None:
        self._boards = boards
        self._in_exp = in_exp
        self._down, self._up = down, up
        self._lock = threading.Lock()
        self._order = (-1, -1)  # (run, version) of the last global model seen
        self._body: bytes | None = None  # its MCU model body, before any board's tag
        self.stats: Counter[str] = Counter()

    @property
    def boards(self) -> Boards:
        return self._boards

    @property
    def model_order(self) -> tuple[int, int] | None:
        """(run, version) of the global model the boards' current MCU model was derived from."""
        with self._lock:
            return None if self._body is None else self._order

    def filters(self) -> tuple[topics.Topic, topics.Topic]:
        """What to subscribe to downstream: every board's telemetry and status."""
        f = self._boards.fleet
        return topics.telemetry_all(f), topics.status_all(f)

    # -- models down ------------------------------------------------------------------

    def on_model(self, run: int, version: int, model: GlobalModel) -> None:
        """A verified global model (`run` and `version` from its signed envelope): quantize
        it once and publish it to every board, when (run, version) is newer than the last.

        Ordered as the boards order their models: a new run is newer whatever its version,
        an old run's models never are again.
        """
        with self._lock:
            order = (run, version)
            if order <= self._order:
                if order < self._order:  # equal: a retained copy after a reconnect
                    self.stats["model_stale"] += 1
                return
            self._order = order
            try:
                body = quantize(
                    model.spec, model.weights, version, self._in_exp, run=run
                ).to_bytes()
            except TernError as exc:
                # The boards keep their last model: better a stale one than none.
                self.stats["model_skipped"] += 1
                log.warning(
                    "boards: model %d of run %d not sent (%s): %s", version, run, exc.reason, exc
                )
                return
            self._body = body
            for board in self._boards.boards:
                self._send(board)

    def republish(self) -> None:
        """Publish the current model to every board again (its broker lost retained ones)."""
        with self._lock:
            for board in self._boards.boards:
                self._send(board)

    def set_boards(self, boards: Boards) -> None:
        """Serve `boards` from now on: new or re-keyed boards get the current model at
        once; a removed board's retained model is cleared (an empty retained message)."""
        with self._lock:
            old = self._boards.boards
            self._boards = boards
            for board, entry in boards.boards.items():
                if board not in old or old[board].key != entry.key:
                    self._send(board)
            for board in old.keys() - boards.boards.keys():
                self._down(topics.mcu_model(boards.fleet, board), b"", retain=True)
        log.info("boards: serving %s", ", ".join(sorted(boards.boards)) or "none")

    def _send(self, board: str) -> None:
        """Seal the current model for `board` and publish it (caller holds the lock)."""
        if self._body is None:
            return
        f = self._boards.fleet
        data = seal_mcu(self._body, self._boards.boards[board].key, f, board)
        self._down(topics.mcu_model(f, board), data, retain=True)
        self.stats["models"] += 1

    # -- reports up -------------------------------------------------------------------

    def _registered(self, message: Message) -> str | None:
        try:
            board = topics.parse(message.topic).sender
        except TernError:
            return None  # our filters only deliver our topics
        return board if board in self._boards.boards else None

    def on_telemetry(self, message: Message) -> None:
        board = self._registered(message)
        if board is None:
            self.stats["unregistered"] += 1
            return
        try:
            report = Telemetry.from_json(message.payload)
            if report.device != board:
                raise TernError(f"telemetry of {report.device!r} on {board!r}'s topic")
        except TernError as exc:
            self.stats["telemetry_malformed"] += 1
            log.warning("boards: telemetry from %s dropped: %s", board, exc)
            return
        # QoS 0 like the board's own publish: a lost prediction is replaced by the next.
        self._up(topics.telemetry(self._boards.fleet, board), message.payload, retain=False, qos=0)
        self.stats["telemetry"] += 1

    def on_status(self, message: Message) -> None:
        board = self._registered(message)
        if board is None:
            return  # the devices' own statuses share the filter: not ours to relay
        try:
            status = Status.from_json(message.payload)
            if status.id != board:
                raise TernError(f"status of {status.id!r} on {board!r}'s topic")
        except TernError as exc:
            self.stats["status_malformed"] += 1
            log.warning("boards: status from %s dropped: %s", board, exc)
            return
        self._up(topics.status(self._boards.fleet, board), message.payload, retain=True)
        self.stats["status"] += 1
