"""The demo: a broker for the coordinator, a coordinator, gateways each with its own
embedded broker, and devices on MNIST-1D non-IID partitions, all over real MQTT on
loopback, in one process (each component on its own connections and threads, exactly
as when they run on separate machines).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.fleet_access import broker_policy
from broker.limits import fleet_limits
from coordinator.config import CoordinatorConfig
from coordinator.privacy import PrivacyConfig, add_privacy_arguments, privacy_from_args
from coordinator.service import Coordinator, TestSet
from coordinator.store import RoundRecord
from demo.boards import DemoBoards
from demo.security import DemoTls, make_demo_tls
from demo.watching import OnReady, announce, open_watch_points
from device.agent import DeviceAgent
from device.trainer import NumpyTrainer
from gateway.config import GatewayConfig
from gateway.service import Gateway
from kernels.partition import dirichlet_partition, load_mnist1d
from tern.codecs import CodecName
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER
from tern.members import new_members
from tern.messages import TrainConfig

__all__ = ["DemoResult", "main", "run_demo"]

LAYERS = (40, 100, 100, 10)


@dataclass
class DemoResult:
    codec: str
    params: int
    trainer: str = "wasm"  # shown in the summary; the JSON keeps its documented keys
    rounds: list[dict[str, Any]] = field(default_factory=list)
    boards: list[dict[str, Any]] = field(default_factory=list)  # simulated ESP32 boards
    boards_skipped: str | None = None  # why no board ran, when none did
    tls: bool = False  # every link spoke TLS (tern demo --tls)
    secagg: bool = False  # secure aggregation in every cohort (tern demo --secagg)
    dp: dict[str, Any] | None = None  # differential privacy: its terms and what was spent

    @property
    def final_accuracy(self) -> float | None:
        return self.rounds[-1]["accuracy"] if self.rounds else None

    def to_json(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "params": self.params,
            "final_accuracy": self.final_accuracy,
            "rounds": self.rounds,
            "boards": self.boards,
            "tls": self.tls,
            "secagg": self.secagg,
            "dp": self.dp,
        }


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / max(total, 1))
    return "#" * filled + "." * (width - filled)


def run_demo(
    *,
    devices: int = 20,
    gateways: int = 2,
    rounds: int = 50,
    codec: CodecName = CodecName.TERNARY,
    seed: int = 0,
    trainer: str = "wasm",
    boards: int = 3,
    alpha: float = 0.5,
    round_timeout: float = 20.0,
    out: TextIO | None = sys.stderr,
    port: int = 0,
    dashboard: bool = False,
    on_ready: OnReady | None = None,
    tls: bool = False,
    privacy: PrivacyConfig | None = None,
) -> DemoResult:
    """`trainer`: "wasm" (devices run the kernel the coordinator publishes, as in a real
    fleet) or "numpy" (the reference trainer on every device). `boards`: simulated ESP32
    boards (the real firmware under CPython), spread over the gateways. `port`: the top
    broker's (0: any free one); `dashboard`: also serve the web dashboard (and a WebSockets
    listener on the top broker). Where to watch is printed to `out` and given to
    `on_ready` before the first round. `tls`: every broker listens on TLS only (the demo
    fleet's own CA, demo.security) and every client verifies it. `privacy`: secure
    aggregation and differential privacy (off by default: coordinator.privacy)."""
    if gateways < 1 or devices < gateways:
        raise ValueError("need at least one gateway and at least one device per gateway")
    if trainer not in ("wasm", "numpy"):
        raise ValueError(f"trainer {trainer!r} is not wasm or numpy")
    if boards < 0:
        raise ValueError("boards must be zero or more")
    data = load_mnist1d(seed=42)
    parts = dirichlet_partition(data.y, devices, alpha, np.random.default_rng(seed))
    dev_ids = [f"dev-{i + 1:02d}" for i in range(devices)]
    gw_ids = [f"gw-{g + 1}" for g in range(gateways)]
    members = new_members(
        "demo", {gw: (COORDINATOR, dev_ids[g::gateways]) for g, gw in enumerate(gw_ids)}
    )
    fleet, keys, logins = members.fleet, members.keys, members.logins
    privacy = privacy or PrivacyConfig()
    result = DemoResult(str(codec), 0, trainer, tls=tls, secagg=privacy.secagg)
    with tempfile.TemporaryDirectory(prefix="tern-demo-") as state, ExitStack() as watch:
        secure: DemoTls | None = (
            make_demo_tls(Path(state), "demo", [COORDINATOR, *gw_ids]) if tls else None
        )
        client_tls = None if secure is None else secure.client
        # The coordinator's broker as `tern broker --fleet-file` runs it: logins, rights,
        # limits (and TLS with --tls).
        top = EmbeddedBroker(
            port=port,
            access=AccessControl(broker_policy(fleet, COORDINATOR)),
            limits=fleet_limits(fleet, COORDINATOR),
            ws_port=0 if dashboard else None,
            tls=None if secure is None else secure.server(COORDINATOR),
        )
        watch.enter_context(top)
        ws_url = top.ws_url if dashboard else None
        points = open_watch_points(
            watch,
            "demo",
            top.url,
            ws_url,
            logins[OBSERVER],
            Path(state),
            dashboard=dashboard,
        )
        announce(points, out)
        mcus = DemoBoards("demo", gw_ids, boards, Path(state), np.random.default_rng([seed, 1]))
        gws = [
            Gateway(
                GatewayConfig(
                    gw,
                    top.url,
                    listen_port=0,
                    boards_file=mcus.boards_file(gw),
                    login=logins[gw],
                    state_dir=Path(state) / gw,
                    upstream_tls=client_tls,
                    downstream_tls=client_tls,
                    listen_tls=None if secure is None else secure.server(gw),
                ),
                fleet,
                keys[gw],
            ).start()
            for gw in gw_ids
        ]
        by_id = {g.id: g for g in gws}
        agents = [
            DeviceAgent(
                d,
                fleet,
                keys[d],
                by_id[fleet.gateway_of(d)].downstream_url,
                data.x[idx],
                data.y[idx],
                trainer=NumpyTrainer() if trainer == "numpy" else None,
                login=logins[d],
                state_dir=Path(state) / d,
                tls=client_tls,
            ).start()
            for d, idx in zip(dev_ids, parts, strict=True)
        ]
        config = CoordinatorConfig(
            broker_url=top.url,
            state_dir=Path(state),
            layers=LAYERS,
            init_seed=seed,
            codec=codec,
            rounds=rounds,
            round_timeout=round_timeout,
            min_contributors=max(1, devices // 2),
            seed=seed,
            train=TrainConfig(epochs=1, batch_size=32, lr=0.5),
            login=logins[COORDINATOR],
            tls=client_tls,
            privacy=privacy,
        )
        started = time.monotonic()

        def progress(rec: RoundRecord) -> None:
            gw_metrics = [g.wait_for_round(rec.round, timeout=5.0) for g in gws]
            up = sum(m.bytes_up for m in gw_metrics)
            row: dict[str, Any] = {
                "round": rec.round,
                "accuracy": rec.accuracy,
                "contributors": rec.contributors,
                "bytes_device_to_gateway": up,
                "bytes_gateway_to_coordinator": rec.bytes_up,
                "bytes_downlink": rec.bytes_down + sum(m.bytes_down for m in gw_metrics),
                "seconds": round(rec.round_seconds, 3),
            }
            if rec.noise_multiplier is not None:
                row["epsilon"] = rec.epsilon
            result.rounds.append(row)
            if out is not None:
                acc = "  n/a" if rec.accuracy is None else f"{100 * rec.accuracy:5.1f}%"
                print(
                    f"\rround {rec.round:>4}/{rounds} [{_bar(rec.round, rounds)}] acc {acc} "
                    f"up {up / 1024:7.1f} KiB "
                    f"{time.monotonic() - started:6.1f}s",
                    end="",
                    file=out,
                    flush=True,
                )

        coordinator = Coordinator(
            config,
            fleet,
            keys[COORDINATOR],
            test_set=TestSet(data.x_test, data.y_test),
            on_round=progress,
        )
        result.params = coordinator.spec.size
        dp = coordinator.settings.dp
        if dp is not None:
            result.dp = {
                "epsilon_budget": privacy.dp_epsilon, "delta": privacy.dp_delta,
                "clip": dp.clip, "noise": str(dp.noise), "multiplier": dp.multiplier,
            }  # fmt: skip
        try:
            mcus.start(
                {g.id: g.downstream_url for g in gws},
                top.url,
                data.x_test,
                data.y_test,
                login=members.login(OBSERVER),
                ca_file=None if secure is None else secure.ca_file,
            )
            result.boards_skipped = mcus.skipped
            if mcus.skipped is not None and out is not None:
                print(f"boards: none run ({mcus.skipped})", file=out)
            if on_ready is not None:
                on_ready(replace(points, brokers=(top.url, *(g.downstream_url for g in gws))))
            coordinator.start()
            if not coordinator.wait_finished(timeout=rounds * (round_timeout + 5)):
                raise TimeoutError(f"the demo did not finish {rounds} rounds in time")
            time.sleep(2.0)  # the boards run the final model for a moment
        finally:
            coordinator.stop()
            mcus.stop()
            result.boards = mcus.rows()
            for a in agents:
                a.stop()
            for g in gws:
                g.stop()
        if out is not None:
            print(file=out)
    return result


def _summary(result: DemoResult, out: TextIO) -> None:
    rows = result.rounds
    print(
        f"\ntern demo: {len(rows)} rounds, codec {result.codec}, {result.params:,} params, "
        f"{result.trainer} trainer"
        + (", secure aggregation in every cohort" if result.secagg else "")
        + ("" if result.dp is None else f", DP ({result.dp['noise']} noise, epsilon "
           f"{(rows[-1].get('epsilon') if rows else None) or 0:.3g} of "
           f"{result.dp['epsilon_budget']:g} at delta {result.dp['delta']:g})"),
        file=out,
    )  # fmt: skip
    print(
        f"{'round':>5} {'accuracy':>9} {'devices':>8} {'dev->gw B':>11} "
        f"{'gw->coord B':>12} {'down B':>10} {'s':>6}",
        file=out,
    )
    step = max(1, len(rows) // 10)
    for r in rows[step - 1 :: step] if len(rows) > 10 else rows:
        acc = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        print(
            f"{r['round']:>5} {acc:>9} {r['contributors']:>8} {r['bytes_device_to_gateway']:>11,} "
            f"{r['bytes_gateway_to_coordinator']:>12,} {r['bytes_downlink']:>10,} "
            f"{r['seconds']:>6.2f}",
            file=out,
        )
    if rows:
        per_dev = sum(r["bytes_device_to_gateway"] for r in rows) / max(
            1, sum(r["contributors"] for r in rows)
        )
        print(
            f"final accuracy {100 * (result.final_accuracy or 0):.1f}%; "
            f"{per_dev:,.0f} bytes per device update "
            f"({8 * per_dev / result.params:.2f} bits/param)",
            file=out,
        )


def _boards_summary(result: DemoResult, out: TextIO) -> None:
    if result.boards_skipped is not None:
        print(f"boards: none ran ({result.boards_skipped})", file=out)
    if not result.boards:
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
    for b in result.boards:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tern demo", description=__doc__)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--gateways", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--codec", choices=[str(c) for c in CodecName], default="ternary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--trainer",
        choices=["wasm", "numpy"],
        default="wasm",
        help="wasm: devices train in the kernel the coordinator publishes (default);"
        " numpy: the reference trainer",
    )
    ap.add_argument(
        "--boards",
        type=int,
        default=3,
        help="simulated ESP32 boards (the real firmware under CPython), default 3; 0: none",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument(
        "--port", type=int, default=0, help="the top broker's port (default: any free port)"
    )
    ap.add_argument(
        "--dashboard",
        action="store_true",
        help="also serve the web dashboard (MQTT over WebSockets on the top broker); "
        "its URL is printed with the broker's",
    )
    ap.add_argument(
        "--tls",
        action="store_true",
        help="TLS on every link: each broker serves a certificate of the demo fleet's own CA "
        "and refuses plaintext; every client verifies it (and logs in, as always)",
    )
    add_privacy_arguments(ap)
    args = ap.parse_args(argv)
    privacy = privacy_from_args(args)
    wrong = privacy.refusal(args.rounds, CodecName(args.codec))
    if wrong:
        ap.error(wrong)
    result = run_demo(
        devices=args.devices,
        gateways=args.gateways,
        rounds=args.rounds,
        codec=CodecName(args.codec),
        seed=args.seed,
        trainer=args.trainer,
        boards=args.boards,
        port=args.port,
        dashboard=args.dashboard,
        tls=args.tls,
        privacy=privacy,
    )
    _summary(result, sys.stdout)
    _boards_summary(result, sys.stdout)
    if args.json:
        print(json.dumps(result.to_json()))
    return 0
