"""One run of bench.fleet_scale: a fresh fleet, its brokers, gateways and devices, R rounds.

Processes (every one a real component on loopback, on free ports):
  upstream broker  amqtt: broker.embedded in this process; mosquitto: its own process,
                   configured by `tern mosquitto-config`'s writer with the fleet's ACL
  coordinator      the real Coordinator, in this process (it opens every round and folds
                   the gateways' partials; its RoundRecord closes the round)
  gateways         `tern gateway` each in its own process (bench.fleet_scale_gateway),
                   serving its devices on its own embedded amqtt broker, or on a
                   Mosquitto process of its own with the fleet's ACL
  devices          one process per gateway (bench.fleet_scale_devices): one gmqtt
                   connection, client id, login and session per device
Between two round closes the bench reads every process's CPU time from /proc, so a
round's figures cover everything that round cost, the model and schedule relays included.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import fleet_scale_procs as procs
from bench.fleet_scale_devices import raise_fd_limit
from bench.fleet_scale_procs import RunError
from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.fleet_access import broker_policy
from broker.lifecycle import write_atomic
from broker.mosquitto import MosquittoProcess
from broker.mosquitto_config import write_mosquitto_config
from coordinator import Coordinator, CoordinatorConfig
from coordinator.store import RoundRecord
from tern.fleet import COORDINATOR
from tern.keys import signing_key_to_text
from tern.members import new_members

__all__ = ["RoundFigures", "RunError", "RunResult", "RunSpec", "run_fleet"]

log = logging.getLogger(__name__)

FLEET = "scale"
LAYERS = (40, 100, 100, 10)
HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class RunSpec:
    broker: str  # "amqtt" | "mosquitto"
    devices: int
    gateways: int
    rounds: int  # measured, after one warm-up round
    seed: int = 0
    round_timeout: float = 0.0  # 0: sized for the fleet
    profile: Path | None = None  # py-spy of the first gateway over the measured rounds

    @property
    def timeout(self) -> float:
        return self.round_timeout or max(30.0, 0.01 * self.devices)


@dataclass(frozen=True, slots=True)
class RoundFigures:
    round: int
    round_s: float
    sent: int  # updates the devices published for this round
    counted: int  # devices counted in the partials the coordinator folded
    broker_cpu_s: float  # the device-facing brokers
    gateway_cpu_s: float  # the gateways, their embedded brokers' threads left out
    devices_cpu_s: float  # the load generators
    upstream_cpu_s: float | None  # the coordinator's Mosquitto (None: in this process)

    @property
    def lost(self) -> int:
        return self.sent - self.counted


@dataclass
class RunResult:
    spec: RunSpec
    connections: int = 0  # device connections held during the rounds
    connect_s: float = 0.0  # the slowest load generator's connect-and-subscribe time
    rounds: list[RoundFigures] = field(default_factory=list)
    broker_rss_mb: float = 0.0  # after the last round, summed over device-facing brokers
    broker_peak_rss_mb: float = 0.0
    gateway_rss_mb: float = 0.0  # per gateway process (amqtt: its broker included)
    total_rss_mb: float = 0.0  # every process of the run, this one included
    devices: dict[str, int] = field(default_factory=dict)  # the load generators' counts
    profile: Path | None = None


@dataclass
class _Snapshot:
    at: float
    broker: float
    gateway: float
    devices: float
    upstream: float


def _layout(spec: RunSpec) -> dict[str, list[str]]:
    per = math.ceil(spec.devices / spec.gateways)
    names = [f"d{i:05d}" for i in range(spec.devices)]
    return {f"gw-{g:02d}": names[g * per : (g + 1) * per] for g in range(spec.gateways)}


class _FleetRun:
    """The processes of one run, each stopped by `stack` (in reverse order) at the end."""

    def __init__(
        self, spec: RunSpec, mosquitto: str | None, workdir: Path, stack: ExitStack
    ) -> None:
        self.spec, self.mosquitto, self.workdir, self.stack = spec, mosquitto, workdir, stack
        self.layout = _layout(spec)
        spec_layout = {gw: (COORDINATOR, ds) for gw, ds in self.layout.items()}
        self.members = new_members(FLEET, spec_layout, rng=np.random.default_rng(spec.seed))
        self.fleet = self.members.fleet
        self.fleet_file = workdir / "fleet.json"
        write_atomic(self.fleet_file, self.fleet.to_json().encode())
        for gw in self.layout:
            key, login = self.members.keys[gw], self.members.logins[gw]
            write_atomic(workdir / f"{gw}.key", signing_key_to_text(key).encode())
            write_atomic(workdir / f"{gw}.login", login.to_json().encode())
        self.amqtt = spec.broker == "amqtt"
        self.upstream_pid: int | None = None
        self.broker_pids: list[int] = []  # the device-facing Mosquittos
        self.gateways: dict[str, subprocess.Popen[str]] = {}
        self.urls: dict[str, str] = {}  # gateway -> its devices' broker
        self.devices: dict[str, subprocess.Popen[str]] = {}
        self.records: list[tuple[RoundRecord, _Snapshot]] = []
        self.profile: procs.Profile | None = None

    def _mosquitto(self, name: str) -> tuple[str, int]:
        assert self.mosquitto is not None
        home, fleet = self.workdir / f"mosquitto-{name}", self.fleet

        def configure(directory: Path, host: str, port: int) -> Path:
            return write_mosquitto_config(fleet, directory, broker=name, host=host, port=port).conf

        m = MosquittoProcess(self.mosquitto, home, configure=configure)
        self.stack.callback(m.stop)
        return m.url, procs.mosquitto_pid(home)

    def start_gateways(self) -> str:
        """The upstream broker, then every gateway (and its Mosquitto); the upstream URL."""
        if not self.amqtt:
            up_url, self.upstream_pid = self._mosquitto(COORDINATOR)
        else:
            access = AccessControl(broker_policy(self.fleet, COORDINATOR))
            embedded = EmbeddedBroker(HOST, 0, access=access).start(15.0)
            self.stack.callback(embedded.stop)
            up_url = embedded.url
        for gw in self.layout:
            if self.amqtt:
                where = ["--listen", f"{HOST}:0"]
            else:
                down_url, pid = self._mosquitto(gw)
                self.broker_pids.append(pid)
                where = ["--downstream", down_url]
            key, state = self.workdir / f"{gw}.key", self.workdir / f"state-{gw}"
            # amqtt: its threads named, to tell the broker's CPU from the gateway's
            module = "bench.fleet_scale_gateway" if self.amqtt else "gateway"
            self.gateways[gw] = self._child(
                [module, "--id", gw, "--fleet-file", str(self.fleet_file),
                 "--key", str(key), "--upstream", up_url, *where, "--state-dir", str(state),
                 "--connect-timeout", "60", "-q"],
                gw,
            )  # fmt: skip
        for gw, proc in self.gateways.items():
            line = procs.read_line(proc, 90.0, f"gateway {gw}", self.workdir / f"{gw}.log")
            self.urls[gw] = line.rsplit(" ", 1)[-1]  # "gateway ID serving on URL"
        return up_url

    def _child(self, cmd: list[str], name: str, stdin: bool = False) -> subprocess.Popen[str]:
        with (self.workdir / f"{name}.log").open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", *cmd], stdout=subprocess.PIPE, stderr=err, text=True,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            )  # fmt: skip
        self.stack.callback(procs.stop_child, proc)
        return proc

    def start_devices(self, coordinator: Coordinator) -> tuple[int, float]:
        """Every gateway's device process, once all are connected and subscribed:
        (connections, the slowest process's connect time)."""
        m, rounds = self.members, 1 + self.spec.rounds
        for i, (gw, devices) in enumerate(self.layout.items()):
            body = {
                "url": self.urls[gw], "fleet_file": str(self.fleet_file), "gateway": gw,
                "seed": self.spec.seed, "layers": list(LAYERS), "run": coordinator.run,
                "first_round": coordinator.next_round,
                "first_version": coordinator.model_version, "rounds": rounds,
                "connect_timeout": 60.0 + 0.05 * len(devices),
                "devices": {
                    d: {"key": signing_key_to_text(m.keys[d]), "index": i * 100_000 + j,
                        "username": m.logins[d].username, "password": m.logins[d].password}
                    for j, d in enumerate(devices)
                },
            }  # fmt: skip
            spec_file = self.workdir / f"devices-{gw}.json"
            write_atomic(spec_file, json.dumps(body).encode())  # 0600: it holds secrets
            self.devices[gw] = self._child(
                ["bench.fleet_scale_devices", str(spec_file)], f"devices-{gw}", stdin=True
            )
        setup = 120.0 + 0.01 * self.spec.devices  # encoding and sealing, then connecting
        connections, slowest = 0, 0.0
        for gw, proc in self.devices.items():
            ready = procs.read_message(proc, setup, gw, self.workdir, "ready")
            connections += int(ready["devices"])
            slowest = max(slowest, float(ready["connect_s"]))
        return connections, slowest

    def snapshot(self) -> _Snapshot:
        gw_pids = [p.pid for p in self.gateways.values()]
        split = [procs.split_cpu(pid) for pid in gw_pids] if self.amqtt else []
        return _Snapshot(
            time.monotonic(),
            sum(b for b, _ in split) if self.amqtt else _cpu(self.broker_pids),
            sum(o for _, o in split) if self.amqtt else _cpu(gw_pids),
            _cpu([p.pid for p in self.devices.values()]),
            0.0 if self.upstream_pid is None else procs.cpu_seconds(self.upstream_pid),
        )

    def on_round(self, record: RoundRecord) -> None:
        self.records.append((record, self.snapshot()))
        if record.round == 1 and self.spec.profile is not None:
            first = next(iter(self.gateways.values()))
            self.profile = procs.Profile(first.pid, self.spec.profile)

    def memory(self, result: RunResult) -> None:
        """Resident memory after the rounds (amqtt: the broker is in the gateway process,
        so its figure is the whole process's)."""
        gw_pids = [p.pid for p in self.gateways.values()]
        brokers = gw_pids if self.amqtt else self.broker_pids
        result.broker_rss_mb = sum(procs.rss_mb(p) for p in brokers)
        result.broker_peak_rss_mb = sum(procs.rss_mb(p, peak=True) for p in brokers)
        result.gateway_rss_mb = max(procs.rss_mb(p) for p in gw_pids)
        others = [*self.broker_pids, *gw_pids, *(p.pid for p in self.devices.values())]
        if self.upstream_pid is not None:
            others.append(self.upstream_pid)
        result.total_rss_mb = sum(procs.rss_mb(p) for p in [os.getpid(), *others])

    def collect(self) -> tuple[dict[str, int], dict[int, int]]:
        """Stop the devices: their summed counts, and updates sent per round."""
        totals: dict[str, int] = {}
        sent: dict[int, int] = {}
        for gw, proc in self.devices.items():
            assert proc.stdin is not None
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            final = procs.read_message(proc, 60.0, gw, self.workdir, "final")
            for r, n in final.pop("sent").items():
                sent[int(r)] = sent.get(int(r), 0) + int(n)
            for key, n in final.items():
                totals[key] = totals.get(key, 0) + int(n)
        return totals, sent


def run_fleet(spec: RunSpec, mosquitto: str | None, workdir: Path) -> RunResult:
    """Set up the fleet of `spec`, run 1 + spec.rounds rounds, tear everything down."""
    raise_fd_limit(spec.devices + 4096)
    result = RunResult(spec)
    with ExitStack() as stack:
        run = _FleetRun(spec, mosquitto, workdir, stack)
        up_url = run.start_gateways()
        config = CoordinatorConfig(
            broker_url=up_url, state_dir=workdir / "coordinator", layers=LAYERS,
            rounds=1 + spec.rounds, round_timeout=spec.timeout, min_contributors=1,
            seed=spec.seed, login=run.members.logins[COORDINATOR],
        )  # fmt: skip
        key = run.members.keys[COORDINATOR]
        coordinator = Coordinator(config, run.fleet, key, on_round=run.on_round)
        stack.callback(coordinator.stop)
        result.connections, result.connect_s = run.start_devices(coordinator)
        coordinator.start()
        budget = (1 + spec.rounds) * (spec.timeout + 10.0)
        if not coordinator.wait_finished(budget):
            log.warning("%s, %d devices: rounds unfinished after %.0f s",
                        spec.broker, spec.devices, budget)  # fmt: skip
        if run.profile is not None:
            result.profile = run.profile.stop()
        run.memory(result)
        result.devices, sent = run.collect()
        result.rounds = _figures(run.records, sent, run.upstream_pid is not None)
    return result


def _figures(
    records: list[tuple[RoundRecord, _Snapshot]], sent: dict[int, int], upstream: bool
) -> list[RoundFigures]:
    """Figures of every measured round (round 1 is the warm-up), window by window."""
    out = []
    by_round = {rec.round: (rec, snap) for rec, snap in records}
    for r in sorted(by_round):
        if r < 2 or r - 1 not in by_round:
            continue
        (rec, now), (_, before) = by_round[r], by_round[r - 1]

        def spent(get: Callable[[_Snapshot], float]) -> float:
            return max(0.0, get(now) - get(before))  # noqa: B023 (used at once)

        out.append(RoundFigures(
            r, rec.round_seconds, sent.get(r, 0), rec.contributors,
            spent(lambda s: s.broker), spent(lambda s: s.gateway), spent(lambda s: s.devices),
            spent(lambda s: s.upstream) if upstream else None,
        ))  # fmt: skip
    return out


def _cpu(pids: list[int]) -> float:
    return sum(procs.cpu_seconds(pid) for pid in pids)
