"""Big messages over brokers with a small message limit: a Transport that chunks.

`ChunkedTransport` wraps any `Transport` (MqttTransport, or MemoryTransport in tests)
and speaks tern.chunks below the round machines, which never see a chunk:

- publishing, a payload whose PUBLISH packet would exceed `max_message` bytes goes as
  chunks, each retained at QoS 1 under ``tern/<fleet>/chunk/<sender>/<sha256>``, then a
  manifest on the original topic (with the original QoS and retain flag); the chunks of
  the message sent before on that topic are cleared (an empty retained publish on each
  chunk topic no longer used), so the broker keeps one chunked message per topic of this
  sender;
- receiving, a manifest on a subscribed topic starts a reassembly (tern.chunks.Reassembler)
  within `limit(topic)` bytes: the transport subscribes to the topic of each chunk it
  lacks (the exact topic, not the sender's whole ``chunk/<sender>/+``, so that a device
  following deltas never downloads the retained chunks of the full model), and once the
  payload is whole and checked, hands the original handler a `Message` of the original
  topic and retain flag; anything that is not a manifest passes through unchanged.

Every refusal is counted in `refused` by reason (``chunk_...``, for the component's
metrics) and logged at most once per sender, reason and minute. A reassembly whose
chunks never come is dropped after `timeout` seconds, checked whenever a message comes or
goes. Subscribing happens only on the thread that delivers (never waits for a SUBACK).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from broker.errors import PublishError, TransportError
from broker.ratelog import LogLimiter
from broker.transport_types import Handler, Message, Transport, TransportStats
from tern import topics
from tern.caps import KERNEL_CAPS, largest_message, model_caps, schedule_caps
from tern.chunks import (
    MIN_CHUNK,
    ChunkRefused,
    Done,
    Reassembler,
    decode_manifest,
    encode_manifest,
    is_manifest,
    split,
)
from tern.fleet import Fleet

__all__ = ["ChunkedTransport", "add_max_message_argument", "fleet_bound", "packet_bytes"]

log = logging.getLogger(__name__)

Limit = Callable[[str], int]


def packet_bytes(topic: str, payload: int, qos: int = 1) -> int:
    """The size of the MQTT 3.1.1 PUBLISH packet of a `payload`-byte message on `topic`:
    fixed header (with its variable-length remaining length), topic, packet id."""
    rest = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + payload
    width = 1 if rest < 128 else 2 if rest < 16_384 else 3 if rest < 2_097_152 else 4
    return 1 + width + rest


def fleet_bound(fleet: Fleet) -> Limit:
    """What a receiver of `fleet` accepts on a topic, as a payload's bytes: a model of the
    fleet's max_params for models, deltas, updates and partials (an update is never
    larger than the model it answers), a schedule that lists every device, a kernel, and
    the largest of these for anything else."""
    model = model_caps(fleet.max_params).max_bytes
    by_kind = {
        topics.TopicKind.GLOBAL_MODEL: model,
        topics.TopicKind.MODEL_DELTA: model,
        topics.TopicKind.UPDATE: model,
        topics.TopicKind.PARTIAL: model,
        topics.TopicKind.ROUND_SCHEDULE: schedule_caps(len(fleet.devices)).max_bytes,
        topics.TopicKind.KERNEL: KERNEL_CAPS.max_bytes,
    }
    largest = largest_message(fleet.max_params, len(fleet.devices))

    def limit(topic: str) -> int:
        parsed = topics.parse_in(topic, fleet.fleet)
        return largest if parsed is None else by_kind.get(parsed.kind, largest)

    return limit


def _message_bytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of bytes") from None
    if value < 2 * MIN_CHUNK:
        raise argparse.ArgumentTypeError(f"at least {2 * MIN_CHUNK} bytes")
    return value


def add_max_message_argument(p: argparse.ArgumentParser) -> None:
    """`--max-message-bytes N` of `tern device`, `tern gateway` and `tern coordinator`."""
    p.add_argument(
        "--max-message-bytes",
        type=_message_bytes,
        default=None,
        metavar="N",
        help="send a message whose MQTT packet exceeds N bytes in chunks, for brokers with a"
        " message limit (AWS IoT Core: 131072; Mosquitto: message_size_limit). Default: every"
        " message whole. Chunked messages are reassembled whatever this says",
    )


class ChunkedTransport:
    """`inner` with chunking for sender `sender` of `fleet` (see the module's text).

    `max_message`: the largest PUBLISH packet (bytes, MQTT framing included) the brokers
    on the way take; None sends every payload whole. `limit(topic)`: the most bytes a
    reassembled payload of `topic` may have. `max_pending`, `budget`, `timeout`, `clock`:
    the bounds of tern.chunks.Reassembler."""

    def __init__(
        self,
        inner: Transport,
        *,
        fleet: str,
        sender: str,
        max_message: int | None,
        limit: Limit,
        max_pending: int = 16,
        budget: int = 64 << 20,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        topics.validate_id(fleet, "fleet")
        topics.validate_id(sender, "sender")
        self.inner, self.fleet, self.sender, self.limit = inner, fleet, sender, limit
        self.chunk_size: int | None = None
        if max_message is not None:
            probe = topics.chunk(fleet, sender, "0" * 64).path
            size = max_message - packet_bytes(probe, 0, 1)
            while packet_bytes(probe, size, 1) > max_message:  # a longer remaining length
                size -= 1
            self.chunk_size = size
            if size < MIN_CHUNK:
                raise TransportError(
                    f"max_message {max_message} leaves chunks below {MIN_CHUNK} bytes"
                )
        self.max_message = max_message
        self.refused: Counter[str] = Counter()
        self.reassembled = 0
        self.chunked = 0
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()
        self._reassembler = Reassembler(
            max_pending=max_pending, budget=budget, timeout=timeout, clock=clock
        )
        self._handlers: dict[str, list[tuple[str, Handler]]] = {}  # topic -> (filter, handler)
        self._chunk_subs: set[tuple[str, bytes]] = set()  # (sender, digest) subscribed
        self._sent: dict[str, tuple[bytes, ...]] = {}  # topic -> digests of its chunks
        self._logs = LogLimiter()

    # -- Transport -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.inner.connected

    @property
    def stats(self) -> TransportStats:
        return self.inner.stats

    def connect(self, timeout: float | None = 10.0) -> ChunkedTransport:
        self.inner.connect(timeout)
        return self

    def close(self, timeout: float = 5.0) -> None:
        self.inner.close(timeout)

    def rejected(self) -> Counter[str]:
        """A copy of the refusals so far, by reason."""
        with self._lock:
            return Counter(self.refused)

    def publish(
        self,
        topic: topics.Topic,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> None:
        path = str(topic)
        self._expire()
        with self._send_lock:
            whole = (
                self.chunk_size is None
                or not payload
                or packet_bytes(path, len(payload), qos) <= (self.max_message or 0)
            )
            old = self._sent.pop(path, ())
            try:
                if whole:
                    self.inner.publish(topic, payload, qos=qos, retain=retain, wait=wait,
                                       timeout=timeout)  # fmt: skip
                else:
                    self._publish_chunked(topic, payload, qos, retain, wait, timeout)
            except BaseException:
                self._sent.setdefault(path, old)  # cleared by the next message on `path`
                raise
            in_use = {d for digests in self._sent.values() for d in digests}
            for digest in dict.fromkeys(old):
                if digest not in in_use:
                    self.inner.publish(self._chunk_topic(self.sender, digest), b"", retain=True)

    def _publish_chunked(
        self, topic: topics.Topic, payload: bytes, qos: int, retain: bool, wait: bool,
        timeout: float,
    ) -> None:  # fmt: skip
        assert self.chunk_size is not None and self.max_message is not None
        manifest, chunks = split(payload, self.chunk_size, self.sender)
        encoded = encode_manifest(manifest)
        if packet_bytes(str(topic), len(encoded), qos) > self.max_message:
            raise PublishError(str(topic), f"its manifest of {len(encoded)} bytes is too large")
        kept = {d for digests in self._sent.values() for d in digests}
        for digest, data in zip(manifest.parts, chunks, strict=True):
            if digest not in kept:  # a chunk this sender keeps already stays where it is
                self.inner.publish(self._chunk_topic(self.sender, digest), data, retain=True)
                kept.add(digest)
        self.inner.publish(topic, encoded, qos=qos, retain=retain, wait=wait, timeout=timeout)
        self._sent[str(topic)] = manifest.parts
        self.chunked += 1

    def subscribe(
        self, filter: topics.Topic, handler: Handler, *, qos: int = 1, timeout: float = 10.0
    ) -> None:
        flt = str(filter)

        def on_message(message: Message) -> None:
            self._on_message(flt, handler, message)

        self.inner.subscribe(filter, on_message, qos=qos, timeout=timeout)

    def unsubscribe(self, filter: topics.Topic) -> None:
        """Unsubscribe `filter`, and drop the reassemblies only it was waiting for."""
        flt = str(filter)
        self.inner.unsubscribe(filter)
        with self._lock:
            for topic, handlers in list(self._handlers.items()):
                handlers[:] = [(f, h) for f, h in handlers if f != flt]
                if not handlers:
                    del self._handlers[topic]
                    self._reassembler.drop(topic)
            self._sync_chunk_subs()

    # -- receiving -----------------------------------------------------------------------

    def _on_message(self, flt: str, handler: Handler, message: Message) -> None:
        self._expire()
        if not is_manifest(message.payload):
            handler(message)
            return
        try:
            self._start(flt, handler, message)
        except ChunkRefused as exc:
            self._refuse(message.topic, exc)

    def _start(self, flt: str, handler: Handler, message: Message) -> None:
        manifest = decode_manifest(message.payload, self.limit(message.topic))
        parsed = topics.parse_in(message.topic, self.fleet)
        named = None if parsed is None else parsed.sender
        if named is not None and named != manifest.sender:
            raise ChunkRefused(
                f"a manifest on {message.topic} names {manifest.sender} as its sender",
                "chunk_sender",
            )
        with self._lock:
            started = self._reassembler.offer_manifest(message.topic, manifest, message.retain)
            handlers = self._handlers.setdefault(message.topic, [])
            if not started.again:
                handlers.clear()  # a newer manifest replaces the older one's listeners
            if (flt, handler) not in handlers:
                handlers.append((flt, handler))
            ready = self._take_done([] if started.done is None else [started.done])
            self._sync_chunk_subs()
        self._deliver(ready)

    def _on_chunk(self, message: Message) -> None:
        if not message.payload:
            return  # a chunk cleared by its sender
        parsed = topics.parse_in(message.topic, self.fleet)
        if parsed is None or parsed.sender is None or parsed.digest is None:
            return
        try:
            with self._lock:
                done = self._reassembler.offer_chunk(
                    parsed.sender, bytes.fromhex(parsed.digest), message.payload
                )
                ready = self._take_done(done)
                self._sync_chunk_subs()
        except ChunkRefused as exc:
            with self._lock:
                self._sync_chunk_subs()  # a reassembly it made impossible was dropped
            self._refuse(message.topic, exc)
            return
        self._deliver(ready)

    def _take_done(self, done: list[Done]) -> list[tuple[Message, list[Handler]]]:
        """The messages `done` makes and their handlers (under the lock)."""
        ready = []
        for d in done:
            handlers = [h for _, h in self._handlers.pop(d.topic, [])]
            self.reassembled += 1
            ready.append((Message(d.topic, d.payload, d.retain), handlers))
        return ready

    @staticmethod
    def _deliver(ready: list[tuple[Message, list[Handler]]]) -> None:
        for message, handlers in ready:
            for handler in handlers:
                handler(message)

    def _sync_chunk_subs(self) -> None:
        """Subscribe to the chunk topics some reassembly wants, unsubscribe the rest.
        Called under the lock, from the delivering thread when it subscribes."""
        wanted = self._reassembler.wanted()
        for sender, digest in sorted(self._chunk_subs - wanted):
            self.inner.unsubscribe(self._chunk_topic(sender, digest))
        for sender, digest in sorted(wanted - self._chunk_subs):
            self.inner.subscribe(self._chunk_topic(sender, digest), self._on_chunk)
        self._chunk_subs = wanted
        pending = self._reassembler.pending()
        for topic in [t for t in self._handlers if t not in pending]:
            del self._handlers[topic]

    def _expire(self) -> None:
        with self._lock:
            late = self._reassembler.expire()
            if not late:
                return
            self._sync_chunk_subs()
        for topic, manifest in late:
            what = f"{manifest.size} bytes from {manifest.sender} incomplete"
            self._refuse(topic, ChunkRefused(what, "chunk_timeout"))

    def _refuse(self, topic: str, exc: ChunkRefused) -> None:
        with self._lock:
            self.refused[exc.reason] += 1
        self._logs.log(log, topic, exc.reason, "%s: refused on %s: %s", self.sender, topic,
                       exc.message)  # fmt: skip

    def _chunk_topic(self, sender: str, digest: bytes) -> topics.Topic:
        return topics.chunk(self.fleet, sender, digest.hex())
