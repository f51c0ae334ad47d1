"""The gateway: relays model and schedule down, folds its subtree's updates, sends one partial up.

Upstream it is a client of its parent's broker; downstream it serves its devices (and
child gateways) on an embedded broker or an external one. MQTT handlers run on
paho's threads and the close timer on its own, so all round state sits behind one
lock. A bad message is counted by reason (in the next round's metrics), logged at most
once per sender, reason and minute, and never ends the round or the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from nacl.signing import SigningKey

from broker.errors import BrokerError, TransportError
from broker.marks import MarkFile, MarksError
from broker.ratelog import LogLimiter
from broker.transport import Message, MqttTransport
from gateway.boards import Boards
from gateway.config import GatewayConfig, GatewayError
from gateway.downstream import OwnBroker, read_boards
from gateway.mcu import BoardRelay
from gateway.tree import depth
from tern import __version__, topics
from tern.admit import Terms, peers_of
from tern.collect import Collector
from tern.envelope import Envelope, seal
from tern.errors import TernError
from tern.feed import CoordinatorFeed
from tern.fleet import Fleet, client_id
from tern.freshness import Order, Stamp, Watermarks, model_stamp
from tern.messages import GlobalModel, RoundSchedule, cohort_message, open_kernel
from tern.reports import RoundMetrics, State, Status

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

_MONITOR_INTERVAL = 0.25


@dataclass
class _Round:
    schedule: RoundSchedule
    run: int
    collector: Collector
    stands_for: dict[str, int]
    opened_at: float
    close_at: float
    timer: threading.Timer | None = None
    extra_rejected: Counter[str] = field(default_factory=Counter)


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
        self.config = config
        self.id = config.id
        self.fleet = fleet
        self.key = key
        self.clock = clock
        self.parent = fleet.gateways[self.id].parent
        self.depth = depth(fleet, self.id)
        self._lock = threading.Condition(threading.RLock())
        self._marks = MarkFile(config.state_dir)
        try:
            self._feed = CoordinatorFeed(fleet, self._marks.load())
        except MarksError as exc:
            raise GatewayError(str(exc)) from exc
        self._models: dict[Stamp, GlobalModel] = {}  # the current model and the previous
        self._model_bytes: bytes | None = None  # the held model as signed, relayed down
        self._schedule_bytes: bytes | None = None
        self._schedule_stamp: Stamp | None = None
        self._kernel_bytes: dict[str, bytes] = {}  # sha256 -> the signed kernel, relayed
        self._pending: tuple[int, RoundSchedule] | None = None  # (run, schedule)
        # (run, round, deadline) of the last round opened: a restarted coordinator re-issues
        # an open round under the same number with a later deadline, and that is new.
        self._last_opened: tuple[int, int, float] = (-1, -1, 0.0)
        self._round: _Round | None = None
        self._outside: Counter[str] = Counter()  # rejected while no round was open
        self._counted: Counter[str] = Counter()  # intake and broker refusals already reported
        self._logs = LogLimiter()
        self._bytes_down = 0
        self.metrics: dict[int, RoundMetrics] = {}
        self.partials: dict[int, bytes] = {}  # round -> sealed partial sent upstream
        self._stopping = threading.Event()
        self._broker: OwnBroker | None = None
        self._down_id = client_id(fleet.fleet, self.id, "down")
        self._monitor: threading.Thread | None = None
        self._rng = rng if rng is not None else np.random.default_rng()
        self.upstream: MqttTransport | None = None
        self.downstream: MqttTransport | None = None
        self._boards: BoardRelay | None = None  # with config.boards_file: its ESP32 boards

    # -- life cycle ---------------------------------------------------------------------

    @property
    def downstream_url(self) -> str:
        """The URL devices and child gateways connect to."""
        if self.config.downstream_url is not None:
            return self.config.downstream_url
        if self._broker is None:
            raise GatewayError("the gateway has not started: no downstream broker yet")
        return self._broker.url

    def _status(self, state: State) -> bytes:
        return Status(self.id, "gateway", state, __version__).to_json()

    def start(self, timeout: float = 10.0) -> Gateway:
        """Serve downstream, connect both ways, announce online; GatewayError on failure."""
        f, cfg = self.fleet.fleet, self.config
        if cfg.boards_file is not None:
            self._boards = BoardRelay(
                self._read_boards(), cfg.mcu_in_exp, self._publish_down, self._publish_up
            )
        login = None if cfg.login is None else (cfg.login.username, cfg.login.password)
        try:
            if cfg.downstream_url is None:
                if login is None:
                    raise GatewayError(
                        f"gateway {self.id} has no login for its own broker: "
                        f"tern fleet init writes it as {self.id}.login beside its key"
                    )
                boards = None if self._boards is None else self._boards.boards
                self._broker = OwnBroker(cfg, self.fleet, boards).start(timeout)
            jitter = self._rng.spawn(2)
            down = MqttTransport(
                self.downstream_url,
                self._down_id,
                login=login,
                backoff_min=cfg.backoff_min,
                backoff_max=cfg.backoff_max,
                rng=jitter[0],
            )
            self.downstream = down
            down.subscribe(topics.updates_to(f, self.id), self._on_contribution)
            down.subscribe(topics.partials_to(f, self.id), self._on_contribution)
            if self._boards is not None:
                telemetry, status = self._boards.filters()
                down.subscribe(telemetry, self._boards.on_telemetry)
                down.subscribe(status, self._boards.on_status)
            down.connect(timeout)
            up = MqttTransport(
                cfg.upstream_url,
                client_id(f, self.id, "up"),
                will=(topics.status(f, self.id), self._status(State.OFFLINE)),
                login=login,
                backoff_min=cfg.backoff_min,
                backoff_max=cfg.backoff_max,
                rng=jitter[1],
            )
            self.upstream = up
            up.subscribe(topics.global_model(f), self._on_model)
            up.subscribe(topics.round_schedule(f), self._on_schedule)
            up.subscribe(topics.kernels(f), self._on_kernel)
            up.connect(timeout)
            up.publish(topics.status(f, self.id), self._status(State.ONLINE), retain=True)
        except (BrokerError, TransportError) as exc:
            self.stop()
            raise GatewayError(f"gateway {self.id} cannot start: {exc}") from exc
        self._monitor = threading.Thread(
            target=self._watch_downstream, name=f"gateway-{self.id}-monitor", daemon=True
        )
        self._monitor.start()
        log.info(
            "gateway %s: upstream %s, downstream %s", self.id, cfg.upstream_url, self.downstream_url
        )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the open round's timer, announce offline, disconnect, stop the broker."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            if self._round is not None and self._round.timer is not None:
                self._round.timer.cancel()
            self._round = None
        if self._monitor is not None:
            self._monitor.join(timeout)
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
        with self._lock:
            return None if self._round is None else self._round.schedule.round

    def wait_for_round(self, round: int, timeout: float) -> RoundMetrics:
        """The metrics of `round` once it has closed here; TimeoutError after `timeout`."""
        with self._lock:
            if not self._lock.wait_for(lambda: round in self.metrics, timeout):
                raise TimeoutError(f"gateway {self.id}: round {round} not closed in {timeout} s")
            return self.metrics[round]

    # -- upstream: model and schedule ---------------------------------------------------

    def _relay(self, topic: topics.Topic, data: bytes) -> None:
        """Republish a message from upstream, retained, for the devices below."""
        if self._send(self.downstream, topic, data, retain=True):
            self._bytes_down += len(data)

    def _refused_upstream(self, what: str, exc: TernError) -> None:
        self._logs.log(log, what, exc.reason, "gateway %s: refused a %s (%s): %s",
                       self.id, what, exc.reason, exc)  # fmt: skip

    def _on_model(self, message: Message) -> None:
        with self._lock:
            try:
                taken = self._feed.take_model(message.payload)
            except TernError as exc:
                self._refused_upstream("model", exc)
                return
            stamp = model_stamp(taken.envelope)
            if taken.order is Order.SAME and stamp in self._models:
                return  # the model we hold: a retained copy after a reconnect
            self._marks.save(self._feed.marks)
            self._models[stamp] = taken.value
            for old in sorted(self._models)[:-2]:  # the current and the previous are enough
                del self._models[old]
            self._model_bytes = message.payload
            self._relay(topics.global_model(self.fleet.fleet), message.payload)
            self._maybe_open()
        if self._boards is not None:  # outside the round lock: quantizing takes a moment
            self._boards.on_model(stamp.run, stamp.version, taken.value)

    def _on_kernel(self, message: Message) -> None:
        try:
            digest = topics.parse(message.topic).digest
            assert digest is not None  # our filter is a kernel topic
            with self._lock:
                if self._kernel_bytes.get(digest) == message.payload:
                    return  # the kernel relayed, again (a retained copy after a reconnect)
            open_kernel(message.payload, self.fleet, digest)
        except TernError as exc:
            with self._lock:
                self._feed.rejected[f"kernel_{exc.reason}"] += 1
            self._refused_upstream("kernel", exc)
            return
        with self._lock:
            self._kernel_bytes[digest] = message.payload
            self._relay(topics.kernel(self.fleet.fleet, digest), message.payload)

    def _on_schedule(self, message: Message) -> None:
        with self._lock:
            try:
                taken = self._feed.take_schedule(message.payload)
            except TernError as exc:
                self._refused_upstream("schedule", exc)
                return
            stamp = self._feed.marks.schedule
            if taken.order is Order.SAME and stamp == self._schedule_stamp:
                return  # the schedule we hold: a retained copy after a reconnect
            self._marks.save(self._feed.marks)
            self._schedule_stamp = stamp
            self._schedule_bytes = message.payload
            self._relay(topics.round_schedule(self.fleet.fleet), message.payload)
            self._pending = (taken.envelope.run, taken.value)
            self._maybe_open()

    def _maybe_open(self) -> None:
        """Open the pending schedule's round once its model is here (caller holds the lock)."""
        if self._pending is None or self._stopping.is_set():
            return
        run, s = self._pending
        if (run, s.round, s.deadline) <= self._last_opened:
            return
        model = self._models.get(Stamp(run, s.model_version))
        if model is None:
            return  # the schedule overtook its model: open when the model arrives
        self._pending = None
        self._last_opened = (run, s.round, s.deadline)
        if self._round is not None:
            self._close(self._round)  # superseded by a newer round
        peers = peers_of(self.fleet, self.id, s)
        stands_for = {p.id: p.devices for p in peers.values()}
        close_at = s.deadline - self.config.margin * self.depth
        now = self.clock()
        if not stands_for:
            log.info("gateway %s: no participant below for round %d", self.id, s.round)
            return
        if now >= close_at:
            log.warning("gateway %s: round %d closed before it reached us", self.id, s.round)
            return
        collector = Collector(terms=Terms.of(self.fleet.fleet, run, s, model.spec), peers=peers)
        rnd = _Round(s, run, collector, stands_for, now, close_at, extra_rejected=self._outside)
        self._outside = Counter()
        rnd.timer = threading.Timer(close_at - now, self._on_timer, args=(rnd,))
        rnd.timer.daemon = True
        self._round = rnd
        rnd.timer.start()
        log.info("gateway %s: round %d open, expecting %s", self.id, s.round, sorted(stands_for))

    # -- downstream: updates and partials -------------------------------------------------

    def _on_contribution(self, message: Message) -> None:
        with self._lock:
            rnd = self._round
            if rnd is None:
                self._outside["no_open_round"] += 1
                self._logs.log(log, message.topic[:128], "no_open_round",
                               "gateway %s: refused a message on %s: no round is open",
                               self.id, message.topic[:128])  # fmt: skip
                return
            offer = rnd.collector.offer(message.payload, message.topic, retained=message.retain)
            if offer.reason:
                self._logs.log(log, str(offer.sender), offer.reason,
                               "gateway %s: refused a message from %s (%s): %s",
                               self.id, offer.sender, offer.reason, offer.message)  # fmt: skip
            if rnd.collector.complete:
                self._close(rnd)

    def _on_timer(self, rnd: _Round) -> None:
        with self._lock:
            self._close(rnd)

    def _close(self, rnd: _Round) -> None:
        """Fold, send the partial and the metrics (caller holds the lock)."""
        if self._round is not rnd:
            return
        self._round = None
        if rnd.timer is not None:
            rnd.timer.cancel()
        s, collector, f = rnd.schedule, rnd.collector, self.fleet.fleet
        result = collector.close()
        failed = dict(sorted(collector.failed.items()))
        message = cohort_message(collector.spec, result, failed)
        if message is not None:
            kind, body = message
            env = Envelope(kind, f, s.round, s.model_version, self.id, body, run=rnd.run)
            data = seal(env, self.key)
            self.partials[s.round] = data
            self._publish_up(topics.partial(f, self.parent, self.id), data, retain=False)
        dropped = sum(
            max(n - (collector.accepted[c].count if c in collector.accepted else 0), 0)
            for c, n in rnd.stands_for.items()
        )
        metrics = RoundMetrics(
            component=self.id,
            round=s.round,
            model_version=s.model_version,
            contributors=result.count,
            dropped=dropped,
            rejected=dict(collector.rejected + rnd.extra_rejected + self._new_refusals()),
            failed=failed,
            bytes_up=collector.bytes_in,  # received from below (topics.md "Metrics")
            bytes_down=self._bytes_down,
            round_seconds=max(self.clock() - rnd.opened_at, 0.0),
        )
        self._bytes_down = 0
        self._publish_up(topics.metrics(f, self.id), metrics.to_json(), retain=True, qos=0)
        self.metrics[s.round] = metrics
        self._lock.notify_all()
        log.info("gateway %s: round %d closed: %s", self.id, s.round, metrics)

    def _new_refusals(self) -> Counter[str]:
        """Refusals since the last metrics (caller holds the lock): the coordinator's
        messages refused (``model_<reason>``, ``schedule_<reason>``, ``kernel_<reason>``)
        and what the embedded broker refused, as ``access_<reason>``."""
        refused = self._feed.rejected + Counter(
            {f"access_{reason}": n for reason, n in self.access_refused.items()}
        )
        new = refused - self._counted
        self._counted = refused
        return new

    @property
    def access_refused(self) -> Counter[str]:
        """Everything the embedded broker has refused (its access policy and its limits)."""
        return Counter() if self._broker is None else self._broker.refused

    @property
    def high_water(self) -> Watermarks:
        """The newest model and schedule accepted so far (tern.freshness), as persisted."""
        with self._lock:
            return self._feed.marks

    @property
    def intake_refused(self) -> Counter[str]:
        """Every model, schedule and kernel from upstream refused so far, by reason."""
        with self._lock:
            return Counter(self._feed.rejected)

    def _send(
        self,
        transport: MqttTransport | None,
        topic: topics.Topic,
        data: bytes,
        *,
        retain: bool,
        qos: int = 1,
    ) -> bool:
        """Publish on `transport`; True when handed over. A failure is logged, not raised:
        one lost message must not end the round or the handler it happens in."""
        if transport is None:
            return False
        try:
            transport.publish(topic, data, qos=qos, retain=retain)
        except TransportError as exc:
            log.warning("gateway %s: publish to %s failed: %s", self.id, topic, exc)
            return False
        return True

    def _publish_down(
        self, topic: topics.Topic, data: bytes, *, retain: bool, qos: int = 1
    ) -> None:
        self._send(self.downstream, topic, data, retain=retain, qos=qos)

    def _publish_up(self, topic: topics.Topic, data: bytes, *, retain: bool, qos: int = 1) -> None:
        self._send(self.upstream, topic, data, retain=retain, qos=qos)

    # -- a restarted downstream broker has lost the retained model and schedule -------------

    def _watch_downstream(self) -> None:
        seen = 0
        while not self._stopping.wait(_MONITOR_INTERVAL):
            down = self.downstream
            if down is None:
                continue
            reconnects = down.stats.reconnects
            if reconnects == seen or not down.connected:
                continue
            seen = reconnects
            with self._lock:
                f = self.fleet.fleet
                if self._model_bytes is not None:
                    self._relay(topics.global_model(f), self._model_bytes)
                if self._schedule_bytes is not None:
                    self._relay(topics.round_schedule(f), self._schedule_bytes)
                for digest, data in self._kernel_bytes.items():
                    self._relay(topics.kernel(f, digest), data)
            if self._boards is not None:
                self._boards.republish()

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
        return boards

    @property
    def mcu_stats(self) -> Counter[str]:
        """What the boards' relay has done (gateway.mcu.BoardRelay.stats); empty without boards."""
        return Counter() if self._boards is None else Counter(self._boards.stats)
