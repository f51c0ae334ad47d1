"""Simulated ESP32 boards in the demo: the real firmware under CPython on each gateway's broker.

Each board is registered in its gateway's boards file, so the gateway derives and seals
its int8 model from every new global model; the board replays MNIST-1D test windows
and publishes a prediction per window. The demo listens to the telemetry the gateways
relay to the top broker and scores it against the windows' true labels. With the fleet
CA (`start(..., ca_file=...)`), a board whose gateway's broker is ``mqtts://`` connects
with TLS on that CA, after setting its clock (from the host's: the demo reaches no NTP
server), and the listener on an ``mqtts://`` top broker does too.
"""

from __future__ import annotations

import contextlib
import ssl
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from broker.transport import Message, MqttTransport
from broker.transport_types import TlsClient
from broker.urls import parse_url
from firmware.config import board_config, replay_sensor
from firmware.errors import FirmwareError
from firmware.sim import HOST_CLOCK, SimulatedBoard
from gateway.boards import BoardEntry, Boards, new_board_entry, save_boards
from tern import topics
from tern.errors import TernError
from tern.mcu import DEFAULT_IN_EXP, quantize_window
from tern.reports import Telemetry

__all__ = ["BoardTally", "DemoBoards", "print_boards"]

WINDOWS_PER_BOARD = 200


@dataclass
class BoardTally:
    """What one board reported: predictions per model version and their latency."""

    device: str
    gateway: str
    labels: list[int]  # true label of each replayed window, in replay order
    predictions: int = 0
    by_version: dict[int, list[int]] = field(default_factory=dict)  # version -> [right, all]
    latencies_us: list[int] = field(default_factory=list)

    def add(self, t: Telemetry) -> None:
        self.predictions += 1
        right = int(t.label == self.labels[t.seq % len(self.labels)])
        tally = self.by_version.setdefault(t.model_version, [0, 0])
        tally[0] += right
        tally[1] += 1
        self.latencies_us.append(t.latency_us)

    def row(self) -> dict[str, Any]:
        """For the summary and the JSON: the last model's accuracy on the board."""
        last = max(self.by_version, default=None)
        right, total = self.by_version.get(last, [0, 0]) if last is not None else (0, 0)
        return {
            "device": self.device,
            "gateway": self.gateway,
            "predictions": self.predictions,
            "model_version": last,
            "accuracy_last_model": right / total if total else None,
            "predictions_last_model": total,
            "latency_us_median": statistics.median(self.latencies_us)
            if self.latencies_us
            else None,
        }


class DemoBoards:
    """`count` boards spread over `gateways` round-robin, their state under `state_dir`."""

    def __init__(
        self,
        fleet: str,
        gateways: list[str],
        count: int,
        state_dir: Path,
        rng: np.random.Generator,
        rate_hz: float = 10.0,
    ) -> None:
        self.fleet, self.rate_hz, self.rng = fleet, rate_hz, rng
        self.dir = state_dir / "boards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.gateway_of = {f"esp-{i + 1}": gateways[i % len(gateways)] for i in range(count)}
        self.entries: dict[str, BoardEntry] = {b: new_board_entry(b) for b in self.gateway_of}
        self.tallies: dict[str, BoardTally] = {}
        self.boards: list[SimulatedBoard] = []
        self.skipped: str | None = None  # why no board runs, when none does
        self._lock = threading.Lock()
        self._listener: MqttTransport | None = None

    def boards_file(self, gateway: str) -> str | None:
        """The gateway's boards file (written now), or None when it serves no board."""
        mine = {b: self.entries[b] for b, g in self.gateway_of.items() if g == gateway}
        if not mine:
            return None
        path = self.dir / f"{gateway}.boards.json"
        save_boards(path, Boards(self.fleet, gateway, mine))
        return str(path)

    def start(
        self,
        downstream: dict[str, str],
        top_url: str,
        x_test: npt.NDArray[np.float32],
        y_test: npt.NDArray[np.integer],
        login: tuple[str, str] | None = None,
        ca_file: str | Path | None = None,
    ) -> None:
        """Listen for relayed telemetry on `top_url` (with `login`, the fleet's observer),
        then start every board on its gateway's broker; without the firmware's
        dependencies, record why and run none. `ca_file`: the fleet CA (PEM, ``ca.crt``),
        required when `top_url` or a gateway's URL is ``mqtts://``."""
        urls = {gw: parse_url(url) for gw, url in downstream.items()}
        needs_ca = parse_url(top_url).tls or any(u.tls for u in urls.values())
        if needs_ca and ca_file is None:
            raise ValueError("a broker of the demo speaks TLS: the boards need the fleet CA")
        der = None if ca_file is None else ssl.PEM_cert_to_DER_cert(Path(ca_file).read_text())
        tls = TlsClient(str(ca_file)) if parse_url(top_url).tls and ca_file is not None else None
        listener = MqttTransport(top_url, f"tern-{self.fleet}-demo-boards", login=login, tls=tls)
        listener.subscribe(topics.telemetry_all(self.fleet), self._on_telemetry)
        listener.connect(10.0)
        self._listener = listener
        for board, gw in self.gateway_of.items():
            rows = self.rng.choice(len(y_test), size=WINDOWS_PER_BOARD, replace=False)
            windows = self.dir / f"{board}.windows.txt"
            windows.write_text(
                "".join(
                    ",".join(map(str, quantize_window(x_test[r], DEFAULT_IN_EXP))) + "\n"
                    for r in rows
                )
            )
            with self._lock:
                self.tallies[board] = BoardTally(board, gw, [int(y_test[r]) for r in rows])
            host, port, secure = urls[gw]
            entry = self.entries[board]
            config = board_config(
                fleet=self.fleet,
                device=board,
                key=entry.key,
                host=host,
                port=port,
                mqtt_user=entry.mqtt_user,
                mqtt_password=entry.mqtt_password,
                sensor=replay_sensor(),
                rate_hz=self.rate_hz,
                tls=secure,
            )
            try:
                sim = SimulatedBoard(
                    config,
                    windows,
                    work_dir=self.dir / board,
                    rng=self.rng.spawn(1)[0],
                    ca_der=der if secure else None,
                    ntp_port=HOST_CLOCK,
                )
            except FirmwareError as exc:
                self.skipped = str(exc)
                return
            self.boards.append(sim.start())

    def _on_telemetry(self, message: Message) -> None:
        try:
            report = Telemetry.from_json(message.payload)
        except TernError:
            return
        with self._lock:
            tally = self.tallies.get(report.device)
            if tally is not None:
                tally.add(report)

    def stop(self, timeout: float = 5.0) -> None:
        for sim in self.boards:
            with contextlib.suppress(FirmwareError):  # the others' figures still count
                sim.stop(timeout)
        if self._listener is not None:
            self._listener.close(timeout)

    def rows(self) -> list[dict[str, Any]]:
        sims = {sim.device: sim for sim in self.boards}
        with self._lock:
            rows = [t.row() for t in self.tallies.values()]
        for row in rows:
            sim = sims.get(row["device"])
            row["refused"] = dict(sim.stats.get("rejected", {})) if sim is not None else {}
            row["tls"] = sim is not None and "tls" in sim.config  # it connects only with TLS
        return rows


def print_boards(boards: list[dict[str, Any]], skipped: str | None, out: TextIO) -> None:
    """The demo's table of its boards (`DemoBoards.rows`), and why none ran if none did."""
    if skipped is not None:
        print(f"boards: none ran ({skipped})", file=out)
    if not boards:
        return
    print(
        "\nboards (firmware under CPython; int8 model from their gateway; "
        "accuracy of the last model they ran, on their replayed test windows):",
        file=out,
    )
    print(
        f"{'board':>6} {'gateway':>8} {'predictions':>12} {'model':>6} {'accuracy':>9} "
        f"{'latency':>10} refused",
        file=out,
    )
    for b in boards:
        acc = (
            "n/a" if b["accuracy_last_model"] is None else f"{100 * b['accuracy_last_model']:.1f}%"
        )
        lat = "n/a" if b["latency_us_median"] is None else f"{b['latency_us_median']:,.0f} us"
        version = "none" if b["model_version"] is None else f"v{b['model_version']}"
        refused = ", ".join(f"{k} {v}" for k, v in sorted(b["refused"].items())) or "-"
        print(
            f"{b['device']:>6} {b['gateway']:>8} {b['predictions']:>12,} {version:>6} "
            f"{acc:>9} {lat:>10} {refused}",
            file=out,
        )
