"""The atheris engine of bench.fuzz: one instrumented worker process per decoder.

The parent starts `python -m bench.fuzz --worker NAME ...` (without address randomization,
`setarch -R`, where there is one: atheris's coverage follows addresses, and only then are
two runs of a seed the same). The worker instruments the decoders' packages, feeds the
decoder a tenth of its inputs as pure random bytes, then lets libFuzzer mutate the seeds
(-seed set from --seed), and saves what it saw (counts, first crashes, the slowest inputs
and a reservoir) next to its log, where the parent reads it back. A worker that ends
before its last input is a crash, with libFuzzer's artifact if it left one.
"""

from __future__ import annotations

import base64
import functools
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.fuzz_engine import HEX_SHOWN, RANDOM_SHARE, Result, rng_for
from bench.fuzz_seeds import random_input
from bench.fuzz_targets import FIRMWARE, REPO, build_targets, run_one

__all__ = ["INSTRUMENTED", "run_worker", "without_aslr", "worker"]

INSTRUMENTED = ("tern", "gateway", "broker", "firmware", "tern_model")


def _file(out: Path, ext: str) -> Path:
    return out.parent / f"{out.name}.{ext}"  # not with_suffix: names hold dots


def _save(result: Result, out: Path) -> None:
    meta = {
        "name": result.name,
        "engine": result.engine,
        "inputs": result.inputs,
        "crashes": result.crashes,
        "first_crashes": result.first_crashes,
        "complete": result.complete,
        "digest": result.digest.hexdigest(),
        "instrumented_median_us": statistics.median(result.times) / 1e3 if result.times else 0,
        "instrumented_max_ms": max(result.times) / 1e6 if result.times else 0,
        "slowest": len(result.slowest),
        "reservoir": len(result.reservoir),
    }
    tmp = _file(out, "tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, _file(out, "json"))
    if result.complete:
        blobs = [d for _, _, d in sorted(result.slowest, reverse=True)] + result.reservoir
        with _file(out, "bin").open("wb") as fh:
            for blob in blobs:
                fh.write(len(blob).to_bytes(4, "little") + blob)


def _load(out: Path) -> tuple[dict[str, Any], list[bytes]]:
    meta = json.loads(_file(out, "json").read_text())
    blobs: list[bytes] = []
    path = _file(out, "bin")
    if path.exists():
        raw, pos = path.read_bytes(), 0
        while pos < len(raw):
            n = int.from_bytes(raw[pos : pos + 4], "little")
            blobs.append(raw[pos + 4 : pos + 4 + n])
            pos += 4 + n
    return meta, blobs


def worker(name: str, inputs: int, seed: int, out: Path) -> int:
    """Run in a child process: instrument, fuzz `name` for `inputs` inputs, save, exit."""
    import atheris  # the dev extra's; without it, the random engine

    sys.path.append(str(FIRMWARE))
    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        importlib.import_module("tern_model")
        targets = build_targets()
    target = targets[name]
    rng = rng_for(seed, name)
    result = Result(name, "atheris")
    out.parent.mkdir(parents=True, exist_ok=True)

    def one(data: bytes) -> None:
        ns, exc = run_one(target, data)
        result.record(data, ns, exc, rng)
        if result.inputs % 10_000 == 0:
            _save(result, out)
        if result.inputs >= inputs:
            result.complete = True
            _save(result, out)
            sys.stdout.flush()
            os._exit(0)  # libFuzzer never returns; nothing else is left to do

    # A tenth of the inputs are pure random bytes, the rest atheris's mutations.
    for _ in range(inputs // RANDOM_SHARE):
        one(random_input(rng, target.max_len))
    corpus = out.parent / f"{name.replace('/', '_')}.corpus"
    corpus.mkdir(exist_ok=True)
    for i, s in enumerate(target.seeds):
        (corpus / f"seed-{i:03d}").write_bytes(s)
    artifacts = out.parent / f"{name.replace('/', '_')}.artifact-"
    argv = [
        sys.argv[0],
        f"-seed={seed + 1}",
        f"-max_len={target.max_len}",
        "-timeout=20",
        "-rss_limit_mb=2048",
        "-reload=0",
        f"-artifact_prefix={artifacts}",
        "-print_final_stats=0",
        str(corpus),
    ]
    atheris.Setup(argv, one)
    atheris.Fuzz()
    return 0  # not reached


@functools.cache
def without_aslr() -> tuple[str, ...]:
    """The prefix that runs a command without address randomization, where it works:
    atheris's coverage follows addresses, and only then are two runs the same."""
    setarch = shutil.which("setarch")
    if setarch is None:
        return ()
    prefix = (setarch, platform.machine(), "-R")
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
    return prefix if probe.returncode == 0 else ()


def run_worker(name: str, inputs: int, seed: int, work: Path) -> tuple[dict[str, Any], list[bytes]]:
    out = work / name.replace("/", "_")
    log = work / f"{name.replace('/', '_')}.log"
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "bench.fuzz",
        "--worker",
        name,
        "--inputs",
        str(inputs),
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    cmd = [*without_aslr(), *cmd]
    timeout = 120 + inputs * 0.02  # 20 ms an input at worst; a hang is libFuzzer's -timeout
    with log.open("wb") as fh:
        try:
            rc = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=fh, stderr=fh, timeout=timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    try:
        meta, blobs = _load(out)
    except (OSError, ValueError):
        meta, blobs = {"name": name, "inputs": 0, "crashes": 0, "first_crashes": []}, []
    if rc != 0 or not meta.get("complete"):
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        crash: dict[str, object] = {"type": f"the fuzzer ended (exit {rc})", "message": tail}
        for art in sorted(work.glob(f"{name.replace('/', '_')}.artifact-*")):
            data = art.read_bytes()
            crash.update(
                type=f"{art.name.split('artifact-')[1].split('-')[0]} (exit {rc})",
                length=len(data),
                input_hex=data[:HEX_SHOWN].hex(),
                input_b64=base64.b64encode(data).decode(),
            )
        meta["crashes"] = int(meta.get("crashes", 0)) + 1
        meta["first_crashes"] = [*meta.get("first_crashes", []), crash]
        meta["failure"] = tail[-300:]
    return meta, blobs
