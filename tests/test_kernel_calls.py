"""Typed calls into kernel exports (kernels/calls.py) and the ABI's signature check."""

from __future__ import annotations

import numpy as np
import pytest
import wasmtime

from kernels.calls import Export, Signature, signature_of
from kernels.reference import mlp_spec
from kernels.wasm import AbiMismatch, WasmTrainer
from tern.messages import TrainConfig

MIXED = """
(module
  (func (export "mix") (param i32 i64 f32 f64) (result f64)
    local.get 0 f64.convert_i32_s
    local.get 1 f64.convert_i64_s f64.add
    local.get 2 f64.promote_f32 f64.add
    local.get 3 f64.add)
  (func (export "pair") (param i32) (result i32 f32)
    local.get 0 i32.const 1 i32.add
    local.get 0 f32.convert_i32_s)
  (func (export "nothing"))
  (func (export "boom") (param i32) (result i32) unreachable)
  (func (export "negate") (param i32) (result i32) i32.const 0 local.get 0 i32.sub))
"""


Rig = tuple[wasmtime.Store, wasmtime.Instance]


@pytest.fixture()
def instance() -> Rig:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    module = wasmtime.Module(engine, bytes(wasmtime.wat2wasm(MIXED)))
    return store, wasmtime.Instance(store, module, [])


def _export(instance: Rig, name: str) -> Export:
    store, inst = instance
    func = inst.exports(store)[name]
    assert isinstance(func, wasmtime.Func)
    return Export(store, func, signature_of(func, store))


def _public(instance: Rig, name: str, *args: object) -> object:
    store, inst = instance
    func = inst.exports(store)[name]
    assert isinstance(func, wasmtime.Func)
    return func(store, *args)


def test_the_installed_wasmtime_takes_the_direct_path(instance: Rig) -> None:
    assert _export(instance, "mix").fast


def test_direct_calls_return_what_the_public_call_returns(instance: Rig) -> None:
    cases: list[tuple[str, tuple[object, ...]]] = [
        ("mix", (-7, 2**40, 0.25, 1e-3)),
        ("pair", (41,)),
        ("nothing", ()),
        ("negate", (5,)),
        ("negate", (-(2**31),)),
    ]
    for name, args in cases:
        assert _export(instance, name)(*args) == _public(instance, name, *args), name
    assert _export(instance, "pair")(41) == [42, 41.0]
    assert _export(instance, "nothing")() is None


def test_direct_calls_raise_the_traps_of_the_public_call(instance: Rig) -> None:
    with pytest.raises(wasmtime.Trap) as info:
        _export(instance, "boom")(1)
    assert info.value.trap_code == wasmtime.TrapCode.UNREACHABLE
    with pytest.raises(wasmtime.WasmtimeError, match="1 parameters expected, 2 given"):
        _export(instance, "boom")(1, 2)


def test_signatures_read_as_wasm_types(instance: Rig) -> None:
    sig = _export(instance, "mix").signature
    assert sig == Signature(("i32", "i64", "f32", "f64"), ("f64",))
    assert str(sig) == "(i32, i64, f32, f64) -> (f64)"


def _kernel_with(train_params: str) -> bytes:
    return bytes(
        wasmtime.wat2wasm(
            f"""
            (module
              (memory (export "memory") 2)
              (func (export "tern_abi_version") (result i32) i32.const 1)
              (func (export "tern_reset"))
              (func (export "tern_alloc") (param i32) (result i32) i32.const 1024)
              (func (export "tern_loss_and_grad")
                (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32) unreachable)
              (func (export "tern_train_epoch") (param {train_params}) (result i32) i32.const 0)
              (func (export "tern_evaluate")
                (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32) unreachable))
            """
        )
    )


def test_a_kernel_export_of_the_wrong_type_is_an_abi_mismatch() -> None:
    spec = mlp_spec([4, 3])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    weights = np.zeros(spec.size, np.float32)
    # lr as f64 instead of f32
    trainer = WasmTrainer(_kernel_with("i32 i32 i32 i32 i32 i32 i32 i32 f64"))

    with pytest.raises(AbiMismatch, match=r"tern_train_epoch has type .*f64.* needs .*f32"):
        trainer.train(spec, weights, x, y, TrainConfig(), rng)


def test_a_kernel_of_the_right_types_is_accepted() -> None:
    spec = mlp_spec([4, 3])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    weights = np.arange(spec.size, dtype=np.float32)
    trainer = WasmTrainer(_kernel_with("i32 i32 i32 i32 i32 i32 i32 i32 f32"))

    # the fake epoch leaves the weights as they were copied in
    np.testing.assert_array_equal(trainer.train(spec, weights, x, y, TrainConfig(), rng), weights)
