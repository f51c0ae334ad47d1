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
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.trainer_timing import COMMAND_TIMEOUT as COMMAND_TIMEOUT
from bench.trainer_timing import (
    MODELS,
    START_TIMEOUT,
    TRAIN,
    F32Array,
    IntArray,
    measure_trainers,
)
from bench.trainer_timing import ONE_THREAD as ONE_THREAD
from bench.trainer_timing import VARIANTS as VARIANTS
from bench.trainer_timing import WORKER_VARIANTS as WORKER_VARIANTS
from bench.trainer_timing import Runner as Runner
from broker.embedded import EmbeddedBroker
from broker.lifecycle import login_path, quiet_third_party_logs
from broker.transport import Message, MqttTransport
from coordinator import Coordinator, CoordinatorConfig
from gateway import Gateway, GatewayConfig
from kernels.partition import load_mnist1d
from tern import topics
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.keys import signing_key_to_text
from tern.logins import OBSERVER
from tern.members import new_members
from tern.reports import State, Status

__all__ = ["AgentResult", "agent_command", "main", "measure_agent", "measure_trainers"]

DATA_SEED = 42  # mnist1d's own default, as the demo
RSS_TARGET_MB = 80.0
MB = 2**20
FLEET, GATEWAY, DEVICE = "bench", "gw-1", "dev-01"
ROUND_TIMEOUT = 30.0


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
