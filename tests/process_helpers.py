"""Real tern processes for tests: spawn `python -m ...`, read what they log, end them.

`Spawned` collects a process's stderr (where tern logs) line by line on a thread, so a
test can wait for a line with a deadline; the process is killed at the end of the test
if it still runs. `component_args` builds the command line of a coordinator, gateway or
device of a fleet written by `tests.fleet_fixtures.write_fleet`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from tests.fleet_fixtures import device_data

__all__ = ["REPO", "Spawned", "component_args", "error_lines"]

REPO = Path(__file__).resolve().parents[1]


class Spawned:
    """A `python ARGS...` child whose stderr lines are kept in `lines`."""

    def __init__(self, args: list[str], stack: ExitStack) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        stack.callback(self.kill)

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout: float) -> str:
        """The first stderr line matching `pattern` (a regex); AssertionError after
        `timeout` seconds, or as soon as the process ends without printing it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [line for line in self.lines if re.search(pattern, line)]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line like {pattern!r} in {self.lines[-20:]}")
                self._changed.wait(min(left, 0.2))

    def stderr(self, timeout: float = 10.0) -> str:
        """Everything it wrote to stderr, once it has ended."""
        self._reader.join(timeout)
        with self._changed:
            return "\n".join(self.lines)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)
        self._reader.join(timeout=10)


def component_args(component: str, kit_dir: Path, url: str, tmp_path: Path) -> list[str]:
    """`-m COMPONENT ...` for the coordinator, gw-1 or dev-01 of the fleet in `kit_dir`
    (one gateway gw-1 with dev-01), its upstream broker at `url`; state under tmp_path."""
    fleet = ["--fleet-file", str(kit_dir / "fleet.json")]
    if component == "coordinator":
        key = ["--key", str(kit_dir / "coordinator.key")]
        return [
            "-m", "coordinator", "--broker", url, *fleet, *key,
            "--state-dir", str(tmp_path / "coordinator"), "--layers", "8,4,3",
        ]  # fmt: skip
    if component == "gateway":
        return [
            "-m", "gateway", "--id", "gw-1", *fleet, "--key", str(kit_dir / "gw-1.key"),
            "--upstream", url, "--listen", "127.0.0.1:0",
            "--state-dir", str(tmp_path / "gw-1"),
        ]  # fmt: skip
    if component == "device":
        data = tmp_path / "dev-01.npz"
        if not data.exists():
            x, y = device_data("dev-01")
            np.savez(data, x=x, y=y)
        return [
            "-m", "device", "--id", "dev-01", *fleet, "--key", str(kit_dir / "dev-01.key"),
            "--gateway-url", url, "--data", str(data), "--trainer", "numpy",
            "--state-dir", str(tmp_path / "dev-01"),
            "--kernel-cache", str(tmp_path / "kernels"),
        ]  # fmt: skip
    raise ValueError(component)


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines of a process's stderr."""
    return [line for line in stderr.splitlines() if line.strip()]


def run(args: list[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`python ARGS` in the repository, its output captured as text."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        **kwargs,
    )  # fmt: skip


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command printed; fails on a traceback or more lines."""
    lines = error_lines(result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]
