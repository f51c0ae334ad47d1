"""Local training speed, Wasm kernel against the numpy reference, and the agent's peak RSS.

One local epoch (TrainConfig(epochs=1, batch_size=32, lr=0.5), as the demo trains) on
--samples rows of MNIST-1D (400: about one demo device's partition), for two MLPs:
  demo   40-100-100-10      the demo's model (15,210 parameters)
  wide   40-1000-1000-10    ten times wider (1,052,010 parameters)
Trainers, each timed as the device calls it (train() from the same global weights):
  wasm         kernels.wasm.WasmTrainer: kernels/mlp.wasm on wasmtime, fuel metered
  wasm nofuel  the same kernel compiled by an engine without fuel metering
  numpy 1t     kernels.reference.train_local with one BLAS thread
               (OPENBLAS_NUM_THREADS=OMP_NUM_THREADS=MKL_NUM_THREADS=1)
  numpy        the same with the machine's default BLAS threads
The first three run in one child process pinned to one core, the machine's last (the Wasm
kernel is single-threaded, so this is like for like; CPU 0 takes more interrupts and
housekeeping); numpy runs unpinned in this process. Each
timed run repeats train() until it has taken at least --min-run-s; the runs of all
trainers interleave (the order rotates every repeat) so drift hits every one, and every
figure is the median of --repeat runs.
  ratio         wasm samples/s / numpy 1t samples/s (the headline, one core each)
  ratio all     wasm samples/s / numpy (default threads) samples/s
  fuel          wasm nofuel samples/s / wasm samples/s - 1: 0.05 means fuel metering
                makes training 5% slower (the top-level figure is the demo MLP's)

Agent peak RSS: a real device agent process (`python -m device ... --trainer wasm`)
behind a real gateway (its own embedded broker) under a real coordinator (embedded
broker) on loopback trains --agent-rounds rounds of the demo MLP; then VmHWM from
/proc/<pid>/status, in MB (1 MB = 2**20 bytes), before it is stopped with SIGTERM.

    python -m bench.trainer [--samples 400] [--repeat 7] [--min-run-s 0.2]
                            [--agent-rounds 3] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import numpy.typing as npt

from broker.embedded import EmbeddedBroker
from broker.lifecycle import login_path, quiet_third_party_logs
from broker.transport import Message, MqttTransport
from coordinator import Coordinator, CoordinatorConfig
from device.trainer import NumpyTrainer, Trainer
from gateway import Gateway, GatewayConfig
from kernels.partition import load_mnist1d
from kernels.reference import init_weights, mlp_spec
from kernels.wasm import WasmTrainer
from tern import topics
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.keys import signing_key_to_text
from tern.logins import OBSERVER
from tern.members import new_members
from tern.messages import TrainConfig
from tern.reports import State, Status
from tern.spec import ModelSpec

__all__ = ["AgentResult", "agent_command", "main", "measure_agent", "measure_trainers"]

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

MODELS: dict[str, tuple[int, ...]] = {"demo": (40, 100, 100, 10), "wide": (40, 1000, 1000, 10)}
TRAIN = TrainConfig(epochs=1, batch_size=32, lr=0.5)
DATA_SEED = 42  # mnist1d's own default, as the demo
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WORKER_VARIANTS = ("wasm", "wasm_nofuel", "numpy_1t")  # in the pinned one-thread child
VARIANTS = (*WORKER_VARIANTS, "numpy")
RSS_TARGET_MB = 80.0
MB = 2**20
FLEET, GATEWAY, DEVICE = "bench", "gw-1", "dev-01"
START_TIMEOUT = 60.0  # a child process importing numpy and compiling the kernel
COMMAND_TIMEOUT = 300.0
ROUND_TIMEOUT = 30.0

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


# -- the device agent's peak RSS ----------------------------------------------------------


def agent_command(
    device: str, fleet_file: Path, key_file: Path, gateway_url: str, data_file: Path
) -> list[str]:
    """The device agent's command line: the Wasm trainer on the kernel the coordinator
    publishes, fetched over MQTT and cached next to the fleet file."""
    flags = [
        *("--id", device, "--fleet-file", str(fleet_file), "--key", str(key_file)),
        *("--gateway-url", gateway_url, "--data", str(data_file), "--trainer", "wasm"),
        *("--kernel-cache", str(fleet_file.parent / "kernels")),
        *("--state-dir", str(fleet_file.parent / f"{device}-state")),
    ]
    return [sys.executable, "-m", "device", *flags]


@dataclass(frozen=True, slots=True)
class AgentResult:
    peak_rss_mb: float  # VmHWM; NaN where /proc is not there
    rounds: int  # rounds the coordinator closed
    rounds_trained: int  # of them, rounds the device's update was aggregated in


def _vm_hwm_bytes(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                value, unit = line.split()[1:3]
                if unit != "kB":
                    raise ValueError(f"VmHWM in unexpected unit {unit!r}")
                return float(value) * 1024
    return math.nan


def _log_tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)


def _wait_online(
    url: str, process: subprocess.Popen[bytes], log_file: Path, login: tuple[str, str]
) -> None:
    """Until the device's retained status on its gateway's broker says online."""
    online = threading.Event()

    def on_status(message: Message) -> None:
        with contextlib.suppress(TernError):
            if Status.from_json(message.payload).state is State.ONLINE:
                online.set()

    watcher = MqttTransport(url, "bench-trainer-watch", login=login)
    watcher.subscribe(topics.status(FLEET, DEVICE), on_status)
    try:
        watcher.connect(START_TIMEOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not online.wait(0.2):
            if process.poll() is not None:
                raise RuntimeError(
                    f"the device agent exited with {process.returncode}:\n{_log_tail(log_file)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"the device agent was not online within {START_TIMEOUT} s")
    finally:
        watcher.close()


def measure_agent(x: F32Array, y: IntArray, rounds: int, seed: int, workdir: Path) -> AgentResult:
    """Peak RSS of a device agent process after `rounds` real rounds with the Wasm trainer."""
    members = new_members(
        FLEET, {GATEWAY: (COORDINATOR, [DEVICE])}, rng=np.random.default_rng(seed)
    )
    fleet, keys, logins = members.fleet, members.keys, members.logins
    fleet_file, key_file = workdir / "fleet.json", workdir / f"{DEVICE}.key"
    data_file, log_file = workdir / f"{DEVICE}.npz", workdir / f"{DEVICE}.log"
    fleet_file.write_text(fleet.to_json())
    key_file.write_text(signing_key_to_text(keys[DEVICE]) + "\n")
    login_path(key_file).write_text(logins[DEVICE].to_json() + "\n")
    np.savez(data_file, x=x, y=y)

    with contextlib.ExitStack() as stack:  # undone in reverse: coordinator, device, gateway
        top = stack.enter_context(EmbeddedBroker(port=0))
        gw_config = GatewayConfig(GATEWAY, top.url, listen_port=0, login=logins[GATEWAY])
        gateway = Gateway(gw_config, fleet, keys[GATEWAY])
        stack.callback(gateway.stop)
        gateway.start()
        command = agent_command(DEVICE, fleet_file, key_file, gateway.downstream_url, data_file)
        log = stack.enter_context(log_file.open("wb"))
        device = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        stack.callback(_stop_process, device)
        _wait_online(gateway.downstream_url, device, log_file, members.login(OBSERVER))
        config = CoordinatorConfig(
            broker_url=top.url,
            state_dir=workdir / "coordinator-state",
            layers=MODELS["demo"],
            rounds=rounds,
            round_timeout=ROUND_TIMEOUT,
            min_contributors=1,
            seed=seed,
            train=TRAIN,
        )
        coordinator = Coordinator(config, fleet, keys[COORDINATOR])
        stack.callback(coordinator.stop)
        coordinator.start()
        budget = rounds * (ROUND_TIMEOUT + 5.0)
        if not coordinator.wait_finished(budget):
            raise TimeoutError(f"{rounds} rounds unfinished after {budget:.0f} s")
        records = coordinator.records.values()
        trained = sum(r.ok and r.contributors == 1 for r in records)
        if device.poll() is not None:
            raise RuntimeError(f"the device agent died mid-run:\n{_log_tail(log_file)}")
        peak = _vm_hwm_bytes(device.pid)  # before SIGTERM, while the process is whole
    return AgentResult(peak / MB, len(records), trained)


# -- report -------------------------------------------------------------------------------


def _json_number(value: float) -> float | None:
    """Rounded for reading; an int as it is; None (null) for a figure not measured."""
    if isinstance(value, int):
        return value
    return round(value, 4) if math.isfinite(value) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--samples", type=int, default=400, help="training rows (one device's)")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per figure (median)")
    ap.add_argument("--min-run-s", type=float, default=0.2, help="least seconds per timed run")
    ap.add_argument("--agent-rounds", type=int, default=3, help="rounds the device agent trains")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    if args.samples < 1 or args.repeat < 1 or args.agent_rounds < 1 or args.min_run_s < 0:
        ap.error("--samples, --repeat and --agent-rounds must be >= 1, --min-run-s >= 0")

    t0 = time.perf_counter()
    quiet_third_party_logs()
    data = load_mnist1d(num_samples=math.ceil(args.samples / 0.8) + 1, seed=DATA_SEED)
    x, y = data.x[: args.samples], data.y[: args.samples]
    if x.shape[0] < args.samples:
        ap.error(f"only {x.shape[0]} training rows generated")
    figures, threads = measure_trainers(x, y, args.repeat, args.min_run_s, args.seed)
    with tempfile.TemporaryDirectory(prefix="tern-bench-trainer-") as tmp:
        agent = measure_agent(x, y, args.agent_rounds, args.seed, Path(tmp))
    seconds = time.perf_counter() - t0

    print(
        f"trainer benchmark: one local epoch (batch {TRAIN.batch_size}, lr {TRAIN.lr}) on "
        f"{args.samples} MNIST-1D samples; median of {args.repeat} interleaved runs"
    )
    print(
        "samples/s; wasm, nofuel (wasm without fuel metering) and numpy 1t (one BLAS thread) "
        f"on one pinned core; numpy: default BLAS threads, {os.cpu_count()} CPUs"
    )
    print("ratio = wasm / numpy 1t (headline, one core each); ratio all = wasm / numpy default")
    print("fuel = nofuel / wasm - 1 (0.05: fuel metering makes training 5% slower)")
    head = (
        f"{'model':<22} {'params':>9} {'wasm':>9} {'nofuel':>9} {'numpy 1t':>9} "
        f"{'numpy':>9} {'ratio':>6} {'ratio all':>9} {'fuel':>6}"
    )
    print(head)
    print("-" * len(head))
    for model, r in figures.items():
        name = f"{model} {'-'.join(map(str, MODELS[model]))}"
        print(
            f"{name:<22} {int(r['params']):>9,} {r['wasm_samples_s']:>9,.0f} "
            f"{r['wasm_nofuel_samples_s']:>9,.0f} {r['numpy_samples_s']:>9,.0f} "
            f"{r['numpy_default_samples_s']:>9,.0f} {r['ratio']:>6.3f} "
            f"{r['ratio_vs_numpy_default']:>9.3f} {r['fuel_overhead']:>+6.3f}"
        )
    if threads not in (0, 1):
        print(f"warning: the one-thread worker started with {threads} threads, not 1")
    met = agent.peak_rss_mb < RSS_TARGET_MB and agent.rounds_trained >= args.agent_rounds
    print(
        f"device agent (python -m device, wasm trainer) peak RSS (VmHWM, 1 MB = 2**20 bytes): "
        f"{agent.peak_rss_mb:.1f} MB after {agent.rounds_trained} of {args.agent_rounds} "
        f"rounds trained; target < {RSS_TARGET_MB:.0f} MB: {'met' if met else 'MISSED'}"
    )
    print(f"time: {seconds:.1f}s")
    if args.json:
        out: dict[str, object] = {
            model: {k: _json_number(v) for k, v in r.items()} for model, r in figures.items()
        }
        out["fuel_overhead"] = _json_number(figures["demo"]["fuel_overhead"])
        out["agent_peak_rss_mb"] = _json_number(agent.peak_rss_mb)
        out["agent_rss_target_met"] = met
        out["agent_rounds_trained"] = agent.rounds_trained
        out["numpy_1t_threads"] = threads
        out["samples"] = args.samples
        out["repeat"] = args.repeat
        out["seconds"] = round(seconds, 1)
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
