"""What the demo reports: its result (the `--json` object), the bytes on every hop of a
round counted the way a sniffer on the brokers counts them, and the closing summary.

Hops (payload bytes of every PUBLISH, counted at the clients, one delivery at a time,
so a message a broker delivers to ten devices counts ten times):

    device_to_gateway   everything the devices sent (updates, failures, status)
    gateway_to_parent   everything the gateways sent upstream (partials, metrics, status, views)
    parent_to_gateway   everything delivered to the gateways upstream (deltas, schedules,
                        full models when they fetched one, kernels)
    gateway_to_device   everything delivered to the devices (the same, relayed)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from broker.transport_types import TransportStats

__all__ = ["HOPS", "DemoResult", "HopCounter", "summary"]

HOPS = ("device_to_gateway", "gateway_to_parent", "parent_to_gateway", "gateway_to_device")


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
    partials: str = "float32"  # the codec gateways send their partials in
    downlink: str = "full"  # how models went down: deltas in a codec, or "full"
    devices: int = 0  # how many devices and gateways ran (the hops' per-member figures)
    gateways: int = 0

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
            "partials": self.partials,
            "downlink": self.downlink,
        }


class HopCounter:
    """Bytes on each hop since the last `take()`, from the clients' own counters."""

    def __init__(self, devices: Sequence[Any], gateways: Sequence[Any]) -> None:
        self._devices = devices  # DeviceAgent: .transport.stats
        self._gateways = gateways  # Gateway: .upstream.stats
        self._last = self._totals()

    def _totals(self) -> dict[str, int]:
        dev = [d.transport.stats for d in self._devices]
        ups: list[TransportStats] = [g.upstream.stats for g in self._gateways
                                     if g.upstream is not None]  # fmt: skip
        return {
            "device_to_gateway": sum(s.bytes_out for s in dev),
            "gateway_to_parent": sum(s.bytes_out for s in ups),
            "parent_to_gateway": sum(s.bytes_in for s in ups),
            "gateway_to_device": sum(s.bytes_in for s in dev),
        }

    def take(self) -> dict[str, int]:
        now = self._totals()
        out = {h: now[h] - self._last[h] for h in HOPS}
        self._last = now
        return out


def summary(result: DemoResult, out: TextIO) -> None:
    rows = result.rounds
    print(
        f"\ntern demo: {len(rows)} rounds, codec {result.codec}, partials {result.partials}, "
        f"downlink {result.downlink}, {result.params:,} params, "
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
    if not rows:
        return
    per_dev = sum(r["bytes_device_to_gateway"] for r in rows) / max(
        1, sum(r["contributors"] for r in rows)
    )
    print(
        f"final accuracy {100 * (result.final_accuracy or 0):.1f}%; "
        f"{per_dev:,.0f} bytes per device update "
        f"({8 * per_dev / result.params:.2f} bits/param)",
        file=out,
    )
    _hop_table(result, out)


def _hop_table(result: DemoResult, out: TextIO) -> None:
    """Median bytes per round on each hop, per device or per gateway, after round 1 (which
    also carries every device's first full model and the kernel)."""
    rows = [r for r in result.rounds if "hops" in r and r["round"] > 1] or result.rounds
    rows = [r for r in rows if "hops" in r]
    if not rows or not result.devices or not result.gateways:
        return
    print("bytes per round on each hop (median after round 1; payloads as delivered):", file=out)
    for h in HOPS:
        device = h in ("device_to_gateway", "gateway_to_device")
        n, who = (result.devices, "device") if device else (result.gateways, "gateway")
        values = sorted(r["hops"][h] / n for r in rows)
        b = values[len(values) // 2]
        print(f"  {h.replace('_', ' '):<20} {b:>10,.0f} B per {who:<7} "
              f"({8 * b / result.params:.2f} bits/param)", file=out)  # fmt: skip
