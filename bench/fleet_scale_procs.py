"""bench.fleet_scale's processes: what it reads about them (CPU time, whole or split by
thread name; resident memory; a py-spy profile of a gateway and its summary), and how it
talks to its children (a line with a deadline, a JSON message, a stop).

Linux only (/proc); every reader returns 0.0 for a process that has gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

__all__ = [
    "Profile",
    "RunError",
    "broker_thread",
    "cpu_seconds",
    "mosquitto_pid",
    "read_line",
    "read_message",
    "rss_mb",
    "split_cpu",
    "stop_child",
    "summarize_profile",
]


class RunError(Exception):
    """A run could not set up or finish; `reason` says which step."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_TICK = os.sysconf("SC_CLK_TCK")
BROKER_THREAD_PREFIX = "amqtt-"  # broker.embedded names its loop thread amqtt-HOST:PORT


def _stat_cpu(path: Path) -> float:
    """utime + stime of a /proc/.../stat file, in seconds."""
    text = path.read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parens
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_seconds(pid: int) -> float:
    """CPU seconds `pid` has used (every thread, user and system)."""
    try:
        return _stat_cpu(Path(f"/proc/{pid}/stat"))
    except (OSError, ValueError, IndexError):
        return 0.0


def broker_thread(name: str) -> bool:
    """Whether a thread of that OS name is an embedded amqtt broker's (bench.fleet_scale_gateway
    names them)."""
    return name.startswith(BROKER_THREAD_PREFIX)


def split_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of `pid`'s embedded-broker threads, of all its other threads). Threads
    that ended are in neither: count only long-lived threads' time this way."""
    broker = other = 0.0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0, 0.0
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
            seconds = _stat_cpu(task / "stat")
        except (OSError, ValueError, IndexError):
            continue
        if broker_thread(name):
            broker += seconds
        else:
            other += seconds
    return broker, other


def rss_mb(pid: int, peak: bool = False) -> float:
    """Resident memory of `pid` in MiB now (VmRSS), or its peak so far (VmHWM)."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


class Profile:
    """py-spy sampling `pid` (every thread, not blocking it) into a collapsed-stack file,
    until `stop()`. `available` is False when py-spy is not installed."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.out = out
        binary = shutil.which("py-spy")
        self.available = binary is not None
        self._proc: subprocess.Popen[bytes] | None = None
        if binary is not None:
            cmd = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking",
                   "--threads", "--format", "raw", "--output", str(out)]  # fmt: skip
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self, timeout: float = 20.0) -> Path | None:
        """Stop sampling; the file, or None if py-spy wrote none."""
        if self._proc is None:
            return None
        self._proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None
        return self.out if self.out.exists() else None


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    samples: int
    by_area: list[tuple[str, float]]  # where the sampled thread was, by leaf frame's area
    top_self: list[tuple[str, float]]  # leaf functions, share of samples
    top_total: list[tuple[str, float]]  # project functions, share of samples under them
    by_thread: list[tuple[str, float]]


# Leaf frame's file -> area; the first that matches wins.
_AREAS = (
    ("nacl/", "signatures (pynacl)"),
    ("cbor2", "CBOR (cbor2)"),
    ("numpy/", "numpy"),
    ("paho/", "paho MQTT client"),
    ("amqtt/", "amqtt broker"),
    ("tern/codecs", "ternary codec"),
    ("tern/trits", "ternary codec"),
    ("tern/", "tern protocol"),
    ("gateway/", "gateway service"),
    ("broker/", "transport and loop (broker/)"),
    ("threading.py", "thread hand-off"),
    ("queue.py", "thread hand-off"),
    ("socket.py", "sockets"),
    ("selectors.py", "sockets"),
    ("logging/", "logging"),
)
_OURS = ("tern/", "gateway/", "broker/")


def _area(frame: str) -> str:
    for needle, area in _AREAS:
        if needle in frame:
            return area
    return "other Python"


def _function(frame: str) -> str:
    """'name (path/to/file.py:12)' -> 'name (file.py)'."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    parts = file.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{name} ({short})"


def summarize_profile(lines: Iterable[str], top: int = 10) -> ProfileSummary:
    """A py-spy raw (collapsed) profile: 'thread;frame;frame... COUNT' per line."""
    area: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        thread, calls = "", frames
        if frames[0].startswith("thread ("):  # py-spy --threads: "thread (TID): NAME"
            thread, calls = frames[0].partition(": ")[2], frames[1:]
        threads[thread] += count
        if not calls:
            continue
        area[_area(calls[-1])] += count
        leaf[_function(calls[-1])] += count
        for fn in {_function(f) for f in calls if any(o in f for o in _OURS)}:
            total[fn] += count

    def shares(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, v / samples) for k, v in c.most_common(top)] if samples else []

    return ProfileSummary(samples, shares(area), shares(leaf), shares(total), shares(threads))


# -- the benchmark's child processes ------------------------------------------------


def read_line(proc: subprocess.Popen[str], timeout: float, what: str, log_file: Path) -> str:
    """The next line `proc` prints, within `timeout`; RunError with its log otherwise."""
    out: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: out.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not out or not out[0]:
        tail = log_file.read_text()[-600:] if log_file.exists() else ""
        raise RunError(f"{what}: no answer within {timeout:.0f} s; its log ends: {tail!r}")
    return out[0].strip()


def read_message(
    proc: subprocess.Popen[str], timeout: float, gateway: str, workdir: Path, kind: str
) -> dict[str, Any]:
    """The next line of `gateway`'s device process: its JSON message `kind`."""
    what = f"devices of {gateway}"
    line = read_line(proc, timeout, what, workdir / f"devices-{gateway}.log")
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise RunError(f"{what}: not a JSON line: {line[:200]!r}") from exc
    if kind not in doc:
        raise RunError(f"{what}: {line[:300]}")
    body: dict[str, Any] = doc[kind]
    return body


def mosquitto_pid(workdir: Path) -> int:
    """The pid of the mosquitto this process started with its config under `workdir`."""
    for child in psutil.Process().children():
        try:
            if any(str(workdir) in arg for arg in child.cmdline()):
                return int(child.pid)
        except psutil.Error:
            continue
    raise RunError(f"no mosquitto process for {workdir}")


def stop_child(proc: subprocess.Popen[str]) -> None:
    """Ask a child to end (SIGTERM: the gateway says goodbye), then insist."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5.0)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            _close_pipe(pipe)


def _close_pipe(pipe: IO[str]) -> None:
    with suppress(OSError):
        pipe.close()
