"""Thousands of real MQTT connections: one connection, client id, login and session per
device, every device sending its own signed ternary update (issue 13).

    python -m bench.fleet_scale [--amqtt 1000] [--mosquitto 10000] [--devices-per-gateway 1000]
                                [--rounds 3] [--shared 1000] [--find-limit] [--profile] [--json]

Runs (bench.fleet_scale_run has the processes): `--amqtt N` devices on the embedded amqtt
brokers of ceil(N / devices-per-gateway) gateways (1,000: one gateway's broker), and
`--mosquitto N` devices on a Mosquitto process per gateway (10,000: ten gateways of
1,000). The coordinator runs in this process; every gateway is `tern gateway` in a process
of its own; the devices are gmqtt clients in one process per gateway.

Per run, medians of --rounds rounds after one warm-up round:
  round s      the coordinator's round time: schedule published -> every gateway's partial
               folded (RoundRecord.round_seconds)
  lost         updates the devices published (QoS 1) minus devices counted in the
               partials, summed over the measured rounds (must be 0); `unsent`: devices
               of the fleet that published nothing for a round
  broker cpu   CPU seconds per round of the brokers the devices are connected to (amqtt:
               the embedded broker's thread inside each gateway process)
  broker rss   their resident memory after the last round (amqtt: the whole gateway
               process, broker and gateway together)
  gw ms/upd    the gateways' CPU per round (amqtt: their broker threads left out) divided
               by the updates they accepted; issue 13's target on Mosquitto is 0.25 ms
CPU is read from /proc between two round closes, so it covers the round's model and
schedule relays too. `--shared N` runs bench.round (in one process, 50 devices per
gateway) on both brokers for the same N, in the same run. `--find-limit` steps the
Mosquitto fleet up through --limit-steps until a step breaks: an update lost, a device
that did not send, a device error, a round slower than --limit-round-s, a step that
cannot be set up, or one the free memory would not hold; it reports the largest fleet
that held and why the next broke.
`--profile` samples the first Mosquitto-run gateway with py-spy over the measured rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench import round as round_bench
from bench.fleet_scale_procs import summarize_profile
from bench.fleet_scale_run import RunError, RunResult, RunSpec, run_fleet
from broker.lifecycle import quiet_third_party_logs
from broker.mosquitto import find_mosquitto

__all__ = ["limit_search", "main", "run_figures"]

log = logging.getLogger(__name__)

TARGET_MS_PER_UPDATE = 0.25  # issue 13, on Mosquitto


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def run_figures(result: RunResult) -> dict[str, Any]:
    """One run's JSON figures (medians over its measured rounds)."""
    spec, rounds = result.spec, result.rounds
    per_update = [1000 * r.gateway_cpu_s / r.counted for r in rounds if r.counted]
    upstream = [r.upstream_cpu_s for r in rounds if r.upstream_cpu_s is not None]
    return {
        "broker": spec.broker,
        "devices": spec.devices,
        "gateways": spec.gateways,
        "connections": result.connections,
        "rounds": len(rounds),
        "round_s": _median([r.round_s for r in rounds]),
        "round_s_min": min((r.round_s for r in rounds), default=None),
        "round_s_max": max((r.round_s for r in rounds), default=None),
        "lost": sum(r.lost for r in rounds),
        "unsent": sum(spec.devices - r.sent for r in rounds),
        "broker_cpu_s": _median([r.broker_cpu_s for r in rounds]),
        "broker_rss_mb": round(result.broker_rss_mb, 1),
        "broker_peak_rss_mb": round(result.broker_peak_rss_mb, 1),
        "gateway_cpu_ms_per_update": _median(per_update),
        "gateway_rss_mb": round(result.gateway_rss_mb, 1),
        "total_rss_mb": round(result.total_rss_mb, 1),
        "devices_cpu_s": _median([r.devices_cpu_s for r in rounds]),
        "upstream_cpu_s": _median(upstream),
        "connect_s": round(result.connect_s, 2),
        "device_counts": result.devices,
    }


def _errors(fig: dict[str, Any]) -> int:
    counts = fig["device_counts"]
    return sum(
        int(counts.get(k, 0))
        for k in ("bad_schedules", "bad_models", "publish_errors", "disconnects")
    )


def _run(spec: RunSpec, mosquitto: str | None, keep: bool = False) -> dict[str, Any]:
    """One run's figures; its directory (logs, configs) is removed unless `keep`."""
    tmp = Path(tempfile.mkdtemp(prefix=f"tern-fleet-scale-{spec.broker}-{spec.devices}-"))
    try:
        fig = run_figures(run_fleet(spec, mosquitto, tmp))
        fig["load_1min"] = round(os.getloadavg()[0], 2)  # the machine is shared: how busy
        return fig
    finally:
        if keep:
            log.warning("kept %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _verdict(fig: dict[str, Any], rounds: int, max_round_s: float) -> str | None:
    """Why a limit step broke, or None if it held."""
    if fig["rounds"] < rounds:
        return f"{rounds - fig['rounds']} of {rounds} rounds did not close"
    if fig["lost"]:
        return f"{fig['lost']} updates lost"
    if fig["unsent"]:
        return f"{fig['unsent']} device updates never sent"
    if _errors(fig):
        return f"device errors {fig['device_counts']}"
    if fig["round_s"] is not None and fig["round_s"] > max_round_s:
        return f"round time {fig['round_s']:.1f} s over {max_round_s:g} s"
    return None


def limit_search(args: argparse.Namespace, mosquitto: str) -> dict[str, Any]:
    """Step the Mosquitto fleet up --limit-steps until a step breaks (or the time budget,
    or the memory this machine has free would not hold the next step)."""
    started = time.monotonic()
    steps: list[dict[str, Any]] = []
    held: dict[str, Any] | None = None
    broke: dict[str, Any] | None = None
    per_device_mb = 0.0  # every process of the run, per device: from the last step held
    for n in args.limit_steps:
        if time.monotonic() - started > args.limit_budget:
            broke = {"devices": n, "reason": f"time budget of {args.limit_budget:g} s spent"}
            break
        free_mb = psutil.virtual_memory().available / 2**20
        need_mb = n * per_device_mb
        if need_mb > 0.8 * free_mb:  # the machine is shared: leave the others room
            broke = {"devices": n, "reason": f"memory: about {need_mb:,.0f} MB needed (as"
                     f" measured at the last step), {free_mb:,.0f} MB free: not tried"}  # fmt: skip
            break
        gateways = math.ceil(n / args.devices_per_gateway)
        spec = RunSpec("mosquitto", n, gateways, args.limit_rounds, args.seed)
        try:
            fig = _run(spec, mosquitto)
        except (RunError, OSError, TimeoutError) as exc:
            broke = {"devices": n, "reason": f"setup failed: {exc}"[:400]}
            break
        steps.append(fig)
        reason = _verdict(fig, args.limit_rounds, args.limit_round_s)
        log.warning("limit step %d devices: %s", n, reason or "held")
        if reason is not None:
            broke = {"devices": n, "reason": reason}
            break
        held = fig
        per_device_mb = fig["total_rss_mb"] / n
    return {
        "held": None if held is None else held["devices"],
        "broke": broke,
        "max_round_s": args.limit_round_s,
        "steps": steps,
        "seconds": round(time.monotonic() - started, 1),
    }


def _shared(n: int, kind: str, args: argparse.Namespace, mosquitto: str | None) -> dict[str, Any]:
    ns = argparse.Namespace(
        devices_per_gateway=50,
        rounds=args.rounds,
        round_timeout=args.shared_timeout,
        seed=args.seed,
    )
    r = round_bench.measure(kind, n, ns, mosquitto)
    figures = {k: (round(v, 4) if math.isfinite(v) else None) for k, v in r.items()}
    return {"broker": kind, "devices": n, "gateways": math.ceil(n / 50), **figures}


def _profiled(args: argparse.Namespace, mosquitto: str) -> dict[str, Any] | None:
    """A run of its own (py-spy takes CPU too): one gateway of --devices-per-gateway
    devices on Mosquitto, that gateway sampled over the measured rounds."""
    home = Path(tempfile.mkdtemp(prefix="tern-fleet-scale-profile-"))
    try:
        n = args.devices_per_gateway
        spec = RunSpec("mosquitto", n, 1, args.rounds, args.seed, profile=home / "gw.txt")
        fig = _run(spec, mosquitto)
        if not spec.profile or not spec.profile.exists():
            return None
        s = summarize_profile(spec.profile.read_text().splitlines())
    finally:
        if args.keep:
            log.warning("kept %s", home)
        else:
            shutil.rmtree(home, ignore_errors=True)

    def pct(rows: list[tuple[str, float]]) -> list[list[object]]:
        return [[name, round(100 * share, 1)] for name, share in rows]

    return {
        "devices": n,
        "gateway_cpu_ms_per_update": fig["gateway_cpu_ms_per_update"],  # sampled: slower
        "samples": s.samples,
        "by_area_pct": pct(s.by_area),
        "top_self_pct": pct(s.top_self),
        "top_total_pct": pct(s.top_total),
        "by_thread_pct": pct(s.by_thread),
    }


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _print(out: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        "fleet scale: one MQTT connection per device, MLP 40-100-100-10 ternary updates;"
        f" median of {args.rounds} rounds after 1 warm-up"
    )
    head = (
        f"{'broker':<10}{'devices':>8}{'gws':>4}{'conns':>7}{'round s':>9}{'lost':>6}"
        f"{'unsent':>7}{'brk cpu s':>10}{'brk MB':>8}{'gw ms/upd':>10}{'dev cpu s':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in out["runs"]:
        print(f"{r['broker']:<10}{r['devices']:>8,}{r['gateways']:>4}{r['connections']:>7,}"
              f"{_fmt(r['round_s'], '.3f'):>9}{r['lost']:>6}{r['unsent']:>7}"
              f"{_fmt(r['broker_cpu_s'], '.2f'):>10}{r['broker_rss_mb']:>8.0f}"
              f"{_fmt(r['gateway_cpu_ms_per_update'], '.3f'):>10}"
              f"{_fmt(r['devices_cpu_s'], '.2f'):>10}")  # fmt: skip
    print(f"target: a gateway spends <= {TARGET_MS_PER_UPDATE} ms CPU per update on Mosquitto")
    if out["shared"]:
        print("bench.round, same run (one process; 50 devices per gateway, amqtt-client devices):")
        for r in out["shared"]:
            shown = _fmt(r["round_s"], ".3f")
            print(
                f"  {r['broker']:<10}{r['devices']:>7,} devices  round s {shown}"
                f"  complete {r['complete']}/{r['rounds']}"
            )
    lim = out["limit"]
    if lim is not None:
        print(f"limit search on Mosquitto ({args.devices_per_gateway} devices per gateway):")
        for r in lim["steps"]:
            print(
                f"  {r['devices']:>7,} devices  round s {_fmt(r['round_s'], '.2f')}  lost"
                f" {r['lost']}  unsent {r['unsent']}  brokers {r['broker_rss_mb']:.0f} MB"
                f"  gw ms/upd {_fmt(r['gateway_cpu_ms_per_update'], '.3f')}"
            )
        broke = lim["broke"] or "nothing: every step held"
        print(f"  held {lim['held']} devices; broke: {broke}")
    prof = out["profile"]
    if prof is not None:
        print(
            f"profile of one gateway of {prof['devices']:,} devices on Mosquitto, a run of its"
            f" own ({prof['samples']} samples; sampled, it spent"
            f" {_fmt(prof['gateway_cpu_ms_per_update'], '.3f')} ms per update), by area:"
        )
        for name, pct in prof["by_area_pct"]:
            print(f"  {pct:5.1f} %  {name}")
        print("  the leaf functions that take most:")
        for name, pct in prof["top_self_pct"][:6]:
            print(f"  {pct:5.1f} %  {name}")
    for note in out["notes"]:
        print(note)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--amqtt", type=int, default=1000, help="devices on amqtt (0: none)")
    ap.add_argument("--mosquitto", type=int, default=10000, help="devices on Mosquitto (0: none)")
    ap.add_argument("--devices-per-gateway", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds, after one warm-up")
    ap.add_argument("--shared", type=_ints, default=[1000], help="bench.round at these counts")
    ap.add_argument("--shared-timeout", type=float, default=30.0, help="its round timeout, s")
    ap.add_argument("--find-limit", action="store_true")
    ap.add_argument("--limit-steps", type=_ints, default=[15000, 20000, 30000, 40000, 60000])
    ap.add_argument("--limit-rounds", type=int, default=2)
    ap.add_argument("--limit-round-s", type=float, default=30.0)
    ap.add_argument("--limit-budget", type=float, default=1800.0, help="seconds for the search")
    ap.add_argument("--profile", action="store_true", help="py-spy a gateway, in a run of its own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep each run's directory and logs")
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    if min(args.rounds, args.devices_per_gateway, args.limit_rounds) < 1:
        ap.error("--rounds, --devices-per-gateway and --limit-rounds must be >= 1")
    names = ("coordinator", "gateway", "broker", "bench.round", "amqtt", "transitions",
             "websockets")  # fmt: skip
    saved = {name: logging.getLogger(name).level for name in names}
    quiet_third_party_logs()
    for name in names[:4]:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return _bench(args)
    finally:  # a caller's logging (a test's caplog) is as it was
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _bench(args: argparse.Namespace) -> int:
    mosquitto = find_mosquitto()
    notes: list[str] = []
    if mosquitto is None and (args.mosquitto or args.find_limit):
        notes.append("mosquitto runs skipped: not installed (apt-get install mosquitto)")
    out: dict[str, Any] = {"runs": [], "shared": [], "limit": None, "profile": None}
    for kind, n in (("amqtt", args.amqtt), ("mosquitto", args.mosquitto)):
        if n > 0 and (kind == "amqtt" or mosquitto is not None):
            gateways = math.ceil(n / args.devices_per_gateway)
            spec = RunSpec(kind, n, gateways, args.rounds, args.seed)
            out["runs"].append(_run(spec, mosquitto, args.keep))
    if args.profile and mosquitto is not None:
        out["profile"] = _profiled(args, mosquitto)
    for n in args.shared:
        for kind in ("amqtt", "mosquitto"):
            if kind == "amqtt" or mosquitto is not None:
                out["shared"].append(_shared(n, kind, args, mosquitto))
    if args.find_limit and mosquitto is not None:
        out["limit"] = limit_search(args, mosquitto)
    out["notes"] = notes
    _print(out, args)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
