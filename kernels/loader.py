"""Load a WebAssembly training kernel, check its ABI (kernels/README.md), and call into it.

`load_kernel` compiles a module and checks what it imports and exports; a `Session` is one
instance of it in its own store, under the caller's fuel and memory budget, with every
export's type checked against the ABI before the first call. Every failure surfaces as a
`KernelError` subclass. `kernels.wasm.WasmTrainer` trains through a Session, and
`kernels.wasm` re-exports this module's public names.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import numpy.typing as npt
import wasmtime

from kernels.calls import Export, Signature, signature_of

__all__ = [
    "ABI_VERSION",
    "DEFAULT_FUEL",
    "DEFAULT_MEMORY_LIMIT",
    "AbiMismatch",
    "FuelExhausted",
    "Kernel",
    "KernelError",
    "KernelTrap",
    "MemoryLimitExceeded",
    "Session",
    "load_kernel",
    "packaged_kernel",
]

ABI_VERSION = 1
DEFAULT_FUEL = 20_000_000_000  # per call; ~420 epochs of 40-100-100-10 on 400 samples (47M each)
DEFAULT_MEMORY_LIMIT = 64 << 20  # bytes of linear memory

_OK = 0
_ENOMEM = 1
_I32 = ("i32",)
_SIGNATURES = {  # ABI 1's functions (kernels/README.md); the module also exports "memory"
    "tern_abi_version": Signature((), _I32),
    "tern_reset": Signature((), ()),
    "tern_alloc": Signature(_I32, _I32),
    "tern_loss_and_grad": Signature(_I32 * 8, _I32),
    "tern_train_epoch": Signature(_I32 * 8 + ("f32",), _I32),
    "tern_evaluate": Signature(_I32 * 8, _I32),
}
_EXPORTS = ("memory", *_SIGNATURES)


class KernelError(Exception):
    """A kernel could not run to completion; the round goes on without this update."""


class KernelTrap(KernelError):
    """The kernel trapped (out-of-bounds access, unreachable, invalid argument)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class FuelExhausted(KernelError):
    """The kernel used up the fuel the caller allowed."""

    def __init__(self, fuel: int) -> None:
        super().__init__(f"kernel exhausted its fuel budget of {fuel}")
        self.fuel = fuel


class MemoryLimitExceeded(KernelError):
    """The kernel needed more linear memory than the caller allowed."""

    def __init__(self, limit: int, needed: int | None = None) -> None:
        wanted = "" if needed is None else f" (needs at least {needed})"
        super().__init__(f"kernel memory limit of {limit} bytes exceeded{wanted}")
        self.limit = limit
        self.needed = needed


class AbiMismatch(KernelError):
    """The module is not a tern kernel of the ABI version this host speaks."""

    def __init__(self, message: str, found: int | None = None) -> None:
        super().__init__(message)
        self.found = found


def packaged_kernel() -> bytes:
    """The committed `kernels/mlp.wasm`."""
    return resources.files("kernels").joinpath("mlp.wasm").read_bytes()


@dataclass(frozen=True, slots=True)
class Kernel:
    """A compiled kernel module and the engine it was compiled for (`metered`: the engine
    counts fuel, so every call needs a budget)."""

    engine: wasmtime.Engine
    module: wasmtime.Module
    metered: bool = True


def load_kernel(wasm: bytes, *, consume_fuel: bool = True) -> Kernel:
    """Compile `wasm` and check it exports the tern ABI; AbiMismatch if it does not.

    `consume_fuel=False` compiles without fuel metering (for measuring what metering
    costs): such a kernel runs unbounded in time, so only `WasmTrainer(fuel=None)` uses it.
    """
    config = wasmtime.Config()
    config.consume_fuel = consume_fuel
    engine = wasmtime.Engine(config)
    try:
        module = wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        raise AbiMismatch(f"not a valid WebAssembly module: {exc}") from exc
    if module.imports:
        raise AbiMismatch(f"a kernel imports nothing, this one imports {len(module.imports)}")
    exported = {e.name for e in module.exports}
    if "tern_abi_version" not in exported:
        raise AbiMismatch("module does not export tern_abi_version")
    return Kernel(engine, module, consume_fuel)


def _initial_memory(module: wasmtime.Module) -> int:
    """Bytes of linear memory the module asks for at instantiation."""
    for export in module.exports:
        if isinstance(export.type, wasmtime.MemoryType):
            return int(export.type.limits.min) * 65536
    return 0


class Session:
    """One instance in its own store under the caller's memory limit, reused for
    consecutive calls; `begin` refills the fuel before each call.

    The host's inputs live in one arena block at the bottom of the arena (the kernel's
    scratch goes above it and is freed by every kernel call); a call whose inputs fit
    in the block writes over it, a larger one frees the arena and allocates afresh.
    Each call into the instance costs more host time than copying a few kilobytes, and
    the copies go straight between numpy arrays and linear memory."""

    def __init__(self, kernel: Kernel, fuel: int | None, memory_limit: int) -> None:
        self.fuel = fuel
        self.memory_limit = memory_limit
        self.store = wasmtime.Store(kernel.engine)
        self.store.set_limits(memory_size=memory_limit)
        if fuel is not None:
            self.store.set_fuel(fuel)
        needed = _initial_memory(kernel.module)
        if needed > memory_limit:
            raise MemoryLimitExceeded(memory_limit, needed)
        try:
            instance = wasmtime.Instance(self.store, kernel.module, [])
        except wasmtime.Trap as exc:
            raise self._translate(exc) from exc
        except wasmtime.WasmtimeError as exc:
            raise AbiMismatch(f"kernel failed to instantiate: {exc}") from exc
        exports = instance.exports(self.store)
        probe = exports.get("tern_abi_version")
        want = _SIGNATURES["tern_abi_version"]
        if not isinstance(probe, wasmtime.Func) or signature_of(probe, self.store) != want:
            raise AbiMismatch(f"kernel export tern_abi_version is not a function {want}")
        version = self._call_raw(probe)
        if version != ABI_VERSION:
            raise AbiMismatch(
                f"kernel speaks ABI version {version}, this host speaks {ABI_VERSION}",
                found=int(version),
            )
        missing = [name for name in _EXPORTS if name not in exports]
        if missing:
            raise AbiMismatch(f"kernel of ABI {ABI_VERSION} lacks exports {missing}")
        memory = exports["memory"]
        if not isinstance(memory, wasmtime.Memory):
            raise AbiMismatch("kernel export 'memory' is not a memory")
        self.memory = memory
        self.exports: dict[str, Export] = {}
        for name, expected in _SIGNATURES.items():
            func = exports[name]
            found = signature_of(func, self.store) if isinstance(func, wasmtime.Func) else None
            if found != expected or not isinstance(func, wasmtime.Func):
                raise AbiMismatch(
                    f"kernel export {name} has type {found or 'of a non-function'}, "
                    f"ABI {ABI_VERSION} needs {expected}"
                )
            self.exports[name] = Export(self.store, func, expected)
        self._block = 0  # address of the inputs' block; 0: none
        self._capacity = 0

    def begin(self) -> None:
        """Start a call with the full fuel budget."""
        if self.fuel is not None:
            self.store.set_fuel(self.fuel)

    def _translate(self, exc: Exception) -> KernelError:
        if isinstance(exc, wasmtime.Trap) and exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            return FuelExhausted(self.fuel or 0)
        code = exc.trap_code.name if isinstance(exc, wasmtime.Trap) and exc.trap_code else None
        return KernelTrap(f"kernel trapped: {exc}", code)

    def _call_raw(self, func: wasmtime.Func, *args: Any) -> Any:
        try:
            return func(self.store, *args)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            raise self._translate(exc) from exc

    def call(self, name: str, *args: Any) -> Any:
        try:
            return self.exports[name](*args)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            raise self._translate(exc) from exc

    def run(self, name: str, *args: Any) -> None:
        """Call an export that returns a status; MemoryLimitExceeded or KernelTrap unless OK."""
        status = int(self.call(name, *args))
        if status == _ENOMEM:
            raise MemoryLimitExceeded(self.memory_limit)
        if status != _OK:
            raise KernelTrap(f"{name} returned unknown status {status}")

    def _span(self, ptr: int, size: int) -> npt.NDArray[np.uint8]:
        """Bytes [ptr, ptr + size) of linear memory as a uint8 array, valid only until
        the memory grows (so every use takes a fresh one); KernelTrap if they lie
        outside it (a block the kernel handed out must lie inside)."""
        length = self.memory.data_len(self.store)
        if ptr < 0 or size < 0 or ptr + size > length:
            raise KernelTrap(f"bytes [{ptr}, {ptr + size}) lie outside the kernel's {length}")
        memory = np.ctypeslib.as_array(self.memory.data_ptr(self.store), shape=(length,))
        return memory[ptr : ptr + size]

    def put(self, *arrays: npt.NDArray[Any]) -> list[int]:
        """Copy `arrays` (C order) into the inputs' block; their 16-byte aligned addresses."""
        blobs = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
        offsets: list[int] = []
        total = 0
        for blob in blobs:
            offsets.append(total)
            total += (blob.size + 15) & ~15
        if total > self._capacity or self._block == 0:
            self._block = self._capacity = 0
            self.call("tern_reset")
            self._block = int(self.call("tern_alloc", max(total, 1)))
            if self._block == 0:
                raise MemoryLimitExceeded(self.memory_limit, total)
            self._capacity = total
        ptr = self._block
        block = self._span(ptr, total)
        for offset, blob in zip(offsets, blobs, strict=True):
            block[offset : offset + blob.size] = blob
        return [ptr + offset for offset in offsets]

    def write(self, ptr: int, array: npt.NDArray[Any]) -> None:
        blob = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._span(ptr, blob.size)[:] = blob

    def get(self, ptr: int, count: int, dtype: type[np.generic]) -> npt.NDArray[Any]:
        size = count * np.dtype(dtype).itemsize
        return self._span(ptr, size).view(dtype).copy()
