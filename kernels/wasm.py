"""Run the WebAssembly training kernels (kernels/mlp.c, ABI in kernels/README.md) on wasmtime.

The host owns everything a kernel must not: the shuffling Generator (it draws each
epoch's permutation exactly as `kernels.reference.train_local` does and passes the
indices in, so Wasm and numpy see identical minibatches), the fuel budget, and the
memory cap. Every failure surfaces as a `KernelError` subclass, which the device agent
catches per round. Loading a module, its ABI checks and the instance a trainer calls
into live in `kernels.loader`, whose public names this module re-exports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from kernels.loader import (
    ABI_VERSION,
    DEFAULT_FUEL,
    DEFAULT_MEMORY_LIMIT,
    AbiMismatch,
    FuelExhausted,
    Kernel,
    KernelError,
    KernelTrap,
    MemoryLimitExceeded,
    Session,
    load_kernel,
    packaged_kernel,
)
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

_EVAL_CHUNK = 256


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
class _Inputs:
    sizes: int
    weights: int
    x: int
    y: int
    n: int


def _prepare(
    session: Session,
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
        self._idle: Session | None = None  # the instance between successful calls

    def _session(self) -> Session:
        """The idle instance (or a new one), taken for one call and reset for it; only a
        call that succeeds hands it back (`_release`). Called with the lock held."""
        session, self._idle = self._idle, None
        if session is None:
            session = Session(self.kernel, self.fuel, self.memory_limit)
        session.begin()
        return session

    def _release(self, session: Session) -> None:
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
        session: Session,
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
        self, session: Session, spec: ModelSpec, weights: F32Array, x: F32Array, y: IntArray
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
        self, session: Session, spec: ModelSpec, weights: F32Array, x: F32Array, y: IntArray
    ) -> tuple[float, float]:
        nl, inp, (out_ptr,) = _prepare(session, spec, weights, x, y, np.zeros(2, np.float64))
        session.run(
            "tern_evaluate", nl, inp.sizes, inp.weights, inp.x, inp.y, inp.n, _EVAL_CHUNK, out_ptr
        )
        loss, accuracy = (float(v) for v in session.get(out_ptr, 2, np.float64))
        return loss, accuracy
