"""Run code under real MicroPython: the WebAssembly port (npm) under node.

Tests and `bench.mcu` use this to run the board's pure modules (firmware/esp32) on the
interpreter the board runs, not on CPython. The npm package is pinned in
firmware/package.json / package-lock.json and installed into firmware/node_modules with
`npm ci --prefix firmware` (npm_install() does that when it is missing).

MicroPython's WebAssembly heap grows on demand, so `heap` is the starting size, not a cap:
measure memory inside the script as gc.mem_alloc() growth with gc.disable().
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from firmware.errors import FirmwareError

__all__ = [
    "FIRMWARE_DIR",
    "PACKAGE",
    "MicroPythonFailed",
    "MicroPythonUnavailable",
    "find_micropython",
    "find_node",
    "heap_use",
    "npm_install",
    "run_micropython",
]

FIRMWARE_DIR = Path(__file__).resolve().parent
PACKAGE = "@micropython/micropython-webassembly-pyscript"
DEFAULT_HEAP = 64 * 1024
INSTALL_TIMEOUT = 300.0

# Reads {"mjs", "heap", "source", "files": {name: base64}} on stdin, writes the files into
# MicroPython's in-memory filesystem (so scripts can import them), runs the source, and
# exits 1 with the Python traceback on stderr if it raised (the package's own CLI exits 0).
_RUNNER = r"""
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
const req = JSON.parse(readFileSync(0, "utf8"));
const { loadMicroPython } = await import(pathToFileURL(req.mjs).href);
const mp = await loadMicroPython({
  heapsize: req.heap,
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
  linebuffer: true,
});
for (const [name, data] of Object.entries(req.files)) {
  mp.FS.writeFile(name, Buffer.from(data, "base64"));
}
try {
  mp.runPython(req.source);
} catch (error) {
  if (error.name !== "PythonError") throw error;
  if (error.type !== "SystemExit") {
    process.stderr.write(error.message);
    process.exitCode = 1;
  }
}
"""


class MicroPythonUnavailable(FirmwareError):
    """node or the MicroPython npm package is not installed."""


class MicroPythonFailed(FirmwareError):
    """The script raised under MicroPython, or node failed or timed out."""

    def __init__(self, message: str, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


def find_node() -> str:
    """The node executable; MicroPythonUnavailable when there is none."""
    node = shutil.which("node")
    if node is None:
        raise MicroPythonUnavailable("node is not installed (MicroPython runs on it in tests)")
    return node


def find_micropython(root: Path = FIRMWARE_DIR) -> Path:
    """micropython.mjs of the installed npm package; MicroPythonUnavailable when absent."""
    mjs = root / "node_modules" / PACKAGE / "micropython.mjs"
    if not mjs.is_file():
        raise MicroPythonUnavailable(
            f"{PACKAGE} is not installed: run `npm ci --prefix {root}` (expected {mjs})"
        )
    return mjs


def npm_install(root: Path = FIRMWARE_DIR, timeout: float = INSTALL_TIMEOUT) -> Path:
    """Install the pinned package with `npm ci` when node_modules lacks it; its .mjs path."""
    try:
        return find_micropython(root)
    except MicroPythonUnavailable:
        pass
    npm = shutil.which("npm")
    if npm is None:
        raise MicroPythonUnavailable(f"{PACKAGE} is not installed and npm is not available")
    try:
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise MicroPythonUnavailable(f"npm ci took longer than {timeout} s") from exc
    if proc.returncode != 0:
        raise MicroPythonUnavailable(f"npm ci failed ({proc.returncode}): {proc.stderr.strip()}")
    return find_micropython(root)


def run_micropython(
    source: str,
    *,
    heap: int = DEFAULT_HEAP,
    timeout: float,
    files: Mapping[str, bytes] | None = None,
    root: Path = FIRMWARE_DIR,
) -> str:
    """Run `source` under MicroPython (node) and return its stdout.

    `files` are written into MicroPython's filesystem first, by name (e.g.
    {"tern_model.py": ...} so the script can import it). MicroPythonFailed when the script
    raises (its traceback is in the message), node fails, or it runs past `timeout` s.
    """
    node = find_node()
    mjs = find_micropython(root)
    request = json.dumps(
        {
            "mjs": str(mjs),
            "heap": heap,
            "source": source,
            "files": {k: base64.b64encode(v).decode() for k, v in (files or {}).items()},
        }
    )
    try:
        proc = subprocess.run(
            [node, "--input-type=module", "-e", _RUNNER],
            input=request,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
    except subprocess.TimeoutExpired as exc:
        raise MicroPythonFailed(f"MicroPython ran past {timeout} s") from exc
    if proc.returncode != 0:
        raise MicroPythonFailed(
            f"MicroPython failed ({proc.returncode}):\n{proc.stderr.strip()}",
            proc.stdout,
            proc.stderr,
        )
    return proc.stdout


# Everything after importing tern_model is counted, with the collector off so the growth
# bounds the peak: reading both messages, the old model, the new one (while the old one is
# still held, as on a board that keeps its last good model), and one inference.
_HEAP_PROBE = """
import gc
gc.collect()
import tern_model
gc.collect()
base = gc.mem_alloc()
gc.disable()
def receive(name):
    import os
    buf = bytearray(os.stat(name)[6])
    with open(name, "rb") as f:
        f.readinto(buf)
    return buf
old = tern_model.load(receive("old.bin"), {key!r}, {fleet!r}, {device!r})
new = tern_model.load(receive("new.bin"), {key!r}, {fleet!r}, {device!r}, old.mark)
new.infer({window!r})
grown = gc.mem_alloc() - base
gc.enable()
print("heap", base, grown)
"""


def heap_use(
    old: bytes,
    new: bytes,
    window: Sequence[int],
    *,
    key: bytes,
    fleet: str,
    device: str,
    timeout: float,
    root: Path = FIRMWARE_DIR,
) -> tuple[int, int]:
    """MicroPython heap bytes (after importing tern_model, then grown) for a board that
    holds the sealed model `old` (a lower version), loads `new` and infers on `window`."""
    source = _HEAP_PROBE.format(key=key, fleet=fleet, device=device, window=list(window))
    files = {
        "tern_model.py": (root / "esp32" / "tern_model.py").read_bytes(),
        "old.bin": old,
        "new.bin": new,
    }
    out = run_micropython(source, timeout=timeout, files=files, root=root)
    line = next(x for x in out.splitlines() if x.startswith("heap "))
    base, grown = (int(v) for v in line.split()[1:3])
    return base, grown
