"""Simulated boards: the real firmware (firmware/esp32) running under CPython in a thread.

Nothing is mocked below the firmware's own seams: umqtt.simple 1.3.4 from PyPI talks
MQTT over a real socket (through the usocket shim), the board's clock is
time.monotonic, there is no radio, and the sensor is the firmware's ReplaySensor on a
windows file. A board configured for TLS speaks real TLS (CPython's ssl behind the
ussl shim, on the fleet CA it is given) after setting its clock with a real NTP query
(the ntptime shim) or, where no NTP server is reachable, from the host's clock. Used by
the end-to-end tests and by ``tern demo``.
"""

from __future__ import annotations

import importlib
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from ssl import SSLSocket
from types import ModuleType
from typing import Any

import numpy as np

from firmware.deps import Fetch, fetch_url, sys_path_dirs
from firmware.errors import SimError

__all__ = ["HOST_CLOCK", "CPythonClock", "SimulatedBoard", "firmware_modules"]

_PATH_LOCK = threading.Lock()
HOST_CLOCK = -1  # ntp_port: no NTP query, the board's clock is set from the host's
log = logging.getLogger(__name__)


class CPythonClock:
    """MicroPython's time.ticks_* on time.monotonic (no wrap-around: Python ints).

    sleep_ms returns early once `stop` is set, so a board in a long backoff stops at once.
    """

    def __init__(self, stop: threading.Event | None = None) -> None:
        self._stop = stop or threading.Event()

    def ticks_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000

    def ticks_us(self) -> int:
        return time.monotonic_ns() // 1_000

    def ticks_add(self, ticks: int, delta: int) -> int:
        return ticks + delta

    def ticks_diff(self, a: int, b: int) -> int:
        return a - b

    def sleep_ms(self, ms: int) -> None:
        self._stop.wait(max(0, ms) / 1000)

    def sleep(self, seconds: float) -> None:
        self._stop.wait(max(0.0, seconds))


def firmware_modules(
    cache_dir: Path | str | None = None, *, fetch: Fetch = fetch_url
) -> tuple[ModuleType, ModuleType, ModuleType]:
    """(tern_board, tern_sensors, umqtt.simple) imported from the firmware, under CPython.

    Appends the deps, shims and firmware directories to sys.path (once; appended, so they
    shadow nothing already importable) and checks umqtt.simple is the pinned copy.
    """
    dirs = [str(d) for d in sys_path_dirs(cache_dir, fetch=fetch)]
    with _PATH_LOCK:
        sys.path.extend(d for d in dirs if d not in sys.path)
    try:
        board = importlib.import_module("tern_board")
        sensors = importlib.import_module("tern_sensors")
        simple = importlib.import_module("umqtt.simple")
    except ImportError as exc:
        raise SimError(f"cannot import the firmware under CPython: {exc}") from exc
    origin = Path(simple.__file__ or "").resolve()
    if not origin.is_relative_to(Path(dirs[0]).resolve()):
        raise SimError(f"umqtt.simple comes from {origin}, not the pinned copy in {dirs[0]}")
    return board, sensors, simple


def _getrandbits(rng: np.random.Generator) -> Callable[[int], int]:
    """MicroPython's random.getrandbits on an explicit generator (the backoff jitter)."""

    def getrandbits(k: int) -> int:
        return int(rng.integers(0, 1 << k))

    return getrandbits


class SimulatedBoard:
    """One board: ``start()``, watch ``stats`` / ``model_version`` / ``model_order``,
    ``stop(timeout)``.

    `config` is a board's config.json as a dict (firmware.config.board_config);
    `windows` is a replay file (one window per line, comma-separated ints). The board's
    persistent store lives in `work_dir` (a fresh temporary directory by default); `rng`
    drives the reconnect jitter.

    With TLS in `config` (firmware.config.board_config(tls=...)), `ca_der` is the fleet
    CA the bundle would carry (written to the store under the config's name), and the
    board sets its clock from the config's NTP host on `ntp_port` (HOST_CLOCK: from the
    host's clock, no query). What the board would print on its console is logged.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        windows: Path | str,
        *,
        work_dir: Path | str | None = None,
        cache_dir: Path | str | None = None,
        fetch: Fetch = fetch_url,
        rng: np.random.Generator | None = None,
        ca_der: bytes | None = None,
        ntp_port: int = HOST_CLOCK,
    ) -> None:
        self.config = dict(config)
        self.device = str(config["device"])
        self._stop = threading.Event()
        self._tmp = (
            None
            if work_dir is not None
            else tempfile.TemporaryDirectory(prefix=f"tern-board-{self.device}-")
        )
        self.store_dir = Path(work_dir if work_dir is not None else self._tmp.name)  # type: ignore[union-attr]
        self.store_dir.mkdir(parents=True, exist_ok=True)
        board_mod, sensors_mod, simple = firmware_modules(cache_dir, fetch=fetch)
        tls = self.config.get("tls")
        if ca_der is not None:
            if tls is None:
                raise SimError(f"board {self.device}: a CA was given, but its config has no tls")
            (self.store_dir / str(tls["ca"])).write_bytes(ca_der)
        ntptime = importlib.import_module("ntptime")  # the shim: one clock per board
        self.ntp: Any = (
            ntptime.NtpClock(host_clock=True)
            if ntp_port == HOST_CLOCK
            else ntptime.NtpClock(port=ntp_port)
        )
        self._clients: list[Any] = []
        self.clients_made = 0  # MQTT clients the firmware asked for: its connection attempts
        client_class = simple.MQTTClient

        def mqtt_factory(
            client_id: Any,
            server: str,
            port: int,
            user: Any,
            password: Any,
            keepalive: int,
            ssl: Any = None,
        ) -> Any:
            if ssl is None:
                client = client_class(client_id, server, port, user, password, keepalive)
            else:  # the pinned 1.3.4's TLS hook, used as umqtt.simple >= 1.4 uses ssl=
                params = {"context": ssl, "server_hostname": server}
                client = client_class(
                    client_id, server, port, user, password, keepalive, True, params
                )
            self._clients.append(client)
            del self._clients[:-1]  # only the live one matters, to wake it on stop()
            self.clients_made += 1
            return client

        self.board: Any = board_mod.Board(
            self.config,
            sensors_mod.ReplaySensor(str(windows)),
            mqtt_factory=mqtt_factory,
            clock=CPythonClock(self._stop),
            radio=None,
            store_dir=str(self.store_dir),
            getrandbits=_getrandbits(rng or np.random.default_rng()),
            ssl=importlib.import_module("ussl"),
            ntp=self.ntp,
            log=lambda line: log.warning("board %s: %s", self.device, line),
        )
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> SimulatedBoard:
        if self._thread is not None:
            raise SimError(f"board {self.device} already started")
        self._thread = threading.Thread(target=self._run, name=f"board-{self.device}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.board.run(self._stop.is_set)
        except BaseException as exc:  # reported by stop() and `error`, not lost in a thread
            self.error = exc

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the board's loop and wait for it, at most `timeout` seconds."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(min(0.5, timeout))
            if thread.is_alive():
                # blocked in a socket read: wake it; the loop then sees the stop flag
                for client in list(self._clients):
                    sock = getattr(client, "sock", None)
                    if sock is not None and hasattr(sock, "shutdown"):
                        sock.shutdown()
                thread.join(max(0.0, timeout - 0.5))
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if thread is not None and thread.is_alive():
            raise SimError(f"board {self.device} did not stop within {timeout:g} s")
        if self.error is not None:
            raise SimError(f"board {self.device} failed: {self.error!r}") from self.error

    def __enter__(self) -> SimulatedBoard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stats(self) -> dict[str, Any]:
        """A copy of the firmware's counters (accepted, rejected by reason, telemetry, ...)."""
        live = self.board.stats
        return {k: dict(v) if isinstance(v, dict) else v for k, v in list(live.items())}

    @property
    def tls_version(self) -> str | None:
        """The TLS version of the board's live connection ("TLSv1.3"), None when it has
        none or it is plain MQTT."""
        client = self.board.client
        stream = getattr(client, "sock", None)
        raw = getattr(stream, "_sock", None)  # the usocket shim's CPython socket
        return raw.version() if isinstance(raw, SSLSocket) else None

    @property
    def model_version(self) -> int | None:
        model = self.board.model
        return None if model is None else int(model.model_version)

    @property
    def model_order(self) -> tuple[int, int] | None:
        """(run, model_version) of the model the board runs: the order it accepts models by."""
        model = self.board.model
        return None if model is None else (int(model.run), int(model.model_version))

    def wait_until(
        self, predicate: Callable[[SimulatedBoard], bool], timeout: float, poll: float = 0.05
    ) -> bool:
        """Poll `predicate(self)` until true (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return True
            if time.monotonic() >= deadline or (self._thread and not self.running):
                return predicate(self)
            time.sleep(poll)
