"""Timing the trainers for `bench.trainer`: one-epoch train() calls, Wasm against numpy.

`measure_trainers` times each trainer as the device calls it: wasm, wasm without fuel
metering and numpy with one BLAS thread in one spawned child pinned to one core, numpy
with its default threads in this process, runs interleaved; `bench.trainer`'s docstring
says what each figure means. The models, the training config and the timeouts the
benchmark shares live here too.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import numpy.typing as npt

from device.trainer import NumpyTrainer, Trainer
from kernels.reference import init_weights, mlp_spec
from kernels.wasm import WasmTrainer
from tern.messages import TrainConfig
from tern.spec import ModelSpec

__all__ = [
    "COMMAND_TIMEOUT",
    "MODELS",
    "ONE_THREAD",
    "START_TIMEOUT",
    "TRAIN",
    "VARIANTS",
    "WORKER_VARIANTS",
    "F32Array",
    "IntArray",
    "Runner",
    "measure_trainers",
]

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

MODELS: dict[str, tuple[int, ...]] = {"demo": (40, 100, 100, 10), "wide": (40, 1000, 1000, 10)}
TRAIN = TrainConfig(epochs=1, batch_size=32, lr=0.5)
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WORKER_VARIANTS = ("wasm", "wasm_nofuel", "numpy_1t")  # in the pinned one-thread child
VARIANTS = (*WORKER_VARIANTS, "numpy")
START_TIMEOUT = 60.0  # a child process importing numpy and compiling the kernel
COMMAND_TIMEOUT = 300.0

Runner = Callable[[str, str, int], float]


# -- trainers -----------------------------------------------------------------------------


class _UnmeteredTrainer(WasmTrainer):
    """WasmTrainer on the packaged kernel compiled with consume_fuel=False."""

    name = "wasm_nofuel"

    def __init__(self) -> None:
        super().__init__(fuel=None)


class _Epochs:
    """Trainers and the models' initial weights in one process; times train() calls."""

    def __init__(self, x: F32Array, y: IntArray, seed: int, trainers: Mapping[str, Trainer]):
        self.x, self.y, self.seed = x, y, seed
        self.trainers = dict(trainers)
        rng = np.random.default_rng(seed)
        self.models: dict[str, tuple[ModelSpec, F32Array]] = {}
        for name, layers in MODELS.items():
            spec = mlp_spec(layers)
            self.models[name] = (spec, init_weights(spec, rng))

    def train(self, model: str, variant: str) -> F32Array:
        spec, weights = self.models[model]
        rng = np.random.default_rng(self.seed)  # every call: the same epoch, as a new round
        return self.trainers[variant].train(spec, weights, self.x, self.y, TRAIN, rng)

    def run(self, model: str, variant: str, calls: int) -> float:
        """Seconds for `calls` back-to-back one-epoch train() calls."""
        t0 = time.perf_counter()
        for _ in range(calls):
            self.train(model, variant)
        return time.perf_counter() - t0


def _threads() -> int:
    """Threads of this process (Linux), 0 where /proc is not there."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def _worker(conn: Connection, x: F32Array, y: IntArray, seed: int) -> None:
    """The one-thread child: answers (model, variant, calls) with seconds until None."""
    try:
        threads = _threads()  # before wasmtime compiles anything: BLAS threads only
        if hasattr(os, "sched_setaffinity"):
            # the last CPU: CPU 0 takes more interrupts and housekeeping (measured here: a
            # demo epoch medians 1.7-2.4 ms pinned to CPU 0, 1.43-1.47 ms to CPU 1)
            os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
        trainers = {"wasm": WasmTrainer(), "wasm_nofuel": _UnmeteredTrainer()}
        epochs = _Epochs(x, y, seed, {**trainers, "numpy_1t": NumpyTrainer()})
        for model in MODELS:  # the unmetered kernel must do exactly the same work
            if not np.array_equal(epochs.train(model, "wasm"), epochs.train(model, "wasm_nofuel")):
                raise RuntimeError(f"{model}: wasm with and without fuel train differently")
        conn.send(("ok", threads))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while (command := conn.recv()) is not None:
        try:
            conn.send(("ok", epochs.run(*command)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _OneThreadWorker:
    """A spawned child with one BLAS thread (set before its numpy loads), pinned to a core."""

    def __init__(self, x: F32Array, y: IntArray, seed: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_worker, args=(child, x, y, seed), daemon=True)
        with _environment(ONE_THREAD):
            self._process.start()
        child.close()
        self.threads = int(self._answer(START_TIMEOUT))

    def run(self, model: str, variant: str, calls: int) -> float:
        self._conn.send((model, variant, calls))
        return self._answer(COMMAND_TIMEOUT)

    def _answer(self, timeout: float) -> float:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"the one-thread worker did not answer within {timeout} s")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"the one-thread worker failed:\n{value}")
        return float(value)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(5.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5.0)
        self._conn.close()


def measure_trainers(
    x: F32Array, y: IntArray, repeat: int, min_run_s: float, seed: int
) -> tuple[dict[str, dict[str, float]], int]:
    """Figures per model (see the module docstring), and the one-thread worker's threads
    at its start (1 when its BLAS runs no threads of its own; 0: unknown)."""
    local = _Epochs(x, y, seed, {"numpy": NumpyTrainer()})
    worker = _OneThreadWorker(x, y, seed)
    try:
        runners: dict[str, Runner] = {v: worker.run for v in WORKER_VARIANTS}
        runners["numpy"] = local.run
        calls: dict[tuple[str, str], int] = {}
        for model in MODELS:
            for variant, run in runners.items():
                run(model, variant, 1)  # warm-up: code caches and first-touch pages
                once = run(model, variant, 1)
                calls[model, variant] = max(1, math.ceil(min_run_s / max(once, 1e-9)))
        per_call: dict[tuple[str, str], list[float]] = {k: [] for k in calls}
        for r in range(repeat):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for model in MODELS:
                for variant in order:
                    n = calls[model, variant]
                    per_call[model, variant].append(runners[variant](model, variant, n) / n)
    finally:
        worker.close()

    samples = x.shape[0]
    out: dict[str, dict[str, float]] = {}
    for model, layers in MODELS.items():
        s = {v: statistics.median(per_call[model, v]) for v in VARIANTS}
        out[model] = {
            "params": mlp_spec(layers).size,
            "wasm_samples_s": samples / s["wasm"],
            "numpy_samples_s": samples / s["numpy_1t"],
            "ratio": s["numpy_1t"] / s["wasm"],
            "numpy_default_samples_s": samples / s["numpy"],
            "ratio_vs_numpy_default": s["numpy"] / s["wasm"],
            "wasm_nofuel_samples_s": samples / s["wasm_nofuel"],
            "fuel_overhead": s["wasm"] / s["wasm_nofuel"] - 1.0,
            **{f"{v}_ms": 1e3 * s[v] for v in VARIANTS},
            **{f"{v}_calls_per_run": calls[model, v] for v in VARIANTS},
        }
    return out, worker.threads
