"""MicroPython's ``ssl`` (old name ``ussl``) under CPython: real TLS from CPython's ssl module.

The firmware builds its context as on a board (MicroPython 1.23+)::

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=der_bytes)      # one DER certificate, as mbedTLS takes
    stream = ctx.wrap_socket(sock, server_hostname=host)

and gets the same behaviour from OpenSSL: the chain is checked against that CA alone,
the name against the certificate, the dates against the clock. The wrapped stream has
MicroPython's read/write methods (the usocket shim's). The name ``ussl`` keeps it from
shadowing CPython's own ``ssl``; `firmware.sim` hands this module to the board.

umqtt.simple 1.3.4 (the copy pinned for CPython) calls ``ussl.wrap_socket(sock,
**ssl_params)`` where umqtt.simple >= 1.4 (what mip installs on a board) calls
``ssl.wrap_socket(sock, server_hostname=server)`` on the SSLContext it is given:
`wrap_socket` here takes that context as ``context=`` so the pinned copy does the same.
"""

from __future__ import annotations

import socket as _socket
import ssl as _ssl
from typing import Protocol

__all__ = [
    "CERT_NONE",
    "CERT_OPTIONAL",
    "CERT_REQUIRED",
    "PROTOCOL_TLS_CLIENT",
    "SSLContext",
    "wrap_socket",
]

PROTOCOL_TLS_CLIENT = _ssl.PROTOCOL_TLS_CLIENT
CERT_NONE = _ssl.CERT_NONE
CERT_OPTIONAL = _ssl.CERT_OPTIONAL
CERT_REQUIRED = _ssl.CERT_REQUIRED

MAX_CADATA = 64 << 10


# A non-blocking read of a TLS stream with no record waiting is "nothing yet", as for a
# plain socket.
_WOULD_BLOCK = (BlockingIOError, _ssl.SSLWantReadError, _ssl.SSLWantWriteError)


class Stream(Protocol):
    """The usocket shim's socket, as far as this module uses it."""

    _sock: _socket.socket

    def __init__(
        self, *, _sock: _socket.socket, _would_block: tuple[type[Exception], ...]
    ) -> None: ...


class SSLContext:
    """MicroPython's client SSLContext on CPython's. Client side only: boards do not serve."""

    def __init__(self, protocol: int) -> None:
        if protocol != PROTOCOL_TLS_CLIENT:
            raise ValueError("only PROTOCOL_TLS_CLIENT: a board is a TLS client")
        # CPython's client default: CERT_REQUIRED and the server name checked.
        self._ctx = _ssl.SSLContext(_ssl.PROTOCOL_TLS_CLIENT)
        self._ctx.minimum_version = _ssl.TLSVersion.TLSv1_2  # what mbedTLS on the board speaks

    @property
    def verify_mode(self) -> int:
        return self._ctx.verify_mode

    @verify_mode.setter
    def verify_mode(self, mode: int) -> None:
        # mbedTLS checks the name only when it checks the chain: the same here.
        if mode == CERT_REQUIRED:
            self._ctx.check_hostname = True
        else:
            self._ctx.check_hostname = False
        self._ctx.verify_mode = _ssl.VerifyMode(mode)

    def load_verify_locations(self, cafile: str | None = None, cadata: bytes | None = None) -> None:
        """`cadata`: one DER certificate (bytes), as MicroPython takes it; or a DER file."""
        if cafile is not None:
            with open(cafile, "rb") as f:
                cadata = f.read(MAX_CADATA + 1)
        if not isinstance(cadata, bytes | bytearray) or not 0 < len(cadata) <= MAX_CADATA:
            raise ValueError("cadata must be the DER bytes of a CA certificate")
        self._ctx.load_verify_locations(cadata=bytes(cadata))

    def wrap_socket(
        self,
        sock: Stream,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        server_hostname: str | None = None,
    ) -> Stream:
        """The TLS stream over connected `sock` (handshake done unless told otherwise)."""
        if server_side:
            raise ValueError("client side only")
        raw = sock._sock  # the shim's CPython socket
        tls = self._ctx.wrap_socket(
            raw,
            server_hostname=server_hostname,
            do_handshake_on_connect=do_handshake_on_connect,
        )
        # The usocket shim's class (not imported: this module stays importable on its own).
        return type(sock)(_sock=tls, _would_block=_WOULD_BLOCK)


def wrap_socket(sock: Stream, *, context: SSLContext, server_hostname: str | None = None) -> Stream:
    """For the pinned umqtt.simple 1.3.4's ``ussl.wrap_socket(sock, **ssl_params)``:
    firmware.sim puts the board's SSLContext in ssl_params, and this does what umqtt.simple
    >= 1.4 does with it."""
    return context.wrap_socket(sock, server_hostname=server_hostname)
