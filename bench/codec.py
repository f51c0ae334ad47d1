"""Codec throughput and wire size for a 1,000,000-parameter delta.

For each codec (ternary, float16, float32), median of --repeats runs:
  encode            delta -> signed envelope bytes (quantize, pack, CBOR, Ed25519 sign)
  decode+accumulate CBOR bytes -> validated tensors -> added into a gateway accumulator
  verify            Ed25519 signature check of the same message (a separate cost)
  bits/param        the sealed message's size, envelope and signature included

Runs on one core (affinity pinned where the OS allows). float32 is the baseline the
ratio columns compare against, measured in the same run.

    python -m bench.codec [--params N] [--repeats R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from nacl.signing import SigningKey

from tern.aggregate import Accumulator, Partial
from tern.codecs import Codec, Float16Codec, Float32Codec, TernaryCodec
from tern.envelope import Envelope, Kind, canonical, loads_bounded, open_envelope, seal
from tern.messages import Update, encode_update
from tern.spec import ModelSpec

FLEET = "bench"
CODECS: dict[str, Callable[[], Codec]] = {
    "ternary": TernaryCodec,
    "float16": Float16Codec,
    "float32": Float32Codec,
}


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and caches are not the codec's cost
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, spec: ModelSpec, delta: np.ndarray, repeats: int) -> dict[str, float]:
    key = SigningKey(bytes(range(32)))
    keys = {"dev-1": key.verify_key}
    codec = CODECS[name]()
    weight = 100.0
    partial = Partial((delta * np.float32(weight)).astype(np.float32), weight, 1)

    def encode() -> bytes:
        update, _ = encode_update(codec, spec, partial, np.zeros_like(delta))
        return seal(Envelope(Kind.UPDATE, FLEET, 1, 1, "dev-1", update.to_body()), key)

    wire = encode()
    acc = Accumulator(spec.size)

    def decode_accumulate() -> None:
        body = loads_bounded(wire, len(wire))["body"]
        Update.from_body(body).check(spec).add_to(acc)

    signed = canonical({k: v for k, v in loads_bounded(wire, len(wire)).items() if k != "sig"})

    def verify() -> None:
        key.verify_key.verify(signed, loads_bounded(wire, len(wire))["sig"])

    # The full receive path, as a gateway runs it, to show nothing is hidden.
    def open_and_accumulate() -> None:
        env = open_envelope(wire, keys, fleet=FLEET, kinds={Kind.UPDATE}, round=1)
        Update.from_body(env.body).check(spec).add_to(acc)

    n = spec.size / 1e6
    return {
        "bits_per_param": len(wire) * 8 / spec.size,
        "wire_bytes": len(wire),
        "encode_mparams_s": n / _median_seconds(encode, repeats),
        "decode_accumulate_mparams_s": n / _median_seconds(decode_accumulate, repeats),
        "verify_mparams_s": n / _median_seconds(verify, repeats),
        "full_receive_mparams_s": n / _median_seconds(open_and_accumulate, repeats),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", type=int, default=1_000_000, help="parameters in the delta")
    ap.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    # Two tensors, like a layer: a matrix and its bias; a delta of training scale.
    cols = max(1, args.params // 1000)
    spec = ModelSpec.of({"w": (args.params - cols, 1), "b": (cols,)})
    rng = np.random.default_rng(args.seed)
    delta = (rng.standard_normal(spec.size) * 0.01).astype(np.float32)

    results = {name: measure(name, spec, delta, args.repeats) for name in CODECS}
    base = results["float32"]
    print(f"codec benchmark: {spec.size:,} parameters, median of {args.repeats}, one core")
    head = (
        f"{'codec':<8} {'bits/param':>10} {'wire bytes':>11} {'encode M/s':>11} "
        f"{'dec+acc M/s':>12} {'x float32':>9} {'verify M/s':>11} {'full rx M/s':>12}"
    )
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        ratio = r["decode_accumulate_mparams_s"] / base["decode_accumulate_mparams_s"]
        print(
            f"{name:<8} {r['bits_per_param']:>10.3f} {r['wire_bytes']:>11,} "
            f"{r['encode_mparams_s']:>11.1f} {r['decode_accumulate_mparams_s']:>12.1f} "
            f"{ratio:>9.2f} {r['verify_mparams_s']:>11.1f} {r['full_receive_mparams_s']:>12.1f}"
        )
    t = results["ternary"]
    print(
        f"targets: ternary <= 1.7 bits/param: {t['bits_per_param']:.3f} "
        f"({'met' if t['bits_per_param'] <= 1.7 else 'MISSED'}); "
        f"decode+accumulate >= 1000 M params/s: {t['decode_accumulate_mparams_s']:.0f} "
        f"({'met' if t['decode_accumulate_mparams_s'] >= 1000 else 'MISSED'})"
    )
    if args.json:
        print(json.dumps({k: {m: round(v, 4) for m, v in r.items()} for k, r in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
