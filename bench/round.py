"""Round time and MQTT message rate for 10, 100 and 1,000 simulated devices, amqtt vs Mosquitto.

For each broker kind and each device count N, one run builds a real fleet on one machine:
  coordinator   the real Coordinator (MLP 40-100-100-10, 15,210 parameters, ternary codec)
  gateways      real Gateways, one per --devices-per-gateway devices, each with its own
                downstream broker of the same kind (amqtt: the gateway's EmbeddedBroker,
                in this process; mosquitto: one mosquitto process per gateway, plus one
                for the coordinator)
  devices       simulated: no training. Each device's update is a real ternary update
                (tern.messages.encode_update of a random small delta, its own weight),
                sealed with the device's own key for the round when the schedule arrives
                and published on its own topic update(fleet, gw, dev), over its own MQTT
                connection with its own login (the brokers enforce every device's
                rights: the embedded brokers with the fleet's policy, Mosquitto with
                what `tern mosquitto-config` writes). The devices are amqtt's asyncio
                client on one event loop per gateway (bench.devices: paho's select()
                loop holds only about 250 clients in one process); only each pool's
                first device subscribes to the model and the schedule: the simulated
                devices do not train, so one copy per pool is enough.

Per round (median of --rounds after one warm-up round):
  round s     schedule published -> coordinator closed the round (RoundRecord.round_seconds);
              min-max shows the fastest and slowest measured round, since the spread on a
              shared 2-core machine is wide
  msgs/s      MQTT PUBLISH packets sent by every client plus those delivered to every client
              (MqttTransport.stats messages_out + messages_in, summed over the coordinator,
              gateways up- and downstream, and device connections; payloads, not PUBACKs),
              counted from the previous round's close to this round's close, divided by
              that wall time
  updates/s   accepted device updates / round s
The ratio column is mosquitto's round time over amqtt's for the same N, measured in the
same run (below 1: mosquitto is faster).

    python -m bench.round [--devices 10,100,1000] [--brokers amqtt,mosquitto]
                          [--rounds R] [--round-timeout S] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.devices import DevicePool
from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.fleet_access import broker_policy
from broker.lifecycle import quiet_third_party_logs
from broker.mosquitto import MosquittoProcess, find_mosquitto
from broker.mosquitto_config import write_mosquitto_config
from broker.transport import Transport
from coordinator import Coordinator, CoordinatorConfig
from coordinator.store import RoundRecord
from gateway import Gateway, GatewayConfig
from kernels.reference import mlp_spec
from tern.aggregate import Partial
from tern.codecs import TernaryCodec
from tern.fleet import COORDINATOR, Fleet
from tern.members import Members, new_members
from tern.messages import encode_update

__all__ = ["DevicePool", "main", "measure"]

log = logging.getLogger(__name__)

FLEET = "bench"
LAYERS = (40, 100, 100, 10)
HOST = "127.0.0.1"
START_TIMEOUT = 15.0
BROKERS = ("amqtt", "mosquitto")


# -- brokers ------------------------------------------------------------------------------


# -- one fleet ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kit:
    members: Members
    layout: dict[str, list[str]]  # gateway -> its devices

    @property
    def fleet(self) -> Fleet:
        return self.members.fleet


def _build_fleet(n: int, per_gateway: int, seed: int) -> _Kit:
    devices = [f"dev-{i:04d}" for i in range(1, n + 1)]
    layout = {
        f"gw-{g + 1:02d}": devices[i : i + per_gateway]
        for g, i in enumerate(range(0, n, per_gateway))
    }
    spec = {gw: (COORDINATOR, devs) for gw, devs in layout.items()}
    return _Kit(new_members(FLEET, spec, rng=np.random.default_rng(seed)), layout)


_BODIES: dict[tuple[int, str], object] = {}  # (seed, device) -> body; reused across runs


def _update_bodies(devices: Sequence[str], seed: int) -> dict[str, object]:
    """One ternary update body per device: a random small delta times its sample count."""
    spec = mlp_spec(LAYERS)
    codec = TernaryCodec()
    for dev in devices:
        if (seed, dev) not in _BODIES:
            rng = np.random.default_rng([seed, int(dev[4:])])
            delta = (rng.standard_normal(spec.size) * 0.01).astype(np.float32)
            w = float(rng.integers(50, 200))
            update, _ = encode_update(codec, spec, Partial((delta * np.float32(w)), w, 1))
            _BODIES[seed, dev] = update.to_body()
    return {d: _BODIES[seed, d] for d in devices}


HOPS = ("device_to_gateway", "gateway_to_parent", "parent_to_gateway", "gateway_to_device")


@dataclass(frozen=True)
class _Closed:
    record: RoundRecord
    at: float  # monotonic seconds
    messages: int  # every client's published + delivered so far
    hops: dict[str, int]  # payload bytes so far on each hop (HOPS), every member together


def _run_fleet(
    kind: str, n: int, args: argparse.Namespace, mosquitto: str | None, workdir: Path
) -> list[_Closed]:
    """Run 1 + args.rounds rounds on a fresh fleet; the close of every round, in order."""
    kit = _build_fleet(n, args.devices_per_gateway, args.seed)
    bodies = _update_bodies(kit.fleet.devices, args.seed)
    timeout = args.round_timeout or max(30.0, 0.06 * n)
    stops: list[Callable[[], None]] = []  # run in reverse order, whatever fails
    closed: list[_Closed] = []
    try:

        def broker(name: str) -> str | None:
            """A new broker's URL (mosquitto, with the fleet's logins and rights), or None
            for the component's own amqtt."""
            if kind == "amqtt":
                return None
            assert mosquitto is not None

            def configure(directory: Path, host: str, port: int) -> Path:
                files = write_mosquitto_config(
                    kit.fleet, directory, broker=name, host=host, port=port
                )
                return files.conf

            m = MosquittoProcess(mosquitto, workdir / name, configure=configure)
            stops.append(m.stop)
            return m.url

        coord_url = broker(COORDINATOR)
        if coord_url is None:
            embedded = EmbeddedBroker(
                HOST, 0, access=AccessControl(broker_policy(kit.fleet, COORDINATOR))
            ).start(START_TIMEOUT)
            stops.append(embedded.stop)
            coord_url = embedded.url

        counted: list[Transport] = []
        pools: list[DevicePool] = []  # their own counts: bench.devices are not paho clients
        gateways: list[Gateway] = []
        for g, gw in enumerate(kit.layout):
            config = GatewayConfig(
                gw,
                coord_url,
                downstream_url=broker(gw),
                listen_host=HOST,
                listen_port=0,
                backoff_min=0.05,
                backoff_max=1.0,
                login=kit.members.logins[gw],
            )
            keys = kit.members.keys
            gateway = Gateway(config, kit.fleet, keys[gw], rng=np.random.default_rng([g]))
            gateway.start(START_TIMEOUT)
            stops.append(gateway.stop)
            gateways.append(gateway)
            assert gateway.upstream is not None and gateway.downstream is not None
            counted += [gateway.upstream, gateway.downstream]

        def messages() -> int:
            paho = sum(t.stats.messages_in + t.stats.messages_out for t in counted)
            return paho + sum(p.messages_in + p.messages_out for p in pools)

        def hops() -> dict[str, int]:
            """Payload bytes at the clients, delivery by delivery: what every device
            sent and received (a pool's first device receives what each of its devices
            would), what every gateway sent and received upstream."""
            ups = [g.upstream for g in gateways if g.upstream is not None]
            return {
                "device_to_gateway": sum(p.bytes_out for p in pools),
                "gateway_to_parent": sum(t.stats.bytes_out for t in ups),
                "parent_to_gateway": sum(t.stats.bytes_in for t in ups),
                "gateway_to_device": sum(p.bytes_in * len(p.devices) for p in pools),
            }

        def on_round(record: RoundRecord) -> None:
            closed.append(_Closed(record, time.monotonic(), messages(), hops()))

        coord_config = CoordinatorConfig(
            broker_url=coord_url,
            state_dir=workdir / "coordinator-state",
            layers=LAYERS,
            rounds=1 + args.rounds,
            round_timeout=timeout,
            min_contributors=1,
            seed=args.seed,
            login=kit.members.logins[COORDINATOR],
        )
        coord_key = kit.members.keys[COORDINATOR]
        coordinator = Coordinator(coord_config, kit.fleet, coord_key, on_round=on_round)
        # The coordinator's own client is counted too; it has no public accessor.
        counted.append(coordinator._transport)
        stops.append(coordinator.stop)
        # Every paho client connects before the devices: paho waits with select(), which
        # cannot watch descriptors above 1024, and a thousand devices take that many.
        # Devices that come up after round 1 opened answer its retained schedule.
        coordinator.start()
        for gw, devices in kit.layout.items():
            url = next(g.downstream_url for g in gateways if g.id == gw)
            pool = DevicePool(url, kit.members, gw, devices, bodies)
            stops.append(pool.close)
            pools.append(pool.start(START_TIMEOUT + 0.05 * len(devices)))
        budget = (1 + args.rounds) * (timeout + 5.0)
        if not coordinator.wait_finished(budget):
            log.warning("%s, %d devices: rounds unfinished after %.0f s", kind, n, budget)
        errors = sum(p.errors for p in pools)
        if errors:
            log.warning("%s, %d devices: %d device-side errors", kind, n, errors)
        return list(closed)
    finally:
        for stop in reversed(stops):
            try:
                stop()
            except Exception:  # clean up the rest whatever one of them does
                log.exception("cleanup step failed")


def measure(kind: str, n: int, args: argparse.Namespace, mosquitto: str | None) -> dict[str, float]:
    """Medians over the measured rounds (the first round is the warm-up)."""
    with tempfile.TemporaryDirectory(prefix=f"tern-bench-round-{kind}-{n}-") as tmp:
        closes = _run_fleet(kind, n, args, mosquitto, Path(tmp))
    by_round = {c.record.round: c for c in closes}
    round_s, msgs_s, updates_s = [], [], []
    per_member: dict[str, list[float]] = {h: [] for h in HOPS}
    gateways = math.ceil(n / args.devices_per_gateway)
    complete = 0
    for r in range(2, 2 + args.rounds):
        this, prev = by_round.get(r), by_round.get(r - 1)
        if this is None or prev is None:
            continue
        rec = this.record
        complete += rec.contributors == n
        secs = max(rec.round_seconds, 1e-3)
        round_s.append(secs)
        updates_s.append(rec.contributors / secs)
        msgs_s.append((this.messages - prev.messages) / max(this.at - prev.at, 1e-3))
        for h in HOPS:  # per device (device hops) or per gateway, in this round
            members = n if h in ("device_to_gateway", "gateway_to_device") else gateways
            per_member[h].append((this.hops[h] - prev.hops[h]) / members)
    if not round_s:
        nan = float("nan")
        figures = ("round_s", "round_s_min", "round_s_max", "msgs_s", "updates_s",
                   *(f"bytes_{h}" for h in HOPS))  # fmt: skip
        return {**dict.fromkeys(figures, nan), "rounds": 0, "complete": 0}
    return {
        "round_s": statistics.median(round_s),
        "round_s_min": min(round_s),
        "round_s_max": max(round_s),
        "msgs_s": statistics.median(msgs_s),
        "updates_s": statistics.median(updates_s),
        "rounds": len(round_s),
        "complete": complete,
        **{f"bytes_{h}": statistics.median(v) for h, v in per_member.items()},
    }


def _json_number(value: float) -> float | None:
    """Rounded for reading; None (null) for a figure no round produced."""
    return round(value, 4) if math.isfinite(value) else None


def _csv_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _csv_brokers(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = set(names) - set(BROKERS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown broker(s) {sorted(unknown)}; use {BROKERS}")
    return names


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    quiet_third_party_logs()
    # A slow round at 1,000 devices makes paho and the components chatty; keep the table readable.
    names = ("coordinator", "gateway", "broker", "device")
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--devices", type=_csv_ints, default=[10, 100, 1000], help="device counts")
    ap.add_argument("--brokers", type=_csv_brokers, default=list(BROKERS), help="amqtt,mosquitto")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (median), after 1")
    ap.add_argument("--devices-per-gateway", type=int, default=50)
    ap.add_argument(
        "--round-timeout", type=float, default=0.0, help="seconds; 0: max(30, 0.06 * devices)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    if min(args.rounds, args.devices_per_gateway, *args.devices) < 1:
        ap.error("--rounds, --devices and --devices-per-gateway must be >= 1")

    mosquitto = find_mosquitto()
    brokers = [b for b in args.brokers if b != "mosquitto" or mosquitto is not None]
    notes = []
    if "mosquitto" in args.brokers and mosquitto is None:
        notes.append("mosquitto skipped: not installed (apt-get install mosquitto)")

    results: dict[str, dict[str, dict[str, float]]] = {b: {} for b in BROKERS}
    with _quiet_logs():
        for kind in brokers:
            for n in args.devices:
                results[kind][str(n)] = measure(kind, n, args, mosquitto)
    ratio = {
        key: results["mosquitto"][key]["round_s"] / results["amqtt"][key]["round_s"]
        for key in results["mosquitto"]
        if key in results["amqtt"]
    }

    print(
        f"round benchmark: MLP {'-'.join(map(str, LAYERS))}, ternary updates, "
        f"{args.devices_per_gateway} devices per gateway, each on its own connection; "
        f"median of {args.rounds} rounds after 1 warm-up"
    )
    print("msgs/s = MQTT PUBLISHes sent + delivered, all clients; ratio = round s mosq/amqtt")
    head = (
        f"{'broker':<10} {'devices':>7} {'round s':>8} {'min-max':>13} {'msgs/s':>9} "
        f"{'updates/s':>10} {'complete':>8} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for kind in BROKERS:
        for key, r in results[kind].items():
            shown = f"{ratio[key]:>6.2f}" if kind == "mosquitto" and key in ratio else f"{'':>6}"
            print(
                f"{kind:<10} {int(key):>7,} {r['round_s']:>8.3f} "
                f"{r['round_s_min']:>6.3f}-{r['round_s_max']:<6.3f} {r['msgs_s']:>9,.0f} "
                f"{r['updates_s']:>10,.0f} {int(r['complete']):>4}/{int(r['rounds']):<3} {shown}"
            )
    params = mlp_spec(LAYERS).size
    print(f"\nbytes per hop per round (payloads as delivered; per device or per gateway), "
          f"bits per parameter of the {params:,}-parameter model in brackets")  # fmt: skip
    head = f"{'broker':<10} {'devices':>7} " + " ".join(f"{h.replace('_', ' '):>24}" for h in HOPS)
    print(head)
    print("-" * len(head))
    for kind in BROKERS:
        for key, r in results[kind].items():
            cells = []
            for h in HOPS:
                b = r[f"bytes_{h}"]
                cells.append(f"{b:>12,.0f} ({8 * b / params:>6.2f})" if math.isfinite(b) else
                             f"{'n/a':>24}")  # fmt: skip
            print(f"{kind:<10} {int(key):>7,} " + " ".join(f"{c:>24}" for c in cells))
    for note in notes:
        print(note)
    if args.json:
        out: dict[str, object] = {
            kind: {
                key: {m: _json_number(v) for m, v in r.items()} for key, r in results[kind].items()
            }
            for kind in BROKERS
        }
        out["ratio_mosquitto_over_amqtt"] = {k: _json_number(v) for k, v in ratio.items()}
        out["notes"] = notes
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
