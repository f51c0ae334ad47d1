"""MQTT by hand, and the brokers and checks the broker-limits tests share
(tests/test_broker_limits*.py): raw sockets writing MQTT byte by byte.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from broker.embedded import EmbeddedBroker
from tern import topics
from tests.helpers import wait_until
from tests.mqtt_fixtures import Inbox, MakeTransport

__all__ = [
    "FLEET",
    "MIB",
    "QUIET",
    "Raw",
    "_varint",
    "broker_starter",
    "collect",
    "connect_packet",
    "frame",
    "needs_proc",
    "publish_packet",
    "raw_opener",
    "round_trip",
    "rss",
    "settled",
    "subscribe_packet",
    "text",
]

FLEET = "plant-7"
QUIET = 0.4  # how long "nothing else arrives" is watched for
MIB = 1 << 20


# -- MQTT by hand ------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(first: int, body: bytes, announced: int | None = None) -> bytes:
    """A packet: byte 1, the remaining length (`announced`, or the body's), the body."""
    return bytes([first]) + _varint(len(body) if announced is None else announced) + body


def text(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(
    client_id: bytes,
    user: bytes | None = None,
    will: tuple[bytes, bytes] | None = None,
    clean: bool = True,
) -> bytes:
    flags = (0x02 if clean else 0) | (0x80 if user else 0) | (0x24 if will else 0)  # retained will
    body = text(b"MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big") + text(client_id)
    if will:
        body += text(will[0]) + text(will[1])
    return frame(0x10, body + (text(user) if user else b""))


def publish_packet(topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 1) -> bytes:
    body = text(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return frame(0x30 | qos << 1, body)


def subscribe_packet(topic_filter: bytes, qos: int = 1, packet_id: int = 1) -> bytes:
    return frame(0x82, packet_id.to_bytes(2, "big") + text(topic_filter) + bytes([qos]))


class Raw:
    """A bare TCP client that writes whatever it is told to."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def login(self, client_id: bytes, **kwargs: Any) -> Raw:
        self.send(connect_packet(client_id, **kwargs))
        assert self.packet() == (0x20, b"\x00\x00"), "CONNECT not accepted"
        return self

    def packet(self) -> tuple[int, bytes]:
        """The next packet the broker sends: (byte 1, body)."""
        first = self._exactly(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._exactly(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return first, self._exactly(length)

    def closed_within(self, timeout: float) -> bool:
        """Whether the broker closes the connection within `timeout` (data is discarded)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker")
            data += chunk
        return data


# -- brokers and checks ------------------------------------------------------------------


def broker_starter(stack: ExitStack) -> Callable[..., EmbeddedBroker]:
    """`start(limits=..., access=..., config=...)`: a started broker, stopped with `stack`."""

    def start(**kwargs: Any) -> EmbeddedBroker:
        return stack.enter_context(EmbeddedBroker("127.0.0.1", 0, **kwargs))

    return start


def raw_opener(stack: ExitStack) -> Callable[[EmbeddedBroker], Raw]:
    """`open_raw(broker)`: a Raw client of `broker`, closed with `stack`."""

    def open_raw(broker: EmbeddedBroker) -> Raw:
        client = Raw(broker.port)
        stack.callback(client.close)
        return client

    return open_raw


def rss() -> int:
    """This process's resident memory in bytes (the broker runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


needs_proc = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")


def settled(broker: EmbeddedBroker, expected: dict[str, int]) -> None:
    """`broker.refused` reaches `expected` and stays there (no late extra refusal)."""
    wait_until(lambda: broker.refused == expected, timeout=5)
    time.sleep(0.1)
    assert broker.refused == expected


def round_trip(broker: EmbeddedBroker, make_transport: MakeTransport, name: str = "check") -> None:
    """A normal subscriber receives what a normal publisher sends through `broker`."""
    inbox = Inbox()
    topic = topics.telemetry(FLEET, name)
    make_transport(broker.url, f"{name}-sub").subscribe(topic, inbox)
    make_transport(broker.url, f"{name}-pub").publish(topic, b"still serving", wait=True)
    inbox.wait_for(lambda m: m.payload == b"still serving")


def collect(inbox: Inbox, quiet: float = QUIET) -> list[tuple[str, bytes, bool]]:
    """Everything `inbox` got, once nothing more came for `quiet` seconds, sorted."""
    time.sleep(quiet)
    return sorted((m.topic, m.payload, m.retain) for m in inbox.messages)
