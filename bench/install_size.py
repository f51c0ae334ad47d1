"""What installing tern costs: disk and time of a fresh virtual environment per variant.

For each variant (by default the device-only core `.` and the demo `.[demo]`) it makes a
new venv, times `pip install` of this checkout into it (pip's own configuration: its index
or local wheel directories), and measures the venv's size on disk, minus an empty venv's,
and the number of distributions installed. It also records whether the device's import
path pulled in any of the extras' packages (it must not).

    python -m bench.install_size [--variant SPEC ...] [--keep DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS = (".", ".[demo]")
EXTRAS_ONLY = ("amqtt", "yaml", "cryptography", "mnist1d", "matplotlib", "scipy", "rich")
# what a device process imports: its CLI (the `tern device` entry) and its modules
DEVICE_PROBE = (
    "import sys, tern.cli, device.__main__; "
    f"print(','.join(sorted(m for m in {EXTRAS_ONLY!r} if m in sys.modules)))"
)


def du_bytes(path: Path) -> int:
    """Bytes on disk of everything under `path` (files counted once)."""
    total, seen = 0, set()
    for root, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def measure(spec: str, work: Path) -> dict[str, Any]:
    venv = work / ("venv-" + spec.strip(".[]").replace(",", "-") or "venv-core")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    empty = du_bytes(venv)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir"]
    started = time.perf_counter()
    subprocess.run([*pip, spec], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        check=True,
        capture_output=True,
        text=True,
    )
    names = sorted(d["name"].lower() for d in json.loads(listed.stdout))
    installed = [n for n in names if n not in ("pip", "setuptools")]  # the empty venv's
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", DEVICE_PROBE],
        cwd=work,  # not the checkout: the installed package
        capture_output=True,
        text=True,
    )
    return {
        "variant": f"tern{spec[1:]}" if spec.startswith(".") else spec,
        "install_seconds": round(seconds, 1),
        "megabytes": round((du_bytes(venv) - empty) / 1e6, 1),
        "distributions": len(installed),
        # the extras' packages a device process imported: [] is the only good answer
        "device_imports_extras": [m for m in probe.stdout.strip().split(",") if m],
        "device_probe_ok": probe.returncode == 0,
        "installed": installed,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.install_size", description=__doc__)
    ap.add_argument(
        "--variant", action="append", help="what to pip install, e.g. . or .[demo] (repeat)"
    )
    ap.add_argument("--keep", type=Path, help="make the venvs here and keep them")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = ap.parse_args(argv)
    variants = args.variant or list(VARIANTS)
    with tempfile.TemporaryDirectory(prefix="tern-install-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [measure(spec, work) for spec in variants]
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'variant':<14} {'MB':>7} {'seconds':>8} {'dists':>6}  extras a device imports")
    for r in rows:
        extras = ", ".join(r["device_imports_extras"]) or "none"
        if not r["device_probe_ok"]:
            extras = "(the device's modules failed to import)"
        print(
            f"{r['variant']:<14} {r['megabytes']:>7.1f} {r['install_seconds']:>8.1f} "
            f"{r['distributions']:>6}  {extras}"
        )
    if args.json:
        print(json.dumps({"bench": "install_size", "python": sys.version.split()[0], "rows": rows}))
    light = all(r["device_probe_ok"] and not r["device_imports_extras"] for r in rows)
    return 0 if light else 1


if __name__ == "__main__":
    raise SystemExit(main())
