"""The board's inference: latency and heap under MicroPython, and the same code under CPython.

The demo MLP (40-100-100-10, one local epoch on MNIST-1D) quantized to the
microcontroller format (tern.mcu.quantize, sealed with tern.mcu.seal_mcu), on --windows
MNIST-1D test windows (tern.mcu.quantize_window):
  micropython      firmware/esp32/tern_model.py on MicroPython 1.27 (WebAssembly, node),
                   timed inside MicroPython with time.ticks_us
  cpython fw       the same tern_model.py under this CPython
  cpython ref      tern.mcu.infer, the CPython reference (numpy for the products)
Each latency is the median over --repeats runs of the mean time per inference over the
windows. Heap (MicroPython): gc.mem_alloc() after importing tern_model, plus its growth
with the collector off while it receives and loads an old model, then receives and loads
the new one (both held) and runs one inference: an upper bound on the peak, to compare
with the 64 KB the board gives it. WebAssembly on a desktop CPU is much faster than an
ESP32 (240 MHz Xtensa): the latency here is a relative figure, not the board's.

    python -m bench.mcu [--windows 50] [--repeats 5] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from firmware.micropython import (
    MicroPythonUnavailable,
    find_node,
    heap_use,
    npm_install,
    run_micropython,
)
from kernels.partition import load_mnist1d
from kernels.reference import init_weights, mlp_spec, train_local
from tern import mcu
from tern.messages import TrainConfig

__all__ = ["demo_case", "main", "measure_cpython", "measure_micropython"]

ESP32 = Path(__file__).resolve().parents[1] / "firmware" / "esp32"
KEY = bytes(range(32))
FLEET, DEVICE = "bench", "esp-1"
SIZES = (40, 100, 100, 10)
RUN = 1_767_225_600_000  # a coordinator's run: ms since the epoch, past 2**32 as in practice
HEAP_TARGET = 64 * 1024
TIMEOUT = 600.0


def demo_case(windows: int, seed: int) -> tuple[mcu.McuModel, list[list[int]]]:
    """The demo MLP after one local epoch, quantized, and `windows` quantized test windows."""
    data = load_mnist1d(num_samples=max(2000, 5 * windows))
    spec = mlp_spec(SIZES)
    rng = np.random.default_rng(seed)
    weights = train_local(spec, init_weights(spec, rng), data.x[:400], data.y[:400],
                          TrainConfig(), rng)  # fmt: skip
    model = mcu.quantize(spec, weights, model_version=2, run=RUN)
    xs = data.x_test[:windows]
    return model, [mcu.quantize_window(x, model.in_exp) for x in xs]


def _sealed(model: mcu.McuModel) -> bytes:
    return mcu.seal_mcu(model.to_bytes(), KEY, FLEET, DEVICE)


def _firmware_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tern_model", ESP32 / "tern_model.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {ESP32 / 'tern_model.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_micropython(
    model: mcu.McuModel, windows: list[list[int]], repeats: int
) -> dict[str, float]:
    """us per inference (median of runs), and heap bytes, under MicroPython on node."""
    old = mcu.McuModel(model.model_version - 1, model.run, model.in_exp, model.sizes, model.layers)
    base, grown = heap_use(
        _sealed(old), _sealed(model), windows[0], key=KEY, fleet=FLEET, device=DEVICE,
        timeout=TIMEOUT,
    )  # fmt: skip
    source = f"""
import time
import tern_model
def receive(name):
    with open(name, "rb") as f:
        return f.read()
new = tern_model.load(receive("new.bin"), {KEY!r}, {FLEET!r}, {DEVICE!r})
WINDOWS = [[int(v) for v in line.split(",")] for line in open("windows.txt")]
for _ in range({repeats}):
    t0 = time.ticks_us()
    for w in WINDOWS:
        new.infer(w)
    print("run", time.ticks_diff(time.ticks_us(), t0) / len(WINDOWS))
"""
    files = {
        "tern_model.py": (ESP32 / "tern_model.py").read_bytes(),
        "new.bin": _sealed(model),
        "windows.txt": "".join(",".join(map(str, w)) + "\n" for w in windows).encode(),
    }
    lines = run_micropython(source, timeout=TIMEOUT, files=files).split("\n")
    runs = [float(line.split()[1]) for line in lines if line.startswith("run ")]
    return {
        "us_per_inference": statistics.median(runs),
        "heap_base_bytes": base,
        "heap_grown_bytes": grown,
        "heap_total_bytes": base + grown,
    }


def _median_us(fn: Any, windows: list[list[int]], repeats: int) -> float:
    fn(windows[0])  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in windows:
            fn(w)
        runs.append((time.perf_counter() - t0) / len(windows) * 1e6)
    return statistics.median(runs)


def measure_cpython(
    model: mcu.McuModel, windows: list[list[int]], repeats: int
) -> dict[str, float]:
    """us per inference under this CPython: the firmware module and the reference."""
    fw = _firmware_model().load(_sealed(model), KEY, FLEET, DEVICE)
    return {
        "firmware_us_per_inference": _median_us(fw.infer, windows, repeats),
        "reference_us_per_inference": _median_us(lambda w: mcu.infer(model, w), windows, repeats),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--windows", type=int, default=50, help="MNIST-1D test windows per run")
    ap.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)

    model, windows = demo_case(args.windows, args.seed)
    wire = len(_sealed(model))
    micro: dict[str, float] | None
    try:
        find_node()
        npm_install()
        micro = measure_micropython(model, windows, args.repeats)
        skipped = ""
    except MicroPythonUnavailable as exc:
        micro, skipped = None, str(exc)
    cpy = measure_cpython(model, windows, args.repeats)

    print(
        f"mcu benchmark: MLP {'-'.join(map(str, SIZES))}, {wire:,} B sealed, "
        f"{len(windows)} windows, median of {args.repeats}"
    )
    head = f"{'interpreter':<22} {'us/inference':>13} {'heap bytes':>11}"
    print(head)
    print("-" * len(head))
    if micro is not None:
        print(
            f"{'micropython (wasm)':<22} {micro['us_per_inference']:>13.1f} "
            f"{micro['heap_total_bytes']:>11,}"
        )
    else:
        print(f"{'micropython (wasm)':<22} {'skipped':>13} ({skipped})")
    print(f"{'cpython tern_model':<22} {cpy['firmware_us_per_inference']:>13.1f} {'':>11}")
    print(f"{'cpython tern.mcu':<22} {cpy['reference_us_per_inference']:>13.1f} {'':>11}")
    if micro is not None:
        total = micro["heap_total_bytes"]
        print(
            f"heap: {micro['heap_base_bytes']:,} B after import + "
            f"{micro['heap_grown_bytes']:,} B for two models and an inference = {total:,} B; "
            f"target <= {HEAP_TARGET:,} B: {'met' if total <= HEAP_TARGET else 'MISSED'}"
        )
    if args.json:
        result: dict[str, Any] = {
            "model_bytes": wire,
            "windows": len(windows),
            "micropython": micro,
            "cpython": cpy,
        }
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
