"""Part d of bench.hostile: what refusing a hostile downlink message costs (issue 13).

The receivers are two `tern.rounds.follow.ModelFollower`s on the demo's model
(`mlp_spec((40, 100, 100, 10))`, 15,210 parameters): a device's (dev-01, whose parent
gw-1 may seal it a full model) and a gateway's (gw-1, below the coordinator, which takes
full models only from it). Each holds v5 (the coordinator's full model) and took the
schedule of round 6, which names v6's hash; every message goes to a fresh copy of it
(made outside the timing). For each attack class, the time to refuse it against the
time the same receiver takes to accept a valid message of the same size: a ternary delta
to v6 (about 3.4 KB) for the delta classes, a float32 delta to v6 (the largest a delta
can be) for an oversize one, the full v6 (sealed by gw-1 for the device, by the
coordinator for the gateway) for the full-model classes. Each time is the median of
`samples` messages, one of each in turn, then the median of `repeat` repeats, the
garbage collector paused during each call. Every refusal must carry its named reason,
be counted once as ``delta_<reason>`` / ``model_<reason>`` and leave the follower
holding what it held.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from nacl.signing import SigningKey

from bench.hostile_classes import CHILD, DEVICES, FLEET, GATEWAY, LAYERS, RUN, flip_signature
from bench.hostile_costs import _timed
from kernels.reference import init_weights, mlp_spec
from tern.codecs import Codec, CodecName, Float32Codec, TernaryCodec
from tern.downlink import ModelDelta, compress, delta_caps, model_hash
from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.feed import CoordinatorFeed
from tern.fleet import COORDINATOR, Fleet
from tern.freshness import Stamp
from tern.messages import GlobalModel, RoundSchedule
from tern.rounds.events import Link
from tern.rounds.follow import ModelFollower

__all__ = ["BASELINES", "RECEIVERS", "Downlink", "DownlinkClass", "downlink_costs"]

DEVICE = DEVICES[0]
RECEIVERS = {"device": GATEWAY, "gateway": COORDINATOR}  # receiver: its parent
BASELINES = {  # receiver: the valid messages it accepts, the classes' baselines
    "device": ("delta", "delta_float32", "full"),
    "gateway": ("delta", "delta_float32", "full_coordinator"),
}
VERSION = 6  # the version the valid messages bring; the followers hold VERSION - 1


@dataclass(frozen=True)
class DownlinkClass:
    """A hostile downlink message for `receiver`, refused for `reason`; `baseline` names
    the valid message of its size whose acceptance it is measured against."""

    name: str
    receiver: str
    reason: str
    data: bytes
    baseline: str

    @property
    def counter(self) -> str:
        """The key of the follower's `feed.rejected` that counts it."""
        return f"{'delta' if self.baseline.startswith('delta') else 'model'}_{self.reason}"


class Downlink:
    """The models v3..v6 from the coordinator's side, the valid messages and the classes."""

    def __init__(self, fleet: Fleet, keys: dict[str, SigningKey], seed: int = 0) -> None:
        self.fleet, self.keys = fleet, keys
        self.spec = mlp_spec(LAYERS)
        rng = np.random.default_rng([seed, 13])
        models = {3: GlobalModel(self.spec, init_weights(self.spec, rng))}
        deltas: dict[int, ModelDelta] = {}
        for v in range(4, VERSION + 1):
            deltas[v], models[v] = self._step(TernaryCodec(), models[v - 1], v - 1, rng)
        self.models, self.deltas = models, deltas
        wide, self.wide_model = self._step(Float32Codec(), models[VERSION - 1], VERSION - 1, rng)
        self.other = GlobalModel(self.spec, init_weights(self.spec, rng))  # never published
        self.valid = {
            "delta": self.delta(deltas[VERSION]),
            "delta_float32": self.delta(wide),
            "full": self.full(VERSION, models[VERSION], GATEWAY),  # what the device takes
            "full_coordinator": self.full(VERSION, models[VERSION]),  # ... and the gateway
        }
        self.templates = {r: self._follower(r, p) for r, p in RECEIVERS.items()}

    def _step(
        self, codec: Codec, held: GlobalModel, base: int, rng: np.random.Generator
    ) -> tuple[ModelDelta, GlobalModel]:
        step = rng.normal(scale=0.01, size=self.spec.size).astype(np.float32)
        c = compress(codec, held, base, held.weights + step, None)
        return c.delta, c.model

    def delta(self, d: ModelDelta, *, key: str = COORDINATOR) -> bytes:
        """`d` sealed as the coordinator's delta to the version after its base."""
        version = d.base + 1
        env = Envelope(Kind.MODEL_DELTA, FLEET, version, version, COORDINATOR, d.to_body(),
                       run=RUN)  # fmt: skip
        return seal(env, self.keys[key])

    def full(self, version: int, model: GlobalModel, sender: str = COORDINATOR) -> bytes:
        env = Envelope(Kind.MODEL, FLEET, version, version, sender, model.to_body(), run=RUN)
        return seal(env, self.keys[sender])

    def _follower(self, receiver: str, parent: str) -> ModelFollower:
        f = ModelFollower(CoordinatorFeed(self.fleet), parent,
                          Link.DOWN if receiver == "device" else Link.UP)  # fmt: skip
        f.on_full(self.full(VERSION - 1, self.models[VERSION - 1]))
        digest = model_hash(self.spec, self.models[VERSION].weights)
        f.on_schedule(RUN, RoundSchedule(VERSION, VERSION, CodecName.TERNARY, 1e12, 1,
                                          model_hash=digest))  # fmt: skip
        latest = f.latest()
        if latest is None or latest[0] != Stamp(RUN, VERSION - 1) or f.feed.rejected:
            raise RuntimeError("the follower did not take its model and schedule")
        return f

    def follower(self, receiver: str) -> ModelFollower:
        """A fresh copy of `receiver`'s follower (the fleet and its keys shared)."""
        t = self.templates[receiver]
        return copy.deepcopy(t, {id(t.fleet): t.fleet})

    def classes(self) -> list[DownlinkClass]:
        """Every class of the brief, for each receiver it applies to."""
        d = self.deltas[VERSION]
        cap = delta_caps(self.spec).max_bytes
        other = model_hash(self.spec, self.other.weights)
        delta_cases = [
            ("forged delta", "bad_signature", "delta", flip_signature(self.valid["delta"])),
            ("replayed delta (to v4, older than the mark)", "stale", "delta",
             self.delta(self.deltas[4])),
            ("delta onto another base (another v5's hash)", "base_mismatch", "delta",
             self.delta(replace(d, base_hash=other))),
            ("delta lying about its hash", "hash_mismatch", "delta",
             self.delta(replace(d, hash=other))),
            ("oversize delta (past a float32 delta's cap)", "oversize", "delta_float32",
             b"\xa9" + bytes(cap)),
        ]  # fmt: skip
        sealed_by = {s: self.full(VERSION, self.models[VERSION], s) for s in (CHILD, DEVICES[1])}
        out = [DownlinkClass(f"{r}: {n}", r, why, data, base)
               for r in RECEIVERS for n, why, base, data in delta_cases]  # fmt: skip
        out += [
            DownlinkClass("device: gateway-sealed full model unlike the signed hash",
                          "device", "hash_mismatch", self.full(VERSION, self.other, GATEWAY),
                          "full"),
            DownlinkClass(f"device: full model sealed by another gateway ({CHILD})", "device",
                          "bad_signature", sealed_by[CHILD], "full"),
            DownlinkClass(f"device: full model sealed by a device ({DEVICES[1]})", "device",
                          "bad_signature", sealed_by[DEVICES[1]], "full"),
            DownlinkClass(f"gateway: full model sealed by another gateway ({CHILD})", "gateway",
                          "bad_signature", sealed_by[CHILD], "full_coordinator"),
            DownlinkClass(f"gateway: full model sealed by a device ({DEVICES[1]})", "gateway",
                          "bad_signature", sealed_by[DEVICES[1]], "full_coordinator"),
        ]  # fmt: skip
        return out


def _take(f: ModelFollower, data: bytes, baseline: str) -> Callable[[], str]:
    """The follower takes `data` as a delta or a full model: "" when it adopted a model,
    "ignored" when it took nothing without refusing, else the refusal's reason."""

    def call() -> str:
        try:
            adopted = f.on_delta(data)[1] if baseline.startswith("delta") else f.on_full(data)
        except TernError as exc:
            return exc.reason
        return "" if adopted else "ignored"

    return call


def _held(f: ModelFollower) -> list[tuple[Stamp, bytes, bytes]]:
    return [(s, d, m.weights.tobytes()) for s, (m, d) in sorted(f.held.items())]


def downlink_costs(w: Downlink, repeat: int, samples: int) -> dict[str, Any]:
    """µs to accept each valid message and to refuse each class, per receiver, the ratio,
    and what every refusal did to its follower (counted once, models kept)."""
    classes = w.classes()
    accept: dict[str, list[float]] = {f"{r}/{b}": [] for r, bs in BASELINES.items() for b in bs}
    refuse: dict[str, list[float]] = {c.name: [] for c in classes}
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(repeat):
        times: dict[str, list[int]] = {k: [] for k in [*accept, *refuse]}
        for _ in range(samples):
            for key in accept:
                receiver, base = key.split("/")
                ns, reason = _timed(_take(w.follower(receiver), w.valid[base], base))
                if reason:
                    raise RuntimeError(f"the {receiver}'s valid {base} was not taken: {reason}")
                times[key].append(ns)
            for c in classes:
                f = w.follower(c.receiver)
                before = _held(f)
                ns, reason = _timed(_take(f, c.data, c.baseline))
                times[c.name].append(ns)
                seen[c.name] = {"reason": reason, "counted": dict(f.feed.rejected),
                                "kept": _held(f) == before}  # fmt: skip
        for key, ns_list in times.items():
            (accept if key in accept else refuse)[key].append(statistics.median(ns_list) / 1e3)
    base_us = {k: statistics.median(v) for k, v in accept.items()}
    out: dict[str, Any] = {
        "params": w.spec.size,
        "accept_us": {
            r: {b: round(base_us[f"{r}/{b}"], 2) for b in bs} for r, bs in BASELINES.items()
        },
        "message_bytes": {k: len(v) for k, v in w.valid.items()},
        "classes": {},
    }
    for c in classes:
        us = statistics.median(refuse[c.name])
        s = seen[c.name]
        counted = s["counted"].get(c.counter, 0) == 1 and sum(s["counted"].values()) == 1
        against = base_us[f"{c.receiver}/{c.baseline}"]
        out["classes"][c.name] = {
            "refuse_us": round(us, 2), "ratio": round(us / against, 3),
            "reason": s["reason"], "expected": c.reason, "baseline": c.baseline,
            "receiver": c.receiver, "bytes": len(c.data), "counter": c.counter,
            "counted": counted, "kept": s["kept"],
        }  # fmt: skip
    return out
