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
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.fleet_access import broker_policy
from broker.limits import fleet_limits
from coordinator.compression import (
    add_compression_arguments,
    compression_refusal,
    default_partials,
    downlink_from_args,
    partials_from_args,
)
from coordinator.config import CoordinatorConfig
from coordinator.privacy import PrivacyConfig, add_privacy_arguments, privacy_from_args
from coordinator.service import Coordinator, TestSet
from coordinator.store import RoundRecord
from demo.boards import DemoBoards, print_boards
from demo.report import DemoResult, HopCounter, summary
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
    partials: CodecName | None = None,
    density: float | None = None,
    downlink: CodecName | None = CodecName.TERNARY,
) -> DemoResult:
    """`trainer`: "wasm" (devices run the kernel the coordinator publishes, as in a real
    fleet) or "numpy" (the reference trainer on every device). `boards`: simulated ESP32
    boards (the real firmware under CPython), spread over the gateways. `port`: the top
    broker's (0: any free one); `dashboard`: also serve the web dashboard (and a WebSockets
    listener on the top broker). Where to watch is printed to `out` and given to
    `on_ready` before the first round. `tls`: every broker listens on TLS only (the demo
    fleet's own CA, demo.security) and every client verifies it. `privacy`: secure
    aggregation and differential privacy (off by default: coordinator.privacy).
    `partials`: the codec gateways send their partials in (None: ternary, or float32 under
    central noise), `density` a sparse codec's; `downlink`: the codec of the coordinator's
    deltas (None: full models every round)."""
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
    partials = partials or default_partials(privacy.dp_terms_unset())
    result = DemoResult(str(codec), 0, trainer, tls=tls, secagg=privacy.secagg,
                        partials=str(partials), downlink=str(downlink or "full"),
                        devices=devices, gateways=gateways)  # fmt: skip
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
            partials=partials,
            density=density,
            downlink=downlink,
        )
        started = time.monotonic()
        hops = HopCounter(agents, gws)

        def progress(rec: RoundRecord) -> None:
            gw_metrics = [g.wait_for_round(rec.round, timeout=5.0) for g in gws]
            up = sum(m.bytes_up for m in gw_metrics)
            row: dict[str, Any] = {
                "round": rec.round,
                "accuracy": rec.accuracy,
                "contributors": rec.contributors,
                "bytes_device_to_gateway": up,
                "bytes_gateway_to_coordinator": rec.bytes_up,
                "seconds": round(rec.round_seconds, 3),
                "hops": hops.take(),  # demo.report: every hop, delivery by delivery
            }
            row["bytes_downlink"] = (
                row["hops"]["parent_to_gateway"] + row["hops"]["gateway_to_device"]
            )
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
    add_compression_arguments(ap)
    args = ap.parse_args(argv)
    privacy = privacy_from_args(args)
    wrong = privacy.refusal(args.rounds, CodecName(args.codec))
    if wrong:
        ap.error(wrong)
    partials = partials_from_args(args, privacy.dp_terms_unset())
    downlink = downlink_from_args(args)
    refused = compression_refusal(
        CodecName(args.codec), partials, args.density, privacy.dp_terms_unset(), downlink
    )
    if refused is not None:
        ap.error(refused[1])
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
        partials=partials,
        density=args.density,
        downlink=downlink,
    )
    summary(result, sys.stdout)
    print_boards(result.boards, result.boards_skipped, sys.stdout)
    if args.json:
        print(json.dumps(result.to_json()))
    return 0
