"""MicroPython's ``usocket`` under CPython: a real socket with MicroPython's stream methods.

umqtt.simple relies on MicroPython stream semantics that CPython sockets lack:
``read(n)`` on a blocking socket returns exactly n bytes (fewer only at end of stream,
b"" when the peer closed), ``read(n)`` on a non-blocking socket returns None when no
data is waiting, and ``write(buf[, n])`` sends everything. Name resolution is IPv4
only, as on the ESP32 (so ``getaddrinfo("localhost", ...)[0][-1]`` fits AF_INET).
"""

from __future__ import annotations

import contextlib
import socket as _socket
from typing import Any

__all__ = [
    "AF_INET",
    "IPPROTO_TCP",
    "SOCK_DGRAM",
    "SOCK_STREAM",
    "SOL_SOCKET",
    "SO_REUSEADDR",
    "getaddrinfo",
    "socket",
]

AF_INET = _socket.AF_INET
SOCK_STREAM = _socket.SOCK_STREAM
SOCK_DGRAM = _socket.SOCK_DGRAM
IPPROTO_TCP = _socket.IPPROTO_TCP
SOL_SOCKET = _socket.SOL_SOCKET
SO_REUSEADDR = _socket.SO_REUSEADDR

Buffer = bytes | bytearray | memoryview


def getaddrinfo(
    host: str, port: int, af: int = 0, type: int = 0, proto: int = 0, flags: int = 0
) -> list[tuple[Any, ...]]:
    """Like MicroPython's: a list of (family, type, proto, canonname, sockaddr), IPv4."""
    return _socket.getaddrinfo(host, port, af or AF_INET, type or SOCK_STREAM, proto, flags)


class socket:  # MicroPython's name, lower case
    """A CPython socket with MicroPython's read/write/readinto/readline on top."""

    def __init__(
        self,
        af: int = AF_INET,
        type: int = SOCK_STREAM,
        proto: int = 0,
        *,
        _sock: _socket.socket | None = None,
        _would_block: tuple[type[Exception], ...] = (BlockingIOError,),
    ) -> None:
        self._sock = _sock if _sock is not None else _socket.socket(af, type, proto)
        # What a non-blocking recv raises when nothing is waiting (TLS adds its own: ussl).
        self._would_block = _would_block

    # -- plain socket calls ------------------------------------------------------------
    def connect(self, addr: Any) -> None:
        self._sock.connect(addr)

    def bind(self, addr: Any) -> None:
        self._sock.bind(addr)

    def listen(self, backlog: int = 1) -> None:
        self._sock.listen(backlog)

    def accept(self) -> tuple[socket, Any]:
        conn, addr = self._sock.accept()
        return socket(_sock=conn), addr

    def setsockopt(self, level: int, opt: int, value: int) -> None:
        self._sock.setsockopt(level, opt, value)

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def send(self, buf: Buffer) -> int:
        return self._sock.send(buf)

    def sendall(self, buf: Buffer) -> None:
        self._sock.sendall(buf)

    def recv(self, n: int) -> bytes:
        return self._sock.recv(n)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def shutdown(self, how: int = _socket.SHUT_RDWR) -> None:
        """CPython only (not on MicroPython): wakes a thread blocked in read()."""
        with contextlib.suppress(OSError):  # closed or never connected: nothing to wake
            self._sock.shutdown(how)

    # -- MicroPython stream methods ----------------------------------------------------
    def read(self, n: int = -1) -> bytes | None:
        """Exactly n bytes when blocking (fewer only at end of stream); when non-blocking,
        None if nothing is waiting, else what is waiting up to n. n < 0: until the end."""
        chunks: list[bytes] = []
        got = 0
        while n < 0 or got < n:
            try:
                chunk = self._sock.recv(4096 if n < 0 else n - got)
            except self._would_block:
                if got == 0:
                    return None
                break
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def readinto(self, buf: bytearray | memoryview, nbytes: int | None = None) -> int | None:
        """Read into `buf` (up to nbytes); the count, or None when non-blocking and empty."""
        view = memoryview(buf)
        if nbytes is not None:
            view = view[:nbytes]
        data = self.read(len(view))
        if data is None:
            return None
        view[: len(data)] = data
        return len(data)

    def readline(self) -> bytes:
        """Up to and including b"\\n" (or what is left at end of stream)."""
        out = bytearray()
        while not out.endswith(b"\n"):
            byte = self.read(1)
            if not byte:
                break
            out += byte
        return bytes(out)

    def write(self, buf: Buffer | str, n: int | None = None) -> int:
        """Send all of `buf` (or its first n bytes); the number of bytes written.

        A str is sent as UTF-8, as MicroPython streams do (umqtt.simple writes its client
        id, user and password as given)."""
        view = memoryview(buf.encode() if isinstance(buf, str) else buf)
        if n is not None:
            view = view[:n]
        self._sock.sendall(view)
        return len(view)

    def __enter__(self) -> socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
