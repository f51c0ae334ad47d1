"""Run the WebAssembly training kernels (kernels/mlp.c, ABI in kernels/README.md) on wasmtime.

The host owns everything a kernel must not: the shuffling Generator (it draws each
epoch's permutation exactly as `kernels.reference.train_local` does and passes the
indices in, so Wasm and numpy see identical minibatches), the fuel budget, and the
memory cap. Every failure surfaces as a `KernelError` subclass, which the device agent
catches per round.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import wasmtime

from kernels.calls import Export, Signature, signature_of
from tern.messages import TrainConfig
from tern.spec import ModelSpec

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
    "WasmTrainer",
    "load_kernel",
    "mlp_sizes",
    "packaged_kernel",
]

_T = TypeVar("_T")
F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.integer]

ABI_VERSION = 1
DEFAULT_FUEL = 20_000_000_000  # per call; ~420 epochs of 40-100-100-10 on 400 samples (47M each)
DEFAULT_MEMORY_LIMIT = 64 << 20  # bytes of linear memory

_OK = 0
_ENOMEM = 1
_EVAL_CHUNK = 256
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


def mlp_sizes(spec: ModelSpec) -> list[int]:
    """Layer widths, input first, of an MLP spec (w0, b0, w1, b1, ...)."""
    n = len(spec.tensors) // 2
    names = [t.name for t in spec.tensors]
    if n < 1 or names != [f"{p}{i}" for i in range(n) for p in "wb"]:
        raise ValueError("not an MLP spec: tensors must be w0, b0, w1, b1, ...")
    sizes = [spec.tensors[0].shape[0]]
    for i in range(n):
        w, b = spec.tensors[2 * i], spec.tensors[2 * i + 1]
        if len(w.shape) != 2 or w.shape[0] != sizes[-1] or b.shape != (w.shape[1],):
            raise ValueError(f"layer {i} shapes {w.shape}, {b.shape} do not chain")
        sizes.append(w.shape[1])
    return sizes


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


class _Session:
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


@dataclass(frozen=True, slots=True)
class _Inputs:
    sizes: int
    weights: int
    x: int
    y: int
    n: int


def _prepare(
    session: _Session,
    spec: ModelSpec,
    weights: F32Array,
    x: F32Array,
    y: IntArray,
    *extra: npt.NDArray[Any],
) -> tuple[int, _Inputs, list[int]]:
    """Check and copy in the model and data, plus `extra` buffers, in one block."""
    sizes = mlp_sizes(spec)
    w = np.asarray(weights, dtype=np.float32)
    if w.shape != (spec.size,):
        raise ValueError(f"weights have shape {w.shape}, spec needs ({spec.size},)")
    xs = np.asarray(x, dtype=np.float32)
    ys = np.asarray(y)
    if xs.ndim != 2 or xs.shape[1] != sizes[0] or xs.shape[0] < 1:
        raise ValueError(f"x has shape {xs.shape}, model needs (n >= 1, {sizes[0]})")
    if ys.shape != (xs.shape[0],):
        raise ValueError(f"y has shape {ys.shape}, x has {xs.shape[0]} rows")
    if ys.size and (ys.min() < 0 or ys.max() >= sizes[-1]):
        raise ValueError(f"labels must lie in [0, {sizes[-1]})")
    ptrs = session.put(np.asarray(sizes, dtype=np.int32), w, xs, ys.astype(np.int32), *extra)
    inputs = _Inputs(sizes=ptrs[0], weights=ptrs[1], x=ptrs[2], y=ptrs[3], n=xs.shape[0])
    return len(sizes) - 1, inputs, ptrs[4:]


class WasmTrainer:
    """Local training in the WebAssembly kernel, under a fuel and a memory budget.

    Same contract as `device.trainer.NumpyTrainer` and the same result to float32
    rounding: the host draws each epoch's order from `rng` exactly as the reference does.

    Consecutive calls reuse one wasmtime instance (creating a store and an instance costs
    more than training a small model on a few hundred samples); each call still starts
    with an empty arena and exactly `fuel` fuel. A call that fails for any reason drops the
    instance, since its state after a trap is unknown, and the next call builds a new one.
    Calls on one trainer are serialised by a lock. `fuel=None` runs without fuel metering
    (the kernel is compiled without it): unbounded time, for benchmarks only.
    """

    name = "wasm"

    def __init__(
        self,
        kernel: bytes | None = None,
        *,
        fuel: int | None = DEFAULT_FUEL,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
    ) -> None:
        if (fuel is not None and fuel < 1) or memory_limit < 1:
            raise ValueError("fuel and memory_limit must be positive")
        self.fuel = fuel
        self.memory_limit = memory_limit
        wasm = packaged_kernel() if kernel is None else kernel
        self.kernel = load_kernel(wasm, consume_fuel=fuel is not None)
        self._lock = threading.Lock()
        self._idle: _Session | None = None  # the instance between successful calls

    def _session(self) -> _Session:
        """The idle instance (or a new one), taken for one call and reset for it; only a
        call that succeeds hands it back (`_release`). Called with the lock held."""
        session, self._idle = self._idle, None
        if session is None:
            session = _Session(self.kernel, self.fuel, self.memory_limit)
        session.begin()
        return session

    def _release(self, session: _Session) -> None:
        self._idle = session

    def _call(self, method: Callable[..., _T], *args: Any) -> _T:
        """`method(session, *args)` on the idle instance, one caller at a time; a failure
        leaves no instance behind, so the next call starts from a fresh one."""
        with self._lock:
            session = self._session()
            out = method(session, *args)
            self._release(session)
        return out

    def train(
        self,
        spec: ModelSpec,
        weights: F32Array,
        x: F32Array,
        y: IntArray,
        config: TrainConfig,
        rng: np.random.Generator,
    ) -> F32Array:
        """New flat float32 weights after local training; `weights` is left unchanged."""
        return self._call(self._train, spec, weights, x, y, config, rng)

    def _train(
        self,
        session: _Session,
        spec: ModelSpec,
        weights: F32Array,
        x: F32Array,
        y: IntArray,
        config: TrainConfig,
        rng: np.random.Generator,
    ) -> F32Array:
        order = np.zeros(np.shape(x)[0] if np.ndim(x) else 0, dtype=np.int32)
        nl, inp, (order_ptr,) = _prepare(session, spec, weights, x, y, order)
        lr = float(np.float32(config.lr))
        for _ in range(config.epochs):
            order = rng.permutation(inp.n).astype(np.int32)
            session.write(order_ptr, order)
            session.run(
                "tern_train_epoch",
                nl,
                inp.sizes,
                inp.weights,
                inp.x,
                inp.y,
                order_ptr,
                inp.n,
                config.batch_size,
                lr,
            )
        out: F32Array = session.get(inp.weights, spec.size, np.float32)
        return out

    def loss_and_grad(
        self, spec: ModelSpec, weights: F32Array, x: F32Array, y: IntArray
    ) -> tuple[float, F32Array]:
        """Mean cross-entropy over all of x and its flat gradient (for testing the kernel)."""
        return self._call(self._loss_and_grad, spec, weights, x, y)

    def _loss_and_grad(
        self, session: _Session, spec: ModelSpec, weights: F32Array, x: F32Array, y: IntArray
    ) -> tuple[float, F32Array]:
        nl, inp, (grad_ptr, loss_ptr) = _prepare(
            session, spec, weights, x, y, np.zeros(spec.size, np.float32), np.zeros(1, np.float64)
        )
        session.run(
            "tern_loss_and_grad",
            nl,
            inp.sizes,
            inp.weights,
            inp.x,
            inp.y,
            inp.n,
            grad_ptr,
            loss_ptr,
        )
        grad: F32Array = session.get(grad_ptr, spec.size, np.float32)
        return float(session.get(loss_ptr, 1, np.float64)[0]), grad

    def evaluate(
        self, spec: ModelSpec, weights: F32Array, x: F32Array, y: IntArray
    ) -> tuple[float, float]:
        """(mean cross-entropy, accuracy in [0, 1]), as `kernels.reference.evaluate`."""
        return self._call(self._evaluate, spec, weights, x, y)

    def _evaluate(
        self, session: _Session, spec: ModelSpec, weights: F32Array, x: F32Array, y: IntArray
    ) -> tuple[float, float]:
        nl, inp, (out_ptr,) = _prepare(session, spec, weights, x, y, np.zeros(2, np.float64))
        session.run(
            "tern_evaluate", nl, inp.sizes, inp.weights, inp.x, inp.y, inp.n, _EVAL_CHUNK, out_ptr
        )
        loss, accuracy = (float(v) for v in session.get(out_ptr, 2, np.float64))
        return loss, accuracy
