"""`tern data mnist1d`: one .npz per device (Dirichlet label skew) and a test set.

So that the coordinator, gateways and devices can run on separate machines, each
device gets its own file with ``x`` (float32, (n, 40)), ``y`` (int64, (n,)) and
``index`` (its rows in the generated training set; the files' indices are disjoint).
``test.npz`` holds the held-out set. The same seed writes the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kernels.partition import dirichlet_partition, load_mnist1d
from tern.errors import TernError
from tern.topics import validate_id

__all__ = ["add_arguments", "build_parser", "device_ids", "main", "run", "write_mnist1d"]


def device_ids(n: int, prefix: str = "dev-") -> list[str]:
    """dev-01, dev-02, ... (zero-padded to at least two digits, so names sort)."""
    width = max(2, len(str(n)))
    return [validate_id(f"{prefix}{i:0{width}d}", "device") for i in range(1, n + 1)]


def write_mnist1d(
    out: Path,
    devices: int,
    alpha: float,
    seed: int,
    *,
    samples: int = 4000,
    prefix: str = "dev-",
    min_size: int = 10,
) -> list[Path]:
    """Write <device>.npz for each device and test.npz into `out`; return the paths."""
    data = load_mnist1d(num_samples=samples, seed=seed)
    parts = dirichlet_partition(
        data.y, devices, alpha, np.random.default_rng(seed), min_size=min_size
    )
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for device, idx in zip(device_ids(devices, prefix), parts, strict=True):
        path = out / f"{device}.npz"
        np.savez(path, x=data.x[idx], y=data.y[idx], index=idx)
        paths.append(path)
    test = out / "test.npz"
    np.savez(test, x=data.x_test, y=data.y_test)
    paths.append(test)
    return paths


def add_arguments(ap: argparse.ArgumentParser) -> None:
    sub = ap.add_subparsers(dest="dataset", required=True)
    p = sub.add_parser("mnist1d", help="MNIST-1D split across devices by Dirichlet label skew")
    p.add_argument("--devices", type=int, required=True, help="number of devices")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha (smaller: more skew)")
    p.add_argument("--seed", type=int, required=True, help="seed of the data and the split")
    p.add_argument("--out", required=True, help="directory for dev-XX.npz and test.npz")
    p.add_argument("--samples", type=int, default=4000, help="samples generated (80%% train)")
    p.add_argument("--prefix", default="dev-", help="device id prefix (default: dev-)")
    p.add_argument("--min-size", type=int, default=10, help="samples every device gets first")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tern data", description="Write per-device data sets.")
    add_arguments(ap)
    return ap


def run(args: argparse.Namespace) -> int:
    try:
        paths = write_mnist1d(
            Path(args.out),
            args.devices,
            args.alpha,
            args.seed,
            samples=args.samples,
            prefix=args.prefix,
            min_size=args.min_size,
        )
    except (ValueError, TernError) as exc:
        print(f"tern data: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths) - 1} device files and {paths[-1]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
