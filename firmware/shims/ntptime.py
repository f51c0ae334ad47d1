"""MicroPython's ``ntptime`` under CPython: a real SNTP query sets a simulated board's clock.

On a board, ``ntptime.host = "pool.ntp.org"; ntptime.settime()`` asks the NTP server for
the time over UDP and sets the RTC; it raises OSError when no answer comes. A CPython
process cannot set the host's clock, and simulated boards share a process, so here each
board gets its own `NtpClock` (firmware.sim makes one per board): ``settime()`` makes the
same query (RFC 4330, client mode) and keeps the board's clock as an offset from the
host's. `port` is a CPython-only extension, so tests can run an NTP server on a free
port; ``host_clock=True`` takes the host's clock without a query, for machines that
reach no NTP server (``tern demo``).
"""

from __future__ import annotations

import socket
import struct
import time

__all__ = ["NTP_DELTA", "NtpClock", "NtpError"]

NTP_DELTA = 2_208_988_800  # seconds from 1900-01-01 (NTP's epoch) to 1970-01-01
NTP_PORT = 123
PACKET = 48
_MODE_SERVER = 4


class NtpError(OSError):
    """No usable time: no answer by the deadline, or an answer that is not a server's."""


class NtpClock:
    """One board's clock and its ntptime: `host`, `timeout`, `time()`, `settime()`."""

    def __init__(
        self,
        host: str = "pool.ntp.org",
        *,
        port: int = NTP_PORT,
        timeout: float = 1.0,
        host_clock: bool = False,
    ) -> None:
        self.host, self.port, self.timeout, self.host_clock = host, port, timeout, host_clock
        self.offset: float | None = None  # board time - host time, once set
        self.queries = 0

    @property
    def is_set(self) -> bool:
        return self.offset is not None

    def now(self) -> float:
        """The board's clock, seconds since 1970; NtpError before settime()."""
        if self.offset is None:
            raise NtpError("the board's clock is not set")
        return time.time() + self.offset

    def time(self) -> int:
        """Seconds since 1970 from the NTP server (MicroPython's ntptime.time(), whose
        epoch depends on the port)."""
        if self.host_clock:
            return int(time.time())
        self.queries += 1
        request = bytearray(PACKET)
        request[0] = 0x1B  # LI 0, version 3, mode 3 (client)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout)
            try:
                addr = socket.getaddrinfo(self.host, self.port, socket.AF_INET)[0][-1]
                sock.sendto(request, addr)
                reply, _ = sock.recvfrom(PACKET + 16)  # anything longer is not SNTP's
            except OSError as exc:  # timeout, refused, no such host
                raise NtpError(f"NTP {self.host}:{self.port}: {exc}") from exc
        if len(reply) < PACKET or reply[0] & 0x07 != _MODE_SERVER or reply[1] == 0:
            raise NtpError(f"NTP {self.host}:{self.port}: not a server's answer")
        seconds = int(struct.unpack_from("!I", reply, 40)[0])  # transmit time, integer part
        if seconds == 0:
            raise NtpError(f"NTP {self.host}:{self.port}: no transmit time")
        return seconds - NTP_DELTA

    def settime(self) -> None:
        """Set the board's clock from time(); NtpError (an OSError) when there is none."""
        self.offset = self.time() - time.time()
