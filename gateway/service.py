"""The gateway process: the I/O around tern.rounds.gateway.GatewayMachine.

Upstream it is a client of its parent's broker; downstream it serves its devices (and
child gateways) on an embedded broker or an external one. Both transports only post
what arrives to the gateway's loop (broker.loop.Loop), which feeds the machine and
carries out its actions: publishing, its close timer, persisting its marks, its boards.
A bad message is counted by reason (in the next round's metrics), logged at most once
per sender, reason and minute, and never ends the round or the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
from nacl.signing import SigningKey

from broker.chunking import ChunkedTransport, fleet_bound
from broker.errors import BrokerError, TransportError
from broker.logs import log_round
from broker.loop import Loop
from broker.marks import MarkFile, MarksError
from broker.transport import MqttTransport
from gateway.boards import Boards
from gateway.config import GatewayConfig, GatewayError
from gateway.downstream import OwnBroker, read_boards
from gateway.mcu import BoardRelay
from gateway.tree import depth
from gateway.view import GatewayMachines, subscribe_above, subscribe_below
from tern import __version__, topics
from tern.fleet import Fleet, client_id
from tern.fleetview import SetBoards, ViewMachine
from tern.freshness import Watermarks
from tern.reports import RoundMetrics, State, Status
from tern.rounds.device import SaveMarks
from tern.rounds.events import Link
from tern.rounds.gateway import CohortClosed, GatewayMachine, ModelTaken

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

_KEEP_ROUNDS = 16  # closed rounds whose metrics and partial stay in memory


class Gateway:
    """One gateway of `fleet`, signing with `key`; see GatewayConfig for where it connects."""

    def __init__(
        self,
        config: GatewayConfig,
        fleet: Fleet,
        key: SigningKey,
        *,
        clock: Callable[[], float] = time.time,
        rng: np.random.Generator | None = None,
    ) -> None:
        config.check(fleet)
        if bytes(key.verify_key) != bytes(fleet.key_of(config.id)):
            raise GatewayError(f"the key does not match the fleet file's key for {config.id}")
        self.config, self.id, self.fleet = config, config.id, fleet
        self.key, self.clock = key, clock
        self.parent = fleet.gateways[self.id].parent
        self.depth = depth(fleet, self.id)
        self._marks = MarkFile(config.state_dir)
        try:
            marks = self._marks.load()
        except MarksError as exc:
            raise GatewayError(str(exc)) from exc
        self.machine = GatewayMachine(
            self.id, fleet, key, depth=self.depth, margin=config.margin, marks=marks,
            refusals=lambda: self.access_refused,
            counted=lambda: self.view.rejected + _chunks_refused(self.upstream, self.downstream),
        )  # fmt: skip
        self.view = ViewMachine(fleet, self.id)  # what is below, published upstream
        self._cond = threading.Condition()
        self.metrics: dict[int, RoundMetrics] = {}
        self.partials: dict[int, bytes] = {}  # round -> sealed partial sent upstream
        self._stopping = threading.Event()
        self._broker: OwnBroker | None = None
        self._rng = rng if rng is not None else np.random.default_rng()
        self.upstream: ChunkedTransport | None = None
        self.downstream: ChunkedTransport | None = None
        self._boards: BoardRelay | None = None  # with config.boards_file: its ESP32 boards
        # a restarted downstream broker lost the boards' models: publish them again
        again = lambda: None if self._boards is None else self._boards.republish()  # noqa: E731
        machines = GatewayMachines(self.machine, self.view, again)
        self.loop = Loop(
            f"gateway-{self.id}",
            machines.handle,
            clock=clock,
            executors={
                SaveMarks: lambda a: self._marks.save(a.marks),
                ModelTaken: self._model_taken,
                CohortClosed: self._closed,
            },
            logger=log,
        )

    # -- life cycle ---------------------------------------------------------------------

    @property
    def downstream_url(self) -> str:
        """The URL devices and child gateways connect to."""
        if self.config.downstream_url is not None:
            return self.config.downstream_url
        if self._broker is None:
            raise GatewayError("the gateway has not started: no downstream broker yet")
        return self._broker.url

    @property
    def downstream_ws_url(self) -> str | None:
        """Browsers' URL of its own broker's WebSockets listener (None without one)."""
        return None if self._broker is None else self._broker.ws_url

    def _status(self, state: State) -> bytes:
        return Status(self.id, "gateway", state, __version__).to_json()

    def start(self, timeout: float | None = 10.0) -> Gateway:
        """Serve downstream, connect both ways, announce online; GatewayError on failure."""
        f, cfg = self.fleet.fleet, self.config
        if cfg.boards_file is not None:
            self._boards = BoardRelay(
                self._read_boards(), cfg.mcu_in_exp, self._publish_down, self._publish_up
            )
            self.view.set_boards(self._boards.boards.boards)
        login = None if cfg.login is None else (cfg.login.username, cfg.login.password)
        local = 10.0 if timeout is None else timeout  # its own broker starts, or it fails
        try:
            if cfg.downstream_url is None:
                if login is None:
                    raise GatewayError(
                        f"gateway {self.id} has no login for its own broker: "
                        f"tern fleet init writes it as {self.id}.login beside its key"
                    )
                boards = None if self._boards is None else self._boards.boards
                self._broker = OwnBroker(cfg, self.fleet, boards).start(local)
            jitter = self._rng.spawn(2)
            down = _chunked(self, MqttTransport(
                self.downstream_url,
                client_id(f, self.id, "down"),
                login=login,
                tls=cfg.downstream_tls,
                backoff_min=cfg.backoff_min,
                backoff_max=cfg.backoff_max,
                rng=jitter[0],
            ), below=True)  # fmt: skip
            self.downstream = down
            self.loop.links[Link.DOWN] = down
            subscribe_below(down, f, self.id, self.loop.handler(Link.DOWN), self._boards)
            self.loop.start()
            down.connect(timeout if cfg.downstream_url is not None else local)
            self.loop.linked(Link.DOWN)
            if self._stopping.is_set():  # stopped (a signal) while it waited
                raise GatewayError(f"gateway {self.id} stopped while starting")
            up = _chunked(self, MqttTransport(
                cfg.upstream_url,
                client_id(f, self.id, "up"),
                will=(topics.status(f, self.id), self._status(State.OFFLINE)),
                login=login,
                tls=cfg.upstream_tls,
                backoff_min=cfg.backoff_min,
                backoff_max=cfg.backoff_max,
                rng=jitter[1],
            ), below=False)  # fmt: skip
            self.upstream = up
            if self._stopping.is_set():
                up.close()
                raise GatewayError(f"gateway {self.id} stopped while starting")
            self.loop.links[Link.UP] = up
            subscribe_above(up, self.fleet, self.id, self.loop.handler(Link.UP))
            up.connect(timeout)
            self.loop.linked(Link.UP)
        except (BrokerError, TransportError) as exc:
            self.stop()
            raise GatewayError(f"gateway {self.id} cannot start: {exc}") from exc
        log.info(
            "gateway %s: upstream %s, downstream %s", self.id, cfg.upstream_url, self.downstream_url
        )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (an open round is dropped), announce offline, disconnect, stop
        the broker."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.loop.stop(timeout)
        if self.upstream is not None:
            try:
                if self.upstream.connected:
                    self.upstream.publish(
                        topics.status(self.fleet.fleet, self.id),
                        self._status(State.OFFLINE),
                        retain=True,
                        wait=True,
                        timeout=timeout,
                    )
            except TransportError as exc:
                log.warning("gateway %s: offline status not sent: %s", self.id, exc)
            self.upstream.close(timeout)
        if self.downstream is not None:
            self.downstream.close(timeout)
        if self._broker is not None:
            try:
                self._broker.stop(timeout)
            except BrokerError as exc:
                log.warning("gateway %s: %s", self.id, exc)

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def open_round(self) -> int | None:
        """The round being collected now, if any."""
        rnd = self.machine.round
        return None if rnd is None else rnd.round

    def wait_for_round(self, round: int, timeout: float) -> RoundMetrics:
        """The metrics of `round` once it has closed here; TimeoutError after `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: round in self.metrics, timeout):
                raise TimeoutError(f"gateway {self.id}: round {round} not closed in {timeout} s")
            return self.metrics[round]

    # -- the loop's executors -------------------------------------------------------------

    def _model_taken(self, taken: ModelTaken) -> None:
        if self._boards is not None:
            self._boards.on_model(taken.run, taken.version, taken.model)

    def _closed(self, closed: CohortClosed) -> None:
        r = closed.metrics.round
        log_round(log, closed.metrics, who=f"gateway {self.id}")
        with self._cond:
            self.metrics[r] = closed.metrics
            if closed.partial:
                self.partials[r] = closed.partial
            for kept in (self.metrics, self.partials):
                for old in sorted(kept)[:-_KEEP_ROUNDS]:
                    del kept[old]
            self._cond.notify_all()

    @property
    def access_refused(self) -> Counter[str]:
        """Everything the embedded broker has refused (its access policy and its limits)."""
        return Counter() if self._broker is None else self._broker.refused

    @property
    def high_water(self) -> Watermarks:
        """The newest model and schedule accepted so far (tern.freshness), as persisted."""
        return self.machine.feed.marks

    @property
    def intake_refused(self) -> Counter[str]:
        """Every model, schedule and kernel from upstream refused so far, by reason."""
        return Counter(self.machine.feed.rejected)

    def _publish_down(
        self, topic: topics.Topic, data: bytes, *, retain: bool, qos: int = 1
    ) -> None:
        _send(self.id, self.downstream, topic, data, retain=retain, qos=qos)

    def _publish_up(self, topic: topics.Topic, data: bytes, *, retain: bool, qos: int = 1) -> None:
        _send(self.id, self.upstream, topic, data, retain=retain, qos=qos)

    # -- microcontroller boards (gateway.mcu) -------------------------------------------

    def _read_boards(self) -> Boards:
        assert self.config.boards_file is not None
        return read_boards(self.config.boards_file, self.fleet, self.id)

    def reload_boards(self) -> Boards:
        """Re-read the boards file (SIGHUP); a board added gets the current model at once.

        A bad file raises BoardsError and leaves the boards served until now in place.
        """
        if self._boards is None:
            raise GatewayError(f"gateway {self.id} was started without a boards file")
        boards = self._read_boards()
        if self._broker is not None:
            self._broker.set_boards(boards)
        self._boards.set_boards(boards)
        self.loop.post(SetBoards(tuple(boards.boards)))
        return boards

    @property
    def mcu_stats(self) -> Counter[str]:
        """What the boards' relay has done (gateway.mcu.BoardRelay.stats); empty without boards."""
        return Counter() if self._boards is None else Counter(self._boards.stats)


def _send(
    gateway: str,
    transport: ChunkedTransport | None,
    topic: topics.Topic,
    data: bytes,
    *,
    retain: bool,
    qos: int,
) -> None:
    """Publish for the boards' relay; a failure is logged, not raised: one lost message
    must not end the handler it happens in."""
    if transport is None:
        return
    try:
        transport.publish(topic, data, qos=qos, retain=retain)
    except TransportError as exc:
        log.warning("gateway %s: publish to %s failed: %s", gateway, topic, exc)


def _chunked(g: Gateway, inner: MqttTransport, *, below: bool) -> ChunkedTransport:
    """`inner` sending and reassembling chunks (broker.chunking) for gateway `g`: room
    for a reassembly from each of its devices and child gateways `below`, and a few more
    (what comes from above)."""
    senders = len(g.fleet.gateways[g.id].devices) + len(g.fleet.children(g.id)) if below else 0
    return ChunkedTransport(
        inner, fleet=g.fleet.fleet, sender=g.id, max_message=g.config.max_message_bytes,
        limit=fleet_bound(g.fleet), max_pending=senders + 8,
    )  # fmt: skip


def _chunks_refused(*links: ChunkedTransport | None) -> Counter[str]:
    """Chunked messages refused on `links`, by reason (``chunk_<reason>``)."""
    return sum((t.rejected() for t in links if t is not None), Counter())
