"""What hostile messages cost their receiver, and what 10,000 of them do to a gateway.

Part a, in this process (the demo's model, `mlp_spec((40, 100, 100, 10))`, 15,210
parameters; a device's valid ternary update is about 3.4 KB): for each attack class, the
receiver's time per refused message against its time to accept a valid message, measured
in the same run, one message of each in turn, each the median of --samples messages, then
the median of --repeat repeats, the garbage collector paused during each call. The
receiver is the one a gateway runs: a `tern.collect.Collector` for contributions (a fresh
one per message, with the history the class needs: an update already accepted, the attempt
budget spent) and a `tern.feed.CoordinatorFeed` for models and schedules. A contribution's
baseline is a device's valid update accepted; a model's or a schedule's is a newer valid
one of the same size accepted. A gateway's view of its members (`tern.fleetview`) takes
statuses from its devices and views from its child gateways: their baselines are the
largest valid status and the largest valid view (256 members) taken. Accepting an update
means admitting it (`offer`) and folding it (what `close()` does with it); the time of
`offer` alone is shown too.
Target: ratio <= 1 for every class.

Part b, a real gateway (`python -m gateway`, its fleet made by `tern fleet init`, its own
embedded broker, a --state-dir) under an embedded upstream broker in this process, with a
round open (this process plays the coordinator): the gateway's RSS, then --messages hostile
messages of the classes above (as a compromised device with its own login, on its own
update topic; the model and schedule classes on the upstream topics; --strangers
connections refused by its broker), then its RSS again, the refusals its metrics count
(`rejected`, round by round) and one honest round (three devices send valid updates): does
it complete, and what is the RSS then. Target: RSS within 10 MB of its start.

Part c, a gateway under secure aggregation (bench.hostile_secagg): the refusal cost of
each secure-aggregation stage message class against accepting a valid message of its
stage, and a flood of --secagg-messages around one round, which must still close with
exactly the sum of its devices' contributions.

Part d, the compressed downlink (bench.hostile_downlink): the refusal cost of each hostile
delta or full model at a device's and a gateway's model follower against accepting a
valid message of the same size (a ternary delta, a float32 delta for an oversize one, a
full model); every refusal carries its named reason, is counted (``delta_<reason>``,
``model_<reason>``) and leaves the follower holding what it held.

Part e, chunked messages (bench.hostile_chunks): the refusal cost of each hostile manifest
or chunk at a gateway's chunking transport against taking a valid chunked update, and a
flood of --chunk-messages through which every honest update must arrive whole.

    python -m bench.hostile [--repeat N] [--samples N] [--messages 10000] [--strangers N]
                            [--secagg-messages N] [--skip-gateway] [--skip-secagg]
                            [--skip-downlink] [--skip-chunks] [--chunk-messages N] [--json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from nacl.signing import SigningKey

from bench.hostile_chunks import chunks_part
from bench.hostile_classes import AttackClass, Scenario, demo_fleet
from bench.hostile_costs import measure_costs
from bench.hostile_downlink import Downlink, downlink_costs
from bench.hostile_gateway import flood_gateway
from bench.hostile_secagg import secagg_costs, secagg_flood, world
from tern.fleet import Fleet

__all__ = ["AttackClass", "Scenario", "demo_fleet", "flood_gateway", "main", "measure_costs"]

RSS_TARGET_MB = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=5, help="repeats of part a (median)")
    ap.add_argument("--samples", type=int, default=200, help="messages per class and repeat")
    ap.add_argument("--messages", type=int, default=10_000, help="hostile messages (part b)")
    ap.add_argument("--strangers", type=int, default=100, help="refused connections (part b)")
    ap.add_argument("--skip-gateway", action="store_true", help="no part b")
    ap.add_argument("--skip-secagg", action="store_true", help="no part c")
    ap.add_argument("--secagg-messages", type=int, default=2000, help="hostile messages (c)")
    ap.add_argument("--skip-downlink", action="store_true", help="no part d")
    ap.add_argument("--skip-chunks", action="store_true", help="no part e")
    ap.add_argument("--chunk-messages", type=int, default=2000, help="hostile messages (e)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)

    fleet, keys = demo_fleet(args.seed)
    s = Scenario(keys, fleet, args.seed)
    costs = measure_costs(s, args.repeat, args.samples)
    print(
        f"hostile input, part a: a gateway's receivers, {len(costs['classes'])} attack classes, "
        f"median of {args.samples} messages x {args.repeat} repeats, GC paused"
    )
    print(
        f"accept a valid device update ({costs['update_bytes']:,} B): {costs['accept_us']:.1f} µs "
        f"(offer {costs['accept_offer_us']:.1f} µs, fold the rest); "
        f"a newer model ({costs['model_bytes']:,} B): {costs['accept_model_us']:.1f} µs; "
        f"a newer schedule: {costs['accept_schedule_us']:.1f} µs; "
        f"a device's status: {costs['accept_status_us']:.1f} µs; "
        f"a child gateway's view: {costs['accept_view_us']:.1f} µs"
    )
    head_ = f"{'attack class':<40} {'bytes':>7} {'refuse µs':>10} {'ratio':>6} {'vs':>8}  reason"
    print(head_)
    print("-" * len(head_))
    rows = sorted(costs["classes"].items(), key=lambda kv: kv[1]["ratio"])
    for name, r in rows:
        mark = "" if r["reason"] == r["expected"] else f" (expected {r['expected']})"
        print(
            f"{name:<40} {r['bytes']:>7,} {r['refuse_us']:>10.1f} {r['ratio']:>6.2f} "
            f"{r['baseline']:>8}  {r['reason']}{mark}"
        )
    worst = max(r["ratio"] for r in costs["classes"].values())
    print(
        f"target: refusing costs no more than accepting (ratio <= 1): worst {worst:.2f} "
        f"({'met' if worst <= 1 else 'MISSED'})"
    )
    result: dict[str, Any] = {**costs}
    if not args.skip_secagg:
        result["secagg"] = _secagg_part(args.repeat, args.samples, args.secagg_messages, args.seed)
    if not args.skip_downlink:
        result["downlink"] = _downlink_part(fleet, keys, args.repeat, args.samples, args.seed)
    if not args.skip_chunks:
        result["chunks"] = chunks_part(args.repeat, args.samples, args.chunk_messages)
    if not args.skip_gateway:
        rss = flood_gateway(args.messages, args.strangers, args.seed)
        result["rss"] = rss
        sent = rss["sent"]
        print(
            f"\npart b: a gateway process, {sent['device']:,} messages from a compromised "
            f"device, {sent['upstream']:,} models/schedules upstream, {args.strangers} "
            f"stranger connections ({rss['stranger_connects_refused']} refused), "
            f"in {rss['flood_seconds']:.1f} s"
        )
        print(
            f"RSS before {rss['before_mb']:.1f} MB, after {rss['after_mb']:.1f} MB "
            f"(delta {rss['delta_mb']:+.1f} MB), after an honest round "
            f"{rss['after_round_mb']:.1f} MB (delta {rss['delta_after_round_mb']:+.1f} MB)"
        )
        total = sent["device"] + sent["upstream"] + sent["stranger_connects"]
        print(
            f"counted by the gateway (metrics rejected): {rss['counted']:,} of {total:,} sent: "
            f"{rss['rejected']}"
        )
        print(
            f"next round with 3 honest devices: "
            f"{'completed' if rss['next_round_completed'] else 'NOT completed'} "
            f"({rss['next_round_contributors']} contributors)"
        )
        ok = abs(rss["delta_mb"]) <= RSS_TARGET_MB
        print(
            f"target: RSS within {RSS_TARGET_MB:g} MB of its start: {rss['delta_mb']:+.1f} MB "
            f"({'met' if ok else 'MISSED'})"
        )
    if args.json:
        print(json.dumps(result))
    return 0


def _secagg_part(repeat: int, samples: int, messages: int, seed: int) -> dict[str, Any]:
    """Part c (bench.hostile_secagg): the gateway of a cohort under secure aggregation."""
    w = world(seed)
    sa = secagg_costs(w, repeat, samples)
    accepted = ", ".join(
        f"{k} {sa['accept_us'][k]:.1f} µs ({sa['message_bytes'][k]:,} B)" for k in sa["accept_us"]
    )
    print(f"\npart c: a gateway under secure aggregation (ring 2^{sa['bits']}), accept: {accepted}")
    head_ = f"{'attack class':<52} {'bytes':>7} {'refuse µs':>10} {'ratio':>6} {'vs':>7}  reason"
    print(head_)
    print("-" * len(head_))
    for name, r in sorted(sa["classes"].items(), key=lambda kv: kv[1]["ratio"]):
        mark = "" if r["reason"] == r["expected"] else f" (expected {r['expected']})"
        print(
            f"{name:<52} {r['bytes']:>7,} {r['refuse_us']:>10.1f} {r['ratio']:>6.2f} "
            f"{r['baseline']:>7}  {r['reason']}{mark}"
        )
    worst = max(r["ratio"] for r in sa["classes"].values())
    print(f"target: ratio <= 1: worst {worst:.2f} ({'met' if worst <= 1 else 'MISSED'})")
    flood = secagg_flood(w, messages)
    sa["flood"] = flood
    print(
        f"flood: {flood['sent']:,} hostile stage messages in {flood['seconds']:.2f} s, "
        f"{flood['counted']:,} refusals counted {flood['rejected']}; the round "
        f"{'closed with the exact sum' if flood['exact_sum'] else 'did NOT close exactly'} "
        f"of {flood['survivors']} survivors (every honest member: {flood['honest_in_sum']})"
    )
    return sa


def _downlink_part(
    fleet: Fleet, keys: dict[str, SigningKey], repeat: int, samples: int, seed: int
) -> dict[str, Any]:
    """Part d (bench.hostile_downlink): a device's and a gateway's model followers."""
    d = downlink_costs(Downlink(fleet, keys, seed), repeat, samples)
    sizes = d["message_bytes"]
    accepted = "; ".join(
        f"{r}: " + ", ".join(f"{b} {us:.1f} µs ({sizes[b]:,} B)" for b, us in bs.items())
        for r, bs in d["accept_us"].items()
    )
    print(f"\npart d: the compressed downlink ({d['params']:,} parameters), accept: {accepted}")
    head_ = f"{'attack class':<58} {'bytes':>7} {'refuse µs':>10} {'ratio':>6} {'vs':>16}  reason"
    print(head_)
    print("-" * len(head_))
    for name, r in sorted(d["classes"].items(), key=lambda kv: kv[1]["ratio"]):
        mark = "" if r["reason"] == r["expected"] else f" (expected {r['expected']})"
        mark += "" if r["counted"] and r["kept"] else " (NOT counted once / models changed)"
        print(
            f"{name:<58} {r['bytes']:>7,} {r['refuse_us']:>10.1f} {r['ratio']:>6.2f} "
            f"{r['baseline']:>16}  {r['reason']}{mark}"
        )
    worst = max(r["ratio"] for r in d["classes"].values())
    print(f"target: ratio <= 1: worst {worst:.2f} ({'met' if worst <= 1 else 'MISSED'})")
    return d


if __name__ == "__main__":
    raise SystemExit(main())
