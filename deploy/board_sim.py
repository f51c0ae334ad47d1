"""Simulated ESP32 boards for docker-compose.yml: the real firmware under CPython.

    python3 board_sim.py windows TEST_NPZ OUT [COUNT [SEED]]   # a board's replay windows
    python3 board_sim.py run BOARD_DIR [BOARD_DIR ...]         # until SIGTERM or SIGINT

`windows` writes COUNT test windows, quantized as a board reads its sensor, one per line,
for `tern firmware provision --sensor replay --replay-file`. `run` starts one board per
directory that `tern firmware provision --dry-run --out BOARD_DIR` wrote: its config.json
(its key and broker login), its replay windows and, with TLS, the fleet CA it checks its
gateway's broker against. Each board keeps its store under $TERN_BOARD_STATE/ID; the
firmware's one dependency, umqtt.simple, comes from $TERN_FIRMWARE_DEPS when the image
carries it (built offline), else it is fetched (sha256-pinned) when a board starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import numpy as np

from firmware.errors import FirmwareError
from firmware.sim import SimulatedBoard
from tern.mcu import DEFAULT_IN_EXP, quantize_window

log = logging.getLogger("boards")
MAX_CONFIG_BYTES = 64 << 10


def windows(test_npz: str, out: str, count: int = 200, seed: int = 0) -> int:
    with np.load(test_npz) as data:
        x = np.asarray(data["x_test"] if "x_test" in data else data["x"], np.float32)
    rows = np.random.default_rng(seed).choice(len(x), size=min(count, len(x)), replace=False)
    lines = (",".join(map(str, quantize_window(x[r], DEFAULT_IN_EXP))) + "\n" for r in rows)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(lines))
    return 0


def _board(directory: Path, state: Path, deps: str | None) -> SimulatedBoard:
    with (directory / "config.json").open("rb") as fh:
        config = json.loads(fh.read(MAX_CONFIG_BYTES))
    tls = config.get("tls")
    ca = (directory / str(tls["ca"])).read_bytes() if tls else None
    return SimulatedBoard(
        config,
        directory / str(config["sensor"]["path"]),
        work_dir=state / str(config["device"]),
        cache_dir=deps,
        ca_der=ca,
    )


def run(directories: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    state = Path(os.environ.get("TERN_BOARD_STATE", "/var/lib/tern/state/boards"))
    deps = os.environ.get("TERN_FIRMWARE_DEPS")
    deps = deps if deps and Path(deps).is_dir() else None
    boards: list[SimulatedBoard] = []
    try:
        for directory in directories:
            boards.append(_board(Path(directory), state, deps).start())
            log.info("board %s started", boards[-1].device)
    except (OSError, ValueError, KeyError, FirmwareError) as exc:
        print(f"board_sim: {directory}: {exc}", file=sys.stderr)
        stop.set()
        failed = True
    else:
        failed = False
    stop.wait()
    for board in boards:
        try:
            board.stop(5.0)
        except FirmwareError as exc:
            print(f"board_sim: {board.device}: {exc}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "windows":
        count = int(argv[3]) if len(argv) > 3 else 200
        return windows(argv[1], argv[2], count, int(argv[4]) if len(argv) > 4 else 0)
    if len(argv) >= 2 and argv[0] == "run":
        return run(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
