"""One decoder's run in bench.fuzz: what it records, the random engine, the timing again.

A run records every input's digest and time, keeps the first few crashing inputs (where
the exception escaped the project's code, the input in hex), the slowest inputs and a
reservoir of the others. The random engine runs in this process, uninstrumented: every
seed once, then random mutations of the seeds and pure random bytes. Whatever the engine,
the rows' times are measured again here, uninstrumented and with the garbage collector
paused, on the slowest inputs and the reservoir.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import heapq
import statistics
import traceback
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.fuzz_seeds import mutate, random_input
from bench.fuzz_targets import REPO, Target, run_one

__all__ = [
    "HEX_SHOWN",
    "RANDOM_SHARE",
    "Result",
    "describe_crash",
    "keep_crashes",
    "result_meta",
    "rng_for",
    "sample",
    "summarize",
]

RANDOM_SHARE = 10  # one input in ten is pure random bytes
KEEP_CRASHES = 5
SLOWEST_KEPT = 16
RESERVOIR = 500
RETIME_SLOWEST = 5
RETIME_SAMPLE = 5
HEX_SHOWN = 48  # bytes of a crashing input shown in the table and the JSON
# the fuzzer's own modules: a crash is placed where it escaped the code under test
_HARNESS = frozenset(
    Path(__file__).resolve().with_name(f"{module}.py")
    for module in ("fuzz", "fuzz_atheris", "fuzz_engine", "fuzz_seeds", "fuzz_targets")
)


# -- statistics of one decoder's run ---------------------------------------------------------


@dataclass
class Result:
    """What one decoder's run saw. Times are ns as measured (instrumented under atheris)."""

    name: str
    engine: str
    inputs: int = 0
    crashes: int = 0
    first_crashes: list[dict[str, object]] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    slowest: list[tuple[int, int, bytes]] = field(default_factory=list)  # heap (ns, n, data)
    reservoir: list[bytes] = field(default_factory=list)
    digest: Any = field(default_factory=lambda: hashlib.blake2b(digest_size=16))
    complete: bool = False

    def record(
        self, data: bytes, ns: int, exc: BaseException | None, rng: np.random.Generator
    ) -> None:
        self.inputs += 1
        self.digest.update(len(data).to_bytes(4, "little") + data)
        self.times.append(ns)
        entry = (ns, self.inputs, data)
        if len(self.slowest) < SLOWEST_KEPT:
            heapq.heappush(self.slowest, entry)
        elif ns > self.slowest[0][0]:
            heapq.heapreplace(self.slowest, entry)
        if len(self.reservoir) < RESERVOIR:
            self.reservoir.append(data)
        else:
            j = int(rng.integers(0, self.inputs))
            if j < RESERVOIR:
                self.reservoir[j] = data
        if exc is not None:
            self.crashes += 1
            if len(self.first_crashes) < KEEP_CRASHES:
                self.first_crashes.append(describe_crash(data, exc))


def describe_crash(data: bytes, exc: BaseException) -> dict[str, object]:
    # where it escaped the project's code (the last frames under the repository), and where
    # it was raised
    frames = traceback.extract_tb(exc.__traceback__)[1:]  # [0] is run_one
    ours = [f for f in frames if _in_repo(f.filename)]
    shown = [*ours[-2:], frames[-1]] if frames and frames[-1] not in ours[-2:] else ours[-3:]
    where = [f"{_short_path(f.filename)}:{f.lineno} {f.name}" for f in shown]
    return {
        "type": type(exc).__name__,
        "message": str(exc)[:200],
        "where": where,
        "length": len(data),
        "input_hex": data[:HEX_SHOWN].hex() + ("…" if len(data) > HEX_SHOWN else ""),
        "input_b64": base64.b64encode(data).decode() if len(data) <= 1 << 16 else "",
    }


def _in_repo(filename: str) -> bool:
    path = Path(filename).resolve()
    return (
        path.is_relative_to(REPO)
        and not path.is_relative_to(REPO / ".venv")
        and path not in _HARNESS
    )


def _short_path(filename: str) -> str:
    path = Path(filename).resolve()
    return str(path.relative_to(REPO)) if _in_repo(filename) else path.name


def rng_for(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


# -- the random engine: in this process, no instrumentation ---------------------------------


def sample(target: Target, inputs: int, seed: int) -> Result:
    """The random engine: every seed once, then mutations of them and random bytes."""
    rng = rng_for(seed, target.name)
    result = Result(target.name, "random")
    corpus = list(target.seeds)
    for i in range(inputs):
        if i < len(corpus):
            data = corpus[i]
        elif i % RANDOM_SHARE == 0:
            data = random_input(rng, target.max_len)
        else:
            data = mutate(corpus[int(rng.integers(0, len(corpus)))], corpus, rng, target.max_len)
        ns, exc = run_one(target, data)
        result.record(data, ns, exc, rng)
    result.complete = True
    return result


# -- timing again, uninstrumented --------------------------------------------------------------


def _retime(target: Target, data: bytes, runs: int) -> float:
    """Median ns of `runs` calls of the decoder on `data`, the collector paused."""
    times = []
    for _ in range(runs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            ns, _ = run_one(target, data)
        finally:
            if enabled:
                gc.enable()
        times.append(ns)
    return float(statistics.median(times))


def summarize(target: Target, meta: dict[str, Any], blobs: Sequence[bytes]) -> dict[str, Any]:
    """The row of one decoder: counts as the fuzzer saw them, times measured here."""
    n_slow = int(meta.get("slowest", 0))
    slow, pool = blobs[:n_slow], blobs[n_slow:]
    gc.collect()
    slow_ns = [_retime(target, d, RETIME_SLOWEST) for d in slow]
    pool_ns = [_retime(target, d, RETIME_SAMPLE) for d in pool]
    worst = int(np.argmax(slow_ns)) if slow_ns else -1
    row = {
        "inputs": int(meta.get("inputs", 0)),
        "crashes": int(meta.get("crashes", 0)),
        "slowest_ms": round(max(slow_ns + pool_ns, default=0.0) / 1e6, 3),
        "median_us": round(statistics.median(pool_ns) / 1e3, 2) if pool_ns else 0.0,
        "slowest_input_bytes": len(slow[worst]) if worst >= 0 else 0,
        "first_crashes": [
            {k: v for k, v in c.items() if k != "input_b64"} for c in meta.get("first_crashes", [])
        ],
        "digest": meta.get("digest", ""),
    }
    for key in ("instrumented_median_us", "instrumented_max_ms", "exec_per_s", "failure"):
        if key in meta:
            row[key] = meta[key]
    return row


def result_meta(result: Result) -> tuple[dict[str, Any], list[bytes]]:
    """A run's counts, and its slowest inputs then its reservoir: what `summarize` takes."""
    meta = {
        "inputs": result.inputs,
        "crashes": result.crashes,
        "first_crashes": result.first_crashes,
        "digest": result.digest.hexdigest(),
        "slowest": len(result.slowest),
    }
    blobs = [d for _, _, d in sorted(result.slowest, reverse=True)] + result.reservoir
    return meta, blobs


# -- artifacts ---------------------------------------------------------------------------------


def keep_crashes(directory: Path, name: str, meta: dict[str, Any]) -> None:
    """Write each kept crashing input of decoder `name` into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, crash in enumerate(meta.get("first_crashes", [])):
        if crash.get("input_b64"):
            path = directory / f"{name.replace('/', '_')}-crash-{i}.bin"
            path.write_bytes(base64.b64decode(crash["input_b64"]))
