"""The training kernels a device runs: fetched over MQTT, verified, cached on disk.

A round schedule names its kernel by SHA-256 (`tern.messages.KernelRef`); the
coordinator publishes the signed kernel, retained, on the topic named by that hash.
`KernelShelf` keeps what arrived and passed `open_kernel` (coordinator's signature,
fleet, kind, the hash of the bytes equal to the hash asked for) on disk as the signed
message itself, so a cached file is verified again every time it is read, and a
tampered or truncated cache file is dropped, never run. What failed verification is
remembered with its reason until a good copy arrives.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from broker.lifecycle import write_atomic
from device.errors import DeviceError
from kernels.wasm import ABI_VERSION, WasmTrainer
from tern.errors import TernError
from tern.fleet import Fleet
from tern.messages import KernelFile, KernelRef, open_kernel

__all__ = ["KernelRefused", "KernelShelf", "default_cache_dir"]

log = logging.getLogger(__name__)

_KEEP_COMPILED = 2  # the kernel in use and the one before it


class KernelRefused(DeviceError):
    """The kernel a round names cannot be used; `reason` is the slug reported upstream."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tern/kernels`` (``~/.cache/tern/kernels`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "tern" / "kernels"


class KernelShelf:
    """Verified kernels of one fleet, by SHA-256; `cache_dir` None keeps them in memory."""

    def __init__(self, fleet: Fleet, cache_dir: Path | None) -> None:
        self.fleet = fleet
        self.dir = None if cache_dir is None else Path(cache_dir) / fleet.fleet
        self._cond = threading.Condition()
        self._kernels: dict[str, KernelFile] = {}
        self._refused: dict[str, TernError] = {}
        self._compiled: dict[tuple[str, int, int], WasmTrainer] = {}

    # -- arrivals (paho's thread) ---------------------------------------------------------

    def offer(self, sha256: str, data: bytes) -> KernelFile:
        """Verify a kernel message that arrived for `sha256`; keep it or remember why not."""
        try:
            kernel = open_kernel(data, self.fleet, sha256)
        except TernError as exc:
            with self._cond:
                if sha256 not in self._kernels:
                    self._refused[sha256] = exc
                self._cond.notify_all()
            raise
        self._save(sha256, data)
        with self._cond:
            self._kernels[sha256] = kernel
            self._refused.pop(sha256, None)
            self._cond.notify_all()
        return kernel

    def _path(self, sha256: str) -> Path | None:
        return None if self.dir is None else self.dir / f"{sha256}.kernel"

    def _save(self, sha256: str, data: bytes) -> None:
        path = self._path(sha256)
        if path is None or path.exists():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        except OSError as exc:  # a full or read-only disk costs a refetch, not the round
            log.warning("kernel %s… not cached: %s", sha256[:12], exc)

    # -- lookups (the agent's worker) -----------------------------------------------------

    def cached(self, sha256: str) -> KernelFile | None:
        """The kernel from memory or from the disk cache (verified again), else None."""
        with self._cond:
            if sha256 in self._kernels:
                return self._kernels[sha256]
        path = self._path(sha256)
        if path is None or not path.exists():
            return None
        try:
            data = path.read_bytes()
            kernel = open_kernel(data, self.fleet, sha256)
        except (OSError, TernError) as exc:
            log.warning("kernel cache %s is not valid (%s); dropping it", path, exc)
            path.unlink(missing_ok=True)
            return None
        with self._cond:
            self._kernels[sha256] = kernel
        return kernel

    def wait(self, sha256: str, timeout: float) -> KernelFile:
        """The kernel once it is here; KernelRefused if it failed verification or is late."""
        kernel = self.cached(sha256)
        if kernel is not None:
            return kernel
        with self._cond:
            self._cond.wait_for(
                lambda: sha256 in self._kernels or sha256 in self._refused, max(timeout, 0.0)
            )
            if sha256 in self._kernels:
                return self._kernels[sha256]
            exc = self._refused.get(sha256)
        if exc is not None:
            raise KernelRefused(f"kernel {sha256[:12]}… refused: {exc}", f"kernel_{exc.reason}")
        raise KernelRefused(f"kernel {sha256[:12]}… did not arrive in time", "kernel_unavailable")

    def trainer(self, ref: KernelRef, timeout: float) -> WasmTrainer:
        """A WasmTrainer for the kernel `ref` names, under its fuel and memory budget."""
        if ref.abi != ABI_VERSION:
            raise KernelRefused(
                f"the schedule names a kernel of ABI {ref.abi}; this device runs {ABI_VERSION}",
                "kernel_abi",
            )
        key = (ref.sha256, ref.fuel, ref.memory)
        with self._cond:
            trainer = self._compiled.get(key)
        if trainer is not None:
            return trainer
        kernel = self.wait(ref.sha256, timeout)
        if kernel.abi != ABI_VERSION:
            raise KernelRefused(f"kernel of ABI {kernel.abi} (not {ABI_VERSION})", "kernel_abi")
        trainer = WasmTrainer(kernel.wasm, fuel=ref.fuel, memory_limit=ref.memory)
        with self._cond:
            self._compiled[key] = trainer
            for old in list(self._compiled)[:-_KEEP_COMPILED]:
                del self._compiled[old]
        return trainer
