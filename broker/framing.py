"""MQTT 3.1.1 framing, read the embedded broker's way: `PacketReader`.

`PacketReader` is the only way amqtt reads a client's bytes (`broker.amqtt_broker`
hands it to amqtt in place of amqtt's own reader). It parses MQTT 3.1.1 framing itself
and refuses a packet from its fixed header alone (too large, wrong type, wrong flags or
length) before its body is read, so a client never makes the broker buffer more than
`max_packet_bytes`, and the first packet must be CONNECT. It checks the structure of
CONNECT, SUBSCRIBE and UNSUBSCRIBE and the topic of PUBLISH before amqtt parses them,
because amqtt's parsers under-read malformed packets (a wildcard topic, a string that is
not UTF-8) and would then read the rest of the body as the next packet, past any size
check. Free of amqtt, so that it reads (and tests) on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from broker.refusals import Reason

__all__ = [
    "MAX_CONNECT_BYTES",
    "PacketReader",
    "connect_well_formed",
    "publish_topic",
    "subscription_well_formed",
]

CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE = 1, 3, 8, 10
_PUBACK, _PUBREC, _PUBREL, _PUBCOMP, _PINGREQ, _DISCONNECT = 4, 5, 6, 7, 12, 14
# Packets a client sends with a body of fixed size: type -> (flags, remaining length).
_FIXED = {
    _PUBACK: (0, 2),
    _PUBREC: (0, 2),
    _PUBREL: (2, 2),
    _PUBCOMP: (0, 2),
    _PINGREQ: (0, 0),
    _DISCONNECT: (0, 0),
}
_STRING = 2 + 65535  # a length-prefixed string or binary field at its largest
# The largest CONNECT body there can be: protocol name, level, flags, keep-alive, then
# client id, will topic, will message, user name and password. Nothing longer is read.
MAX_CONNECT_BYTES = _STRING + 4 + 5 * _STRING
_TOPIC_PREFIX = _STRING + 2  # a PUBLISH's topic and packet id at their largest
_SKIP_CHUNK = 64 << 10


def _field(body: bytes, pos: int) -> tuple[bytes, int] | None:
    """The length-prefixed field at `pos` and the position after it; None past the end."""
    if pos + 2 > len(body):
        return None
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    return (body[pos + 2 : end], end) if end <= len(body) else None


def _text(raw: bytes) -> bool:
    """A UTF-8 string as MQTT allows it (no U+0000; Python refuses surrogates)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in raw


def connect_well_formed(body: bytes) -> bool:
    """Whether a CONNECT body holds exactly the fields its flags announce."""
    found = _field(body, 0)  # the protocol name
    if found is None or found[1] + 4 > len(body):
        return False
    flags, pos = body[found[1] + 1], found[1] + 4
    wanted = [True]  # client id, then will topic and message, user name, password
    if flags & 0x04:
        wanted += [True, False]
    if flags & 0x80:
        wanted.append(True)
    if flags & 0x40:
        wanted.append(False)
    for is_text in wanted:
        found = _field(body, pos)
        if found is None or (is_text and not _text(found[0])):
            return False
        pos = found[1]
    return pos == len(body)


def subscription_well_formed(body: bytes, *, with_qos: bool) -> bool:
    """Whether a SUBSCRIBE (`with_qos`) or UNSUBSCRIBE body is a packet id and one or
    more non-empty UTF-8 filters (each followed by a QoS of 0..2), and nothing else."""
    pos, count = 2, 0
    while pos < len(body):
        found = _field(body, pos)
        if found is None or not found[0] or not _text(found[0]):
            return False
        pos = found[1]
        if with_qos:
            if pos >= len(body) or body[pos] > 2:
                return False
            pos += 1
        count += 1
    return count > 0 and pos == len(body)


def publish_topic(prefix: bytes, length: int, qos: int) -> Reason | None:
    """Check a PUBLISH's topic from the first bytes of its body (`length` in all)."""
    found = _field(prefix, 0)
    if found is None or found[1] + (2 if qos else 0) > length:
        return Reason.PROTOCOL_ERROR
    topic = found[0]
    if not topic or not _text(topic) or topic.startswith(b"$") or b"+" in topic or b"#" in topic:
        return Reason.BAD_TOPIC
    return None


@dataclass(frozen=True, slots=True)
class _Header:
    kind: int
    flags: int
    length: int  # the remaining length: the body's size
    raw: bytes  # byte 1 and the remaining length as they came


class PacketReader:
    """amqtt's reader of one client connection (its ReaderAdapter: `read(n)`, `feed_eof()`).

    Reads the client's stream one MQTT packet at a time. A packet is refused on its fixed
    header alone when it announces more than `max_packet_bytes`, when it is not what a
    client may send (the first packet must be CONNECT, and only the first), or when its
    flags or length break MQTT 3.1.1; a CONNECT, SUBSCRIBE or UNSUBSCRIBE is refused unless
    its body holds exactly the fields it announces. `refuse(reason)` is called once (it
    counts and closes the connection) and amqtt reads end of stream from then on. A PUBLISH
    on a topic nobody may publish on is skipped unread and counted as `bad_topic` through
    `drop`; the connection stays. A PUBLISH's payload is handed to amqtt as it arrives,
    never buffered here; amqtt never reads past the end of the packet it is parsing.

    Safe to cancel (amqtt cancels a read after the keep-alive): what was read from the
    stream but not handed to amqtt is kept for the next read.
    """

    def __init__(
        self,
        stream: asyncio.StreamReader,
        max_packet_bytes: int,
        refuse: Callable[[Reason], None],
        drop: Callable[[Reason], None],
    ) -> None:
        self._stream = stream
        self._max = max_packet_bytes
        self._refuse, self._drop = refuse, drop
        self._head = bytearray()  # a fixed header being read
        self._header: _Header | None = None  # read, its body not yet
        self._buffer = b""  # of the current packet, read but not handed to amqtt
        self._pos = 0
        self._left = 0  # bytes of the current packet still in the stream
        self._skip = 0  # bytes of a dropped packet still to discard
        self._packets = 0
        self.closed = False

    @property
    def at_boundary(self) -> bool:
        """Whether amqtt has consumed every byte of the packets handed to it."""
        return self._pos == len(self._buffer) and self._left == 0

    def feed_eof(self) -> None:
        self._stream.feed_eof()

    async def read(self, n: int = -1) -> bytes:
        """`n` bytes of the current packet (the next one when amqtt has read it all);
        fewer (end of stream) when the connection ends or was refused."""
        if self.closed:
            return b""
        if n == 0:
            return b""
        if self.at_boundary and not await self._next_packet():
            return b""
        buffered = len(self._buffer) - self._pos
        if n < 0 or n > buffered + self._left:
            self._fail(Reason.PROTOCOL_ERROR)  # amqtt would read into the next packet
            return b""
        take = min(n, buffered)
        try:
            tail = await self._stream.readexactly(n - take) if n > take else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed = True
            return b""
        head = self._buffer[self._pos : self._pos + take]
        self._pos += take
        self._left -= len(tail)
        return head + tail if tail else head

    async def _next_packet(self) -> bool:
        """Read and check packets until one is for amqtt; False at the end of the stream."""
        try:
            while True:
                while self._skip:
                    chunk = await self._stream.readexactly(min(self._skip, _SKIP_CHUNK))
                    self._skip -= len(chunk)
                if self._header is None:
                    self._header = await self._fixed_header()
                    if self._header is None:
                        return False
                header = self._header
                if header.kind == PUBLISH:
                    prefix = await self._stream.readexactly(min(header.length, _TOPIC_PREFIX))
                    body_left = header.length - len(prefix)
                    self._header = None
                    problem = publish_topic(prefix, header.length, (header.flags >> 1) & 3)
                    if problem is Reason.PROTOCOL_ERROR:
                        return self._fail(problem)
                    if problem is not None:
                        self._skip = body_left
                        self._drop(problem)
                        continue
                    self._serve(header.raw + prefix, body_left)
                    return True
                body = await self._stream.readexactly(header.length)
                self._header = None
                if not _well_formed(header.kind, body):
                    return self._fail(Reason.PROTOCOL_ERROR)
                self._serve(header.raw + body, 0)
                return True
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed = True
            return False

    async def _fixed_header(self) -> _Header | None:
        """Byte 1 and the remaining length, checked; None when refused."""
        if not self._head:
            self._head += await self._stream.readexactly(2)  # every packet has 2 at least
        while self._head[-1] & 0x80:
            if len(self._head) == 5:  # a remaining length of more than 4 bytes
                self._fail(Reason.PROTOCOL_ERROR)
                return None
            self._head += await self._stream.readexactly(1)
        raw, self._head = bytes(self._head), bytearray()
        length = sum((b & 0x7F) << (7 * i) for i, b in enumerate(raw[1:]))
        kind, flags = raw[0] >> 4, raw[0] & 0x0F
        self._packets += 1
        if self._packets == 1 and kind != CONNECT:
            refusal = Reason.NOT_CONNECT
        elif len(raw) + length > self._max:
            refusal = Reason.PACKET_TOO_LARGE
        elif not _header_allowed(kind, flags, length, first=self._packets == 1):
            refusal = Reason.PROTOCOL_ERROR
        else:
            return _Header(kind, flags, length, raw)
        self._fail(refusal)
        return None

    def _serve(self, buffered: bytes, left: int) -> None:
        self._buffer, self._pos, self._left = buffered, 0, left

    def _fail(self, reason: Reason) -> bool:
        if not self.closed:
            self.closed = True
            self._refuse(reason)
        return False


def _header_allowed(kind: int, flags: int, length: int, *, first: bool) -> bool:
    if kind == CONNECT:
        return first and flags == 0 and length <= MAX_CONNECT_BYTES
    if kind == PUBLISH:  # QoS 3 does not exist; QoS 0 has no DUP (amqtt logs the payload)
        return (flags >> 1) & 3 != 3 and flags & 0x0E != 0x08
    if kind in (SUBSCRIBE, UNSUBSCRIBE):
        return flags == 2
    return _FIXED.get(kind) == (flags, length)


def _well_formed(kind: int, body: bytes) -> bool:
    if kind == CONNECT:
        return connect_well_formed(body)
    if kind in (SUBSCRIBE, UNSUBSCRIBE):
        return subscription_well_formed(body, with_qos=kind == SUBSCRIBE)
    return True  # a packet of fixed size, its size already checked
