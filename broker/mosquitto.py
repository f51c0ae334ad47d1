"""A Mosquitto process on a free loopback port with tern's settings, for tests and
benchmarks (production runs its own Mosquitto; `tern mosquitto-config` writes its config).

By default the process runs an open config (anonymous clients, no rights); `configure`
writes another one for the port it is given, such as a fleet's from
`broker.mosquitto_config.write_mosquitto_config`.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from broker.errors import BrokerStartError
from broker.urls import format_url

__all__ = [
    "Configure",
    "MosquittoProcess",
    "find_mosquitto",
    "free_port",
    "open_config",
    "wait_until_accepting",
]

START_TIMEOUT = 10.0

# max_queued_messages: the default (1000) silently drops QoS 1 messages queued for a
# slow subscriber, and a gateway taking a burst of device updates is one.
# set_tcp_nodelay: small MQTT packets otherwise wait ~40 ms for Nagle's algorithm.
_CONFIG = """listener {port} {host}
allow_anonymous true
persistence false
log_dest stderr
max_queued_messages 10000
set_tcp_nodelay true
"""


# (workdir, host, port) -> the mosquitto.conf it wrote for a listener on host:port
Configure = Callable[[Path, str, int], Path]


def open_config(workdir: Path, host: str, port: int) -> Path:
    """The default: anonymous clients, tern's queue and latency settings, no persistence."""
    config = workdir / "mosquitto.conf"
    config.write_text(_CONFIG.format(port=port, host=host))
    return config


def find_mosquitto() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for programs that cannot bind port 0).

    Chosen below the kernel's ephemeral range when it can be: a broker restarted on
    the port of an ephemeral-range listener can find it taken by a reconnecting client,
    whose own local port the kernel drew from that range (on loopback a client can even
    connect to itself). Outside the range no client socket ever holds the port.
    """
    low = _ephemeral_low()
    candidates = random.sample(range(_PRIVATE_FLOOR, low), min(64, low - _PRIVATE_FLOOR))
    for port in [*candidates, 0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise BrokerStartError("no free port", host, 0)


_PRIVATE_FLOOR = 20000


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return max(_PRIVATE_FLOOR, int(text.split()[0]))
    except (OSError, ValueError, IndexError):
        return _PRIVATE_FLOOR  # unknown range: fall back to a kernel-chosen port


def wait_until_accepting(
    host: str, port: int, timeout: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Return once `host`:`port` accepts TCP connections; BrokerStartError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if not alive():
                raise BrokerStartError("exited before accepting connections", host, port) from None
            if time.monotonic() > deadline:
                raise BrokerStartError(f"not accepting after {timeout} s", host, port) from None
            time.sleep(0.02)


class MosquittoProcess:
    """`binary` serving on a free port of `host`; config and log in `workdir`.

    `configure(workdir, host, port)` writes the config (default: `open_config`); it is
    called again at each start, with the same port after a `restart`.
    """

    def __init__(
        self,
        binary: str,
        workdir: Path,
        host: str = "127.0.0.1",
        *,
        configure: Configure | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.binary, self.workdir, self.host = binary, workdir, host
        self._configure = configure
        self.log = workdir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        # A port free now is not necessarily free once mosquitto binds it: retry.
        for attempt in range(3):
            self.port = free_port(host)
            try:
                self._spawn()
                return
            except BrokerStartError:
                if attempt == 2:
                    raise

    @property
    def url(self) -> str:
        return format_url(self.host, self.port)

    def _spawn(self) -> None:
        if self._configure is None:
            config = open_config(self.workdir, self.host, self.port)
        else:
            config = _as_root(self._configure(self.workdir, self.host, self.port))
        with self.log.open("ab") as log:
            process = subprocess.Popen(
                [self.binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        self._process = process
        try:
            wait_until_accepting(
                self.host, self.port, START_TIMEOUT, lambda: process.poll() is None
            )
        except BrokerStartError as exc:
            self.stop()
            raise BrokerStartError(
                f"{exc.args[0]}; mosquitto log:\n{self.log.read_text()}", self.host, self.port
            ) from exc

    def start(self) -> None:
        """Start again on the same port after `stop()` (a broker that was down)."""
        if self._process is None:
            self._spawn()

    def restart(self) -> None:
        """Stop and start again on the same port (retained messages are gone unless the
        config keeps them: `persistence true`)."""
        self.stop()
        self._spawn()

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        self._process = None

    def __enter__(self) -> MosquittoProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _as_root(config: Path) -> Path:
    """Started as root, mosquitto switches to the `mosquitto` user before it reads the
    password and ACL files, and that user cannot read a test's private directories. A
    copy of the config that stays root (`user root`) is run instead; the original is
    left as written, as an administrator would deploy it (owned by `mosquitto`)."""
    if os.geteuid() != 0:
        return config
    wrapped = config.with_name(f".{config.stem}-as-root.conf")
    wrapped.write_text("user root\n" + config.read_text())
    return wrapped
