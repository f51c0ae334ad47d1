"""Codec throughput and wire size: the demo's model and a 1,000,000-parameter delta.

For each codec (ternary; sparse ternary at densities 1/100, 1/32, 1/16; float16; float32)
and each model (the demo's `mlp_spec((40, 100, 100, 10))`, 15,210 parameters, and a
--params one: a matrix and its bias):
  encode            delta -> signed envelope bytes: the device's whole path (encode_update:
                    quantize, pack, error feedback; to_body, CBOR, Ed25519 sign)
  decode+accumulate CBOR bytes -> validated tensors -> added into a gateway accumulator
  verify            Ed25519 signature check of the same message (a separate cost)
  full receive      open the envelope (CBOR with caps, signature) and accumulate
  bits/param        the sealed message's size, envelope and signature included

Each figure is the median of --repeats samples; a sample times enough calls to last about
20 ms. The codecs take turns within each repeat, so a busy machine slows them alike, and
`ternary/float32 encode` is the median over repeats of the ratio of the two encode times
measured in the same repeat (issue 13: at most 1). Runs on one core (affinity pinned
where the OS allows). float32 is the baseline the ratio columns compare against.

    python -m bench.codec [--params N] [--repeats R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from nacl.signing import SigningKey

from kernels.reference import mlp_spec
from tern.aggregate import Accumulator, Partial
from tern.codecs import Codec, Float16Codec, Float32Codec, SparseTernaryCodec, TernaryCodec
from tern.envelope import Envelope, Kind, canonical, loads_bounded, open_envelope, seal
from tern.messages import Update, encode_update
from tern.spec import ModelSpec

FLEET = "bench"
DENSITIES = {"1/100": 0.01, "1/32": 1 / 32, "1/16": 1 / 16}
CODECS: dict[str, Callable[[], Codec]] = {
    "ternary": TernaryCodec,
    **{f"sparse {k}": partial(SparseTernaryCodec, d) for k, d in DENSITIES.items()},
    "float16": Float16Codec,
    "float32": Float32Codec,
}
SAMPLE_S = 0.02
STEPS = ("encode", "decode_accumulate", "verify", "full_receive")


@dataclass
class _Case:
    """One codec on one model: its calls, and its wire size."""

    calls: dict[str, Callable[[], object]]
    wire_bytes: int
    number: dict[str, int]  # calls per sample, so that a sample lasts about SAMPLE_S


def _case(name: str, spec: ModelSpec, delta: np.ndarray) -> _Case:
    key = SigningKey(bytes(range(32)))
    keys = {"dev-1": key.verify_key}
    codec = CODECS[name]()
    density = getattr(codec, "density", None)
    weight = 100.0
    contribution = Partial((delta * np.float32(weight)).astype(np.float32), weight, 1)
    residual = np.zeros_like(delta)

    def encode() -> bytes:
        update, _ = encode_update(codec, spec, contribution, residual)
        return seal(Envelope(Kind.UPDATE, FLEET, 1, 1, "dev-1", update.to_body()), key)

    wire = encode()
    acc = Accumulator(spec.size)

    def decode_accumulate() -> None:
        body = loads_bounded(wire, len(wire))["body"]
        Update.from_body(body).check(spec, density=density).add_to(acc)

    signed = canonical({k: v for k, v in loads_bounded(wire, len(wire)).items() if k != "sig"})

    def verify() -> None:
        key.verify_key.verify(signed, loads_bounded(wire, len(wire))["sig"])

    # The full receive path, as a gateway runs it, to show nothing is hidden.
    def full_receive() -> None:
        env = open_envelope(wire, keys, fleet=FLEET, kinds={Kind.UPDATE}, round=1)
        Update.from_body(env.body).check(spec, density=density).add_to(acc)

    calls: dict[str, Callable[[], object]] = {
        "encode": encode,
        "decode_accumulate": decode_accumulate,
        "verify": verify,
        "full_receive": full_receive,
    }
    number = {}
    for step, fn in calls.items():
        fn()  # warm-up: first-touch page faults and caches are not the codec's cost
        t0 = time.perf_counter()
        fn()
        number[step] = max(1, int(SAMPLE_S / max(time.perf_counter() - t0, 1e-9)))
    return _Case(calls, len(wire), number)


def measure(spec: ModelSpec, delta: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    """Every codec on one model: figures per codec, and the encode ratio to float32."""
    cases = {name: _case(name, spec, delta) for name in CODECS}
    seconds: dict[str, dict[str, list[float]]] = {n: {s: [] for s in STEPS} for n in cases}
    for _ in range(repeats):
        for step in STEPS:
            for name, case in cases.items():  # in turn, within one repeat
                k = case.number[step]
                fn = case.calls[step]
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                seconds[name][step].append((time.perf_counter() - t0) / k)
    m = spec.size / 1e6
    out: dict[str, dict[str, float]] = {}
    for name, case in cases.items():
        med = {s: statistics.median(v) for s, v in seconds[name].items()}
        out[name] = {
            "bits_per_param": case.wire_bytes * 8 / spec.size,
            "wire_bytes": case.wire_bytes,
            "encode_ms": med["encode"] * 1e3,
            "encode_mparams_s": m / med["encode"],
            "decode_accumulate_mparams_s": m / med["decode_accumulate"],
            "verify_mparams_s": m / med["verify"],
            "full_receive_mparams_s": m / med["full_receive"],
        }
    ratios = [
        t / f
        for t, f in zip(seconds["ternary"]["encode"], seconds["float32"]["encode"], strict=True)
    ]
    out["ternary"]["encode_over_float32"] = statistics.median(ratios)
    return out


def _table(title: str, results: dict[str, dict[str, float]]) -> None:
    base = results["float32"]
    print(title)
    head = (
        f"{'codec':<13} {'bits/param':>10} {'wire bytes':>11} {'encode ms':>9} "
        f"{'encode M/s':>10} {'dec+acc M/s':>11} {'x float32':>9} {'verify M/s':>10} "
        f"{'full rx M/s':>11}"
    )
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        ratio = r["decode_accumulate_mparams_s"] / base["decode_accumulate_mparams_s"]
        print(
            f"{name:<13} {r['bits_per_param']:>10.3f} {r['wire_bytes']:>11,} "
            f"{r['encode_ms']:>9.3f} {r['encode_mparams_s']:>10.1f} "
            f"{r['decode_accumulate_mparams_s']:>11.1f} {ratio:>9.2f} "
            f"{r['verify_mparams_s']:>10.1f} {r['full_receive_mparams_s']:>11.1f}"
        )
    q = results["ternary"]["encode_over_float32"]
    print(
        f"ternary/float32 encode time (median of same-repeat ratios): {q:.2f} "
        f"(target <= 1: {'met' if q <= 1 else 'MISSED'})\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", type=int, default=1_000_000, help="parameters, large model")
    ap.add_argument("--repeats", type=int, default=7, help="samples per figure (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    cols = max(1, args.params // 1000)
    models = {
        "demo": mlp_spec((40, 100, 100, 10)),
        "large": ModelSpec.of({"w": (args.params - cols, 1), "b": (cols,)}),
    }
    rng = np.random.default_rng(args.seed)
    results = {}
    for label, spec in models.items():
        delta = (rng.standard_normal(spec.size) * 0.01).astype(np.float32)  # training scale
        results[label] = measure(spec, delta, args.repeats)
        _table(
            f"codec benchmark, {label} model: {spec.size:,} parameters, "
            f"median of {args.repeats}, one core",
            results[label],
        )
    t = results["large"]["ternary"]
    print(
        f"targets ({models['large'].size:,} params): ternary <= 1.7 bits/param: "
        f"{t['bits_per_param']:.3f} ({'met' if t['bits_per_param'] <= 1.7 else 'MISSED'}); "
        f"decode+accumulate >= 1000 M params/s: {t['decode_accumulate_mparams_s']:.0f} "
        f"({'met' if t['decode_accumulate_mparams_s'] >= 1000 else 'MISSED'})"
    )
    if args.json:
        doc = {
            "params": {label: spec.size for label, spec in models.items()},
            "ternary_over_float32_encode": {
                label: round(r["ternary"]["encode_over_float32"], 4) for label, r in results.items()
            },
            "models": {
                label: {c: {m: round(v, 4) for m, v in f.items()} for c, f in r.items()}
                for label, r in results.items()
            },
        }
        print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
