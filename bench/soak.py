"""Memory and disk over a long run: do they stay flat?

A whole fleet (1 coordinator, 2 gateways, --devices devices, the demo's MLP 40-100-100-10
of 15,210 parameters, ternary updates, the numpy trainer) runs --rounds short rounds on
the in-memory bus (demo.memory.MemoryFleet: the same round machines the processes run),
with the coordinator's state in a real state directory (coordinator.store.StateStore).
Measured after a warm-up of --warmup rounds and again at the end:

  objects       Python objects alive (gc), all components, after a collection
  rss           the process's resident set (/proc/self/statm)
  state dir     bytes under the coordinator's state directory

and each one's growth per round between the two points. The state directory is measured
twice in the same run: with the retention policy (--keep-models, the default the
coordinator uses) and keeping every version (the behaviour before retention existed),
whose growth is the baseline of the ratio.

    python -m bench.soak [--rounds N] [--warmup W] [--devices D] [--keep-models K] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.store import DEFAULT_KEEP_MODELS, StateStore
from demo.memory import MemoryFleet
from device.trainer import NumpyTrainer
from kernels.wasm import DEFAULT_FUEL, DEFAULT_MEMORY_LIMIT
from tern.codecs import CodecName
from tern.fleet import COORDINATOR
from tern.members import new_members
from tern.messages import TrainConfig
from tern.rounds.opening import RoundSettings, ServerModel
from tern.rounds.record import RoundRecord

__all__ = ["main", "soak"]

LAYERS = (40, 100, 100, 10)


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def soak(rounds: int, warmup: int, devices: int, keep_models: int) -> dict[str, Any]:
    """One run of `rounds` rounds; the figures at `warmup` and at the end."""
    rng = np.random.default_rng(0)
    dev_ids = [f"dev-{i + 1:02d}" for i in range(devices)]
    layout = {"gw-1": (COORDINATOR, dev_ids[0::2]), "gw-2": (COORDINATOR, dev_ids[1::2])}
    data = {d: (rng.normal(size=(64, LAYERS[0])).astype(np.float32),
                rng.integers(0, LAYERS[-1], 64)) for d in dev_ids}  # fmt: skip
    settings = RoundSettings(
        codec=CodecName.TERNARY, round_timeout=20.0, min_contributors=1,
        train=TrainConfig(epochs=1, batch_size=32, lr=0.1), kernel_fuel=DEFAULT_FUEL,
        kernel_memory=DEFAULT_MEMORY_LIMIT,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tern-soak-") as tmp:
        store = StateStore(Path(tmp), keep_models=keep_models)

        def save_model(m: ServerModel) -> None:
            store.save_state(m.version, m.weights, m.state.buffers)

        def save_round(record: RoundRecord) -> None:
            store.save_round(record)

        fleet = MemoryFleet(
            new_members("soak", layout), data, settings, layers=LAYERS,
            trainer=NumpyTrainer, save_model=save_model, save_round=save_round,
        )  # fmt: skip
        fleet.connect()
        marks: dict[str, dict[str, int]] = {}
        for r in range(1, rounds + 1):
            fleet.run_until(lambda r=r: r in fleet.records)  # type: ignore[misc]
            if fleet.records[r].contributors != devices:
                raise RuntimeError(f"round {r}: {fleet.records[r].contributors} contributors")
            # the harness's own bookkeeping is not the fleet's memory
            fleet.records.clear()
            fleet.saved_versions.clear()
            for kept in fleet.gateway_metrics.values():
                kept.clear()
            for dev in fleet.devices.values():
                dev.outcomes.clear()
            if r in (warmup, rounds):
                gc.collect()
                objects = len(gc.get_objects())
                marks[str(r)] = {"objects": objects, "rss": _rss(), "state": _dir_bytes(Path(tmp))}
        store.close()
    a, b = marks[str(warmup)], marks[str(rounds)]
    span = rounds - warmup
    return {
        "at": marks,
        "per_round": {k: (b[k] - a[k]) / span for k in ("objects", "rss", "state")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--keep-models", type=int, default=DEFAULT_KEEP_MODELS)
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    if not 1 <= args.warmup < args.rounds or args.devices < 2 or args.keep_models < 1:
        ap.error("need 1 <= --warmup < --rounds, --devices >= 2, --keep-models >= 1")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the fleet's round lines, 4 per round, are not the point
    try:
        kept = soak(args.rounds, args.warmup, args.devices, args.keep_models)
        everything = soak(args.rounds, args.warmup, args.devices, 10**9)
    finally:
        root.setLevel(level)
    ratio = (
        kept["per_round"]["state"] / everything["per_round"]["state"]
        if everything["per_round"]["state"]
        else None
    )
    print(
        f"soak: {args.rounds} rounds (measured from round {args.warmup}), {args.devices} "
        f"devices, MLP {'-'.join(map(str, LAYERS))}, in-memory bus, numpy trainer"
    )
    print(f"{'run':<22}{'objects/round':>14}{'rss B/round':>14}{'state B/round':>15}"
          f"{'state dir at end':>18}")  # fmt: skip
    for name, res in ((f"keep {args.keep_models} models", kept), ("keep every model", everything)):
        pr, end = res["per_round"], res["at"][str(args.rounds)]
        print(f"{name:<22}{pr['objects']:>14.1f}{pr['rss']:>14.0f}{pr['state']:>15.0f}"
              f"{end['state']:>18,}")  # fmt: skip
    if ratio is not None:
        print(f"state dir growth with retention / without: {ratio:.3f}")
    if args.json:
        print(json.dumps({"rounds": args.rounds, "warmup": args.warmup, "devices": args.devices,
                          "keep_models": args.keep_models, "kept": kept,
                          "everything": everything, "state_ratio": ratio}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
