"""What TLS costs the demo: round time of `tern demo` with and without `--tls`, in one run.

Each repeat runs the whole demo twice on this machine (real brokers on loopback, the
coordinator, --gateways gateways with their own brokers, --devices devices training in
the WebAssembly kernel, no boards): once with plaintext links, once with TLS and logins on
every link (demo.security: the demo fleet's own CA). The two alternate, plaintext first,
so both see the same machine. Per run, the median of its rounds' seconds (schedule
published -> round closed, RoundRecord.round_seconds) after the first round (which also
fetches the kernel); the table gives the median over the repeats and the ratio
TLS / plaintext of those medians (above 1: TLS is slower).

    python -m bench.demo_tls [--repeats 3] [--rounds 10] [--devices 20] [--gateways 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any

from demo.run import run_demo

__all__ = ["main", "measure"]


def _one(tls: bool, rounds: int, devices: int, gateways: int) -> dict[str, Any]:
    started = time.monotonic()
    result = run_demo(
        devices=devices, gateways=gateways, rounds=rounds, boards=0, out=None, tls=tls
    )
    wall = time.monotonic() - started
    seconds = [r["seconds"] for r in result.rounds[1:]] or [r["seconds"] for r in result.rounds]
    return {
        "round_s": statistics.median(seconds),
        "wall_s": wall,
        "final_accuracy": result.final_accuracy,
    }


def measure(repeats: int, rounds: int, devices: int, gateways: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "tls": []}
    for _ in range(repeats):
        for name in ("plain", "tls"):
            runs[name].append(_one(name == "tls", rounds, devices, gateways))
    out: dict[str, Any] = {"repeats": repeats, "rounds": rounds, "devices": devices}
    for name, rows in runs.items():
        out[name] = {
            "round_s": statistics.median(r["round_s"] for r in rows),
            "round_s_runs": [round(r["round_s"], 4) for r in rows],
            "wall_s": statistics.median(r["wall_s"] for r in rows),
            "final_accuracy": rows[-1]["final_accuracy"],
        }
    out["ratio"] = out["tls"]["round_s"] / out["plain"]["round_s"]
    out["same_accuracy"] = out["tls"]["final_accuracy"] == out["plain"]["final_accuracy"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--gateways", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.rounds < 2 or args.devices < args.gateways < 1:
        ap.error("need --repeats >= 1, --rounds >= 2 and --devices >= --gateways >= 1")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the components' round lines are not the point here
    try:
        res = measure(args.repeats, args.rounds, args.devices, args.gateways)
    finally:
        root.setLevel(level)
    print(
        f"demo_tls: {args.devices} devices, {args.gateways} gateways, {args.rounds} rounds, "
        f"{args.repeats} repeats (median round seconds after round 1)"
    )
    print(f"{'links':<10}{'round s':>10}{'runs':>30}{'run wall s':>12}{'final acc':>11}")
    for name in ("plain", "tls"):
        r = res[name]
        acc = "n/a" if r["final_accuracy"] is None else f"{100 * r['final_accuracy']:.1f}%"
        runs = ", ".join(f"{s:.3f}" for s in r["round_s_runs"])
        print(f"{name:<10}{r['round_s']:>10.4f}{runs:>30}{r['wall_s']:>12.1f}{acc:>11}")
    print(f"ratio tls/plain: {res['ratio']:.3f}  same final accuracy: {res['same_accuracy']}")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
