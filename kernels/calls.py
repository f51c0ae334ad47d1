"""Calls into a kernel's exports with their types checked once, not on every call.

`wasmtime.Func.__call__` asks the store for the function's type and converts each
argument through it on every call: about 7 us per argument on a 3 GHz core, so 75 us for
`tern_train_epoch`'s nine, some 5 % of a demo epoch. An `Export` checks the export's type
against the ABI once, when the instance is set up, and then fills wasmtime's C argument
array directly.

The direct path uses two internals of wasmtime-py (`wasmtime._ffi` and
`wasmtime._func.enter_wasm`), which it has kept across releases. Where they are missing
it falls back to the public call: the same results, only slower (`Export.fast` says
which path is in use, and a test pins it for the installed wasmtime).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import wasmtime

__all__ = ["Export", "Signature", "signature_of"]

try:  # the direct path; see the module docstring
    from wasmtime import _ffi
    from wasmtime._func import enter_wasm as _enter_wasm

    _VAL = _ffi.wasmtime_val_t
    _FUNC_CALL = _ffi.wasmtime_func_call
    _KINDS: dict[str, tuple[Any, str]] = {
        "i32": (_ffi.WASMTIME_I32, "i32"),
        "i64": (_ffi.WASMTIME_I64, "i64"),
        "f32": (_ffi.WASMTIME_F32, "f32"),
        "f64": (_ffi.WASMTIME_F64, "f64"),
    }
    _DIRECT = True
except (ImportError, AttributeError):  # pragma: no cover - depends on the wasmtime build
    _KINDS = {}
    _DIRECT = False


@dataclass(frozen=True, slots=True)
class Signature:
    """Parameter and result types of a function, as wasm names (`i32`, `f32`, ...)."""

    params: tuple[str, ...]
    results: tuple[str, ...]

    def __str__(self) -> str:
        return f"({', '.join(self.params)}) -> ({', '.join(self.results)})"


def signature_of(func: wasmtime.Func, store: wasmtime.Store) -> Signature:
    ty = func.type(store)
    return Signature(tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results))


class Export:
    """One exported function of a known signature, bound to its store.

    Calling it returns None, the single result, or a list of results, as
    `wasmtime.Func.__call__` does, and raises the same `wasmtime.Trap` or
    `wasmtime.WasmtimeError`. Arguments are not type-checked on the direct path: an i32
    argument is taken modulo 2**32, as the wasm value it becomes.
    """

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, signature: Signature) -> None:
        self._store = store
        self._func = func
        self.signature = signature
        types = signature.params + signature.results
        self.fast = _DIRECT and all(t in _KINDS for t in types)
        if self.fast:
            self._params = [_KINDS[t] for t in signature.params]
            self._results = [_KINDS[t][1] for t in signature.results]

    def __call__(self, *args: Any) -> Any:
        if not self.fast:
            return self._func(self._store, *args)
        return self._call_direct(args)

    def _call_direct(self, args: Sequence[Any]) -> Any:
        n = len(self._params)
        if len(args) != n:
            raise wasmtime.WasmtimeError(f"{n} parameters expected, {len(args)} given")
        params = (_VAL * max(n, 1))()
        for slot, (kind, field), value in zip(params, self._params, args, strict=False):
            slot.kind = kind
            setattr(slot.of, field, value)
        results = (_VAL * max(len(self._results), 1))()
        with _enter_wasm(self._store) as trap:
            error = _FUNC_CALL(
                self._store._context(),
                ctypes.byref(self._func._func),
                params,
                n,
                results,
                len(self._results),
                trap,
            )
            if error:
                raise wasmtime.WasmtimeError._from_ptr(error)
        values = [getattr(results[i].of, field) for i, field in enumerate(self._results)]
        if not values:
            return None
        return values[0] if len(values) == 1 else values
