"""Fuzz every decoder that takes bytes from the network (or a local file).

For each decoder: --inputs inputs (100,000 by default), seeded from valid messages (real
sealed envelopes, valid bodies, valid JSON, a sealed microcontroller model, topic names),
from the hostile shapes of issue 9 (shared references, decimal/bigfloat/rational tags,
bignums, deep nesting, huge declared lengths, indefinite lengths, huge JSON numbers, ...),
plus pure random bytes (a tenth of the inputs). The engine:

  atheris   (default when installed) coverage-guided: libFuzzer mutates the seeds, guided
            by the branches the decoder takes; one process per decoder, the decoders'
            packages instrumented, libFuzzer's -seed set from --seed
  random    no instrumentation, in this process: random mutations of the same seeds
            (bit flips, byte runs, cuts, splices, CBOR heads); what tests/test_fuzz_sample
            runs, a few hundred inputs each

A crash is any exception but the decoder's documented error (a TernError; the firmware's
ModelError; gateway.boards.BoardsError); the first few crashing inputs are kept and the run
goes on. `/signed` decoders re-sign each mutated message with a fleet member's key before it
is decoded (a compromised member), `/tagged` ones re-tag a microcontroller model with the
board's key, so that fuzzing reaches what lies behind the signature check.

Timing. Each input is timed around the decoder call alone (perf_counter_ns; building it,
re-signing it and the fuzzer's mutation and coverage bookkeeping are outside). Coverage
instrumentation slows the decoders themselves, so the figures are taken again here,
uninstrumented, on the 16 slowest inputs the fuzzer saw and 500 drawn at random from all,
each run 5 times (median), the garbage collector paused: "slowest" is the slowest of them,
"median" the median of the 500. Targets: 0 crashes, no input slower than 10 ms.
Deterministic for a seed: the same inputs (their digest is in --json; atheris's coverage
follows addresses, so its workers run without ASLR, `setarch -R`, where there is one).

    python -m bench.fuzz [--inputs N] [--seed S] [--decoders a,b] [--engine atheris|random]
                         [--jobs J] [--artifacts DIR] [--list] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.fuzz_atheris import run_worker, without_aslr, worker
from bench.fuzz_engine import (
    Result,
    describe_crash,
    keep_crashes,
    result_meta,
    sample,
    summarize,
)
from bench.fuzz_seeds import mutate
from bench.fuzz_targets import Target, build_targets, run_one

__all__ = [
    "Result",
    "Target",
    "build_targets",
    "describe_crash",
    "fuzz",
    "main",
    "mutate",
    "run_one",
    "sample",
    "summarize",
]

DEFAULT_INPUTS = 100_000
TARGET_MS = 10.0


def fuzz(
    names: Sequence[str],
    inputs: int,
    seed: int,
    *,
    engine: str = "random",
    jobs: int = 1,
    artifacts: Path | None = None,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fuzz each decoder in `names`; one row per decoder (see `summarize`)."""
    targets = build_targets()
    rows: dict[str, dict[str, Any]] = {}

    def one(name: str, work: Path) -> tuple[str, dict[str, Any], list[bytes], float]:
        t0 = time.perf_counter()
        if engine == "atheris":
            meta, blobs = run_worker(name, inputs, seed, work)
        else:
            meta, blobs = result_meta(sample(targets[name], inputs, seed))
        return name, meta, blobs, time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="tern-fuzz-") as tmp:
        work = Path(tmp)
        with ThreadPoolExecutor(max(1, jobs) if engine == "atheris" else 1) as pool:
            for name, meta, blobs, seconds in pool.map(lambda n: one(n, work), names):
                meta["exec_per_s"] = round(int(meta.get("inputs", 0)) / max(seconds, 1e-9))
                rows[name] = summarize(targets[name], meta, blobs)
                if artifacts is not None:
                    keep_crashes(artifacts, name, meta)
                if progress is not None:
                    progress(name, rows[name])
    return rows


def _engine(choice: str | None) -> str:
    if choice is not None:
        return choice
    return "atheris" if importlib.util.find_spec("atheris") is not None else "random"


def _print_row(name: str, row: dict[str, Any]) -> None:
    print(
        f"{name:<28} {row['inputs']:>9,} {row['crashes']:>7} {row['slowest_ms']:>10.3f} "
        f"{row['median_us']:>10.1f} {row.get('exec_per_s', 0):>8,}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--inputs", type=int, default=DEFAULT_INPUTS, help="inputs per decoder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoders", help="comma-separated names (default: every decoder; --list)")
    ap.add_argument("--engine", choices=("atheris", "random"), help="default: atheris if installed")
    ap.add_argument("--jobs", type=int, default=1, help="decoders fuzzed at once (atheris)")
    ap.add_argument("--artifacts", type=Path, help="write each kept crashing input here")
    ap.add_argument("--list", action="store_true", help="list the decoders and exit")
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.seed < 0 or args.inputs < 1:
        ap.error("--seed must be >= 0 and --inputs >= 1")
    if args.worker:
        assert args.out is not None
        return worker(args.worker, args.inputs, args.seed, args.out)
    names = list(build_targets())
    if args.list:
        print("\n".join(names))
        return 0
    if args.decoders:
        chosen = [n.strip() for n in args.decoders.split(",") if n.strip()]
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            ap.error(f"unknown decoders {unknown}; --list shows them")
        names = chosen
    engine = _engine(args.engine)
    if engine == "atheris" and not without_aslr():
        print("note: setarch -R is not available here: two runs of a seed may differ")
    print(
        f"fuzz: {len(names)} decoders, {args.inputs:,} inputs each, engine {engine}, "
        f"seed {args.seed}; times uninstrumented, GC paused"
    )
    head = (
        f"{'decoder':<28} {'inputs':>9} {'crashes':>7} {'slowest ms':>10} {'median µs':>10} "
        f"{'exec/s':>8}"
    )
    print(head)
    print("-" * len(head))
    rows = fuzz(
        names,
        args.inputs,
        args.seed,
        engine=engine,
        jobs=args.jobs,
        artifacts=args.artifacts,
        progress=_print_row,
    )
    crashes = sum(r["crashes"] for r in rows.values())
    slowest = max((r["slowest_ms"] for r in rows.values()), default=0.0)
    fewest = min((r["inputs"] for r in rows.values()), default=0)
    print(
        f"targets: 0 crashes: {crashes} ({'met' if crashes == 0 else 'MISSED'}); "
        f"no input slower than {TARGET_MS:g} ms: {slowest:.3f} ms "
        f"({'met' if slowest <= TARGET_MS else 'MISSED'}); "
        f"fewest inputs {fewest:,}"
    )
    for name, row in rows.items():
        for c in row["first_crashes"]:
            print(f"  crash in {name}: {c['type']}: {str(c.get('message', ''))[:160]!r}")
            print(f"    at {' -> '.join(c.get('where', []))}")
            print(f"    input ({c.get('length', '?')} bytes): {c.get('input_hex', '')}")
    if args.json:
        print(
            json.dumps(
                {
                    "engine": engine,
                    "seed": args.seed,
                    "inputs": args.inputs,
                    "crashes": crashes,
                    "slowest_ms": slowest,
                    "targets": {"zero_crashes": crashes == 0, "under_10ms": slowest <= TARGET_MS},
                    "deterministic": engine == "random" or bool(without_aslr()),
                    "decoders": rows,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
