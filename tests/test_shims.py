"""The usocket shim behaves like MicroPython's socket streams, over a real TCP connection."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import ModuleType

import pytest

from firmware.deps import shims_dir


def _load(name: str) -> ModuleType:
    """Import a shim from its file without putting the shims on sys.path."""
    spec = importlib.util.spec_from_file_location(f"_shim_{name}", shims_dir() / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


usocket = _load("usocket")


@pytest.fixture
def pair() -> Iterator[tuple[object, socket.socket]]:
    """(shim socket connected as a client, the server's plain CPython end)."""
    server = socket.create_server(("127.0.0.1", 0))
    client = usocket.socket()
    client.connect(usocket.getaddrinfo("127.0.0.1", server.getsockname()[1])[0][-1])
    peer, _ = server.accept()
    server.close()
    yield client, peer
    client.close()
    peer.close()


def test_the_shims_shadow_nothing_until_a_simulated_board_asks_for_them() -> None:
    probe = (
        "import importlib.util, firmware.deps, firmware.sim, firmware.provision\n"
        "for name in ('usocket', 'ustruct', 'ubinascii', 'micropython', 'tern_board'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
    )

    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)

    assert done.returncode == 0, done.stderr


def test_blocking_read_waits_for_exactly_n_bytes_sent_in_pieces(pair: tuple) -> None:
    client, peer = pair

    def trickle() -> None:
        for piece in (b"ab", b"c", b"defg"):
            peer.sendall(piece)
            time.sleep(0.02)

    sender = threading.Thread(target=trickle)
    sender.start()
    data = client.read(7)
    sender.join()

    assert data == b"abcdefg"


def test_blocking_read_returns_empty_bytes_when_the_peer_closed(pair: tuple) -> None:
    client, peer = pair
    peer.sendall(b"xy")
    peer.close()

    assert client.read(5) == b"xy"  # fewer than asked only at the end of the stream
    assert client.read(1) == b""


def test_non_blocking_read_returns_none_when_nothing_is_waiting(pair: tuple) -> None:
    client, peer = pair
    client.setblocking(False)

    assert client.read(1) is None

    peer.sendall(b"\xd0")
    deadline = time.monotonic() + 2
    got = None
    while got is None and time.monotonic() < deadline:
        got = client.read(1)
    assert got == b"\xd0"


def test_write_sends_everything_or_the_first_n_bytes(pair: tuple) -> None:
    client, peer = pair
    big = bytes(range(256)) * 8192  # 2 MiB: more than one send() takes
    received = bytearray()

    def drain() -> None:
        while len(received) < len(big) + 3:
            chunk = peer.recv(65536)
            if not chunk:
                break
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    assert client.write(big) == len(big)
    assert client.write(bytearray(b"\x10\x20\x30\x40\x50"), 3) == 3
    reader.join(timeout=10)

    assert bytes(received) == big + b"\x10\x20\x30"


def test_readinto_and_readline_follow_the_stream(pair: tuple) -> None:
    client, peer = pair
    peer.sendall(b"1,2,3\n4567")
    buf = bytearray(8)

    line = client.readline()
    n = client.readinto(buf, 3)

    assert line == b"1,2,3\n"
    assert n == 3 and bytes(buf[:3]) == b"456"


def test_getaddrinfo_gives_an_ipv4_address_the_default_socket_can_use() -> None:
    info = usocket.getaddrinfo("localhost", 1883)

    assert info[0][0] == socket.AF_INET
    assert info[0][-1] == ("127.0.0.1", 1883)


def test_ustruct_and_ubinascii_are_the_standard_modules_under_micropython_names() -> None:
    ustruct, ubinascii = _load("ustruct"), _load("ubinascii")
    buf = bytearray(4)

    ustruct.pack_into("!H", buf, 2, 0x1234)

    assert bytes(buf) == b"\0\0\x12\x34"
    assert ubinascii.hexlify(b"\x01\xff", ":") == b"01:ff"


def test_write_sends_a_str_as_utf8_as_micropython_streams_do(pair: tuple) -> None:
    client, peer = pair

    client.write("esp-1é")

    assert peer.recv(16) == "esp-1é".encode()
