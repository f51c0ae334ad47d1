"""The WebAssembly kernels against the numpy oracle, and the host's budgets and errors."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import wasmtime

from device.trainer import Trainer
from kernels import reference
from kernels.wasm import (
    ABI_VERSION,
    DEFAULT_FUEL,
    AbiMismatch,
    FuelExhausted,
    KernelError,
    KernelTrap,
    MemoryLimitExceeded,
    WasmTrainer,
    packaged_kernel,
)
from tern.messages import TrainConfig
from tern.spec import ModelSpec
from tests.helpers import unavailable

KERNELS = Path(__file__).resolve().parent.parent / "kernels"

LAYER_CONFIGS = [
    pytest.param([5, 3], id="logreg-5-3"),
    pytest.param([9, 2], id="logreg-binary"),
    pytest.param([7, 13, 5, 3], id="mlp-odd-widths"),
    pytest.param([40, 100, 100, 10], id="mlp-40-100-100-10"),
    pytest.param([6, 1, 4], id="mlp-width-one"),
    pytest.param([11, 18, 9, 6], id="mlp-every-tile-edge"),  # N % 8 = 2, 4 + 1, 4 + 2
]


@pytest.fixture(scope="module")
def trainer() -> WasmTrainer:
    return WasmTrainer()


def _problem(
    sizes: list[int], n: int, seed: int
) -> tuple[ModelSpec, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = reference.mlp_spec(sizes)
    weights = reference.init_weights(spec, rng)
    weights += rng.standard_normal(spec.size, dtype=np.float32) * np.float32(0.01)  # biases != 0
    x = rng.standard_normal((n, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], n)
    return spec, weights, x, y


def _module(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


def _fake_kernel(version: int, train_body: str = "i32.const 0") -> bytes:
    """A module with every ABI export; `tern_train_epoch` runs `train_body`."""
    return _module(
        f"""
        (module
          (memory (export "memory") 2)
          (func (export "tern_abi_version") (result i32) i32.const {version})
          (func (export "tern_reset"))
          (func (export "tern_alloc") (param i32) (result i32) i32.const 1024)
          (func (export "tern_loss_and_grad")
            (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32) unreachable)
          (func (export "tern_train_epoch")
            (param i32 i32 i32 i32 i32 i32 i32 i32 f32) (result i32) {train_body})
          (func (export "tern_evaluate")
            (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32) unreachable))
        """
    )


@pytest.mark.parametrize("sizes", LAYER_CONFIGS)
def test_wasm_loss_and_grad_match_reference(trainer: WasmTrainer, sizes: list[int]) -> None:
    spec, weights, x, y = _problem(sizes, n=37, seed=sum(sizes))

    want_loss, want_grad = reference.loss_and_grad(spec, weights, x, y)
    loss, grad = trainer.loss_and_grad(spec, weights, x, y)

    assert loss == pytest.approx(want_loss, rel=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sizes", LAYER_CONFIGS)
def test_wasm_epoch_matches_reference_with_the_same_shuffle(
    trainer: WasmTrainer, sizes: list[int]
) -> None:
    spec, weights, x, y = _problem(sizes, n=101, seed=len(sizes))
    config = TrainConfig(epochs=1, batch_size=16, lr=0.1)  # 101 % 16 != 0: a short last batch

    want = reference.train_local(spec, weights, x, y, config, np.random.default_rng(7))
    got = trainer.train(spec, weights, x, y, config, np.random.default_rng(7))

    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_wasm_several_epochs_track_reference(trainer: WasmTrainer) -> None:
    spec, weights, x, y = _problem([12, 16, 4], n=64, seed=3)
    config = TrainConfig(epochs=3, batch_size=10, lr=0.05)

    want = reference.train_local(spec, weights, x, y, config, np.random.default_rng(11))
    got = trainer.train(spec, weights, x, y, config, np.random.default_rng(11))

    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_wasm_train_leaves_input_weights_unchanged(trainer: WasmTrainer) -> None:
    spec, weights, x, y = _problem([4, 3], n=10, seed=0)
    before = weights.copy()

    trainer.train(spec, weights, x, y, TrainConfig(batch_size=4), np.random.default_rng(0))

    np.testing.assert_array_equal(weights, before)


@pytest.mark.parametrize("sizes", LAYER_CONFIGS)
def test_wasm_evaluate_matches_reference(trainer: WasmTrainer, sizes: list[int]) -> None:
    spec, weights, x, y = _problem(sizes, n=300, seed=5)  # more rows than one eval chunk

    want_loss, want_acc = reference.evaluate(spec, weights, x, y)
    loss, acc = trainer.evaluate(spec, weights, x, y)

    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert acc == want_acc


def test_wasm_trainer_satisfies_the_device_protocol() -> None:
    trainer: Trainer = WasmTrainer()

    assert trainer.name == "wasm"


def test_wasm_trainer_raises_fuel_exhausted_on_a_small_budget() -> None:
    spec, weights, x, y = _problem([40, 100, 100, 10], n=200, seed=1)
    trainer = WasmTrainer(fuel=100_000)

    with pytest.raises(FuelExhausted) as info:
        trainer.train(spec, weights, x, y, TrainConfig(), np.random.default_rng(0))
    assert info.value.fuel == 100_000


def test_wasm_trainer_raises_memory_limit_when_data_does_not_fit() -> None:
    spec, weights, x, y = _problem([40, 100, 100, 10], n=4000, seed=1)  # 640 KB of x
    trainer = WasmTrainer(memory_limit=256 << 10)

    with pytest.raises(MemoryLimitExceeded) as info:
        trainer.train(spec, weights, x, y, TrainConfig(), np.random.default_rng(0))
    assert info.value.limit == 256 << 10


def test_wasm_kernel_reports_memory_limit_when_its_scratch_does_not_fit() -> None:
    spec, weights, x, y = _problem([2, 4096, 2], n=64, seed=1)  # inputs ~100 KB, scratch ~3 MB
    trainer = WasmTrainer(memory_limit=1 << 20)

    with pytest.raises(MemoryLimitExceeded):
        trainer.loss_and_grad(spec, weights, x, y)


def test_wasm_trainer_rejects_memory_limit_below_the_kernels_initial_memory() -> None:
    spec, weights, x, y = _problem([4, 3], n=8, seed=1)
    trainer = WasmTrainer(memory_limit=4096)

    with pytest.raises(MemoryLimitExceeded) as info:
        trainer.train(spec, weights, x, y, TrainConfig(), np.random.default_rng(0))
    assert info.value.needed is not None and info.value.needed > 4096


def test_wasm_trainer_raises_kernel_trap_when_the_kernel_traps() -> None:
    spec, weights, x, y = _problem([4, 3], n=8, seed=1)
    trainer = WasmTrainer(_fake_kernel(ABI_VERSION, train_body="unreachable"))

    with pytest.raises(KernelTrap):
        trainer.train(spec, weights, x, y, TrainConfig(), np.random.default_rng(0))


class BadOrder(np.random.Generator):
    """Shuffles 8 samples into indices that are all out of range: the kernel traps."""

    def permutation(self, x: object, axis: int = 0) -> np.ndarray:
        return np.full(8, 99, dtype=np.int64)


def test_real_kernel_traps_on_an_out_of_range_shuffle_index(trainer: WasmTrainer) -> None:
    spec, weights, x, y = _problem([4, 3], n=8, seed=1)

    with pytest.raises(KernelTrap):
        trainer.train(spec, weights, x, y, TrainConfig(), BadOrder(np.random.PCG64(0)))


def test_wasm_trainer_rejects_an_unknown_abi_version() -> None:
    spec, weights, x, y = _problem([4, 3], n=8, seed=1)
    trainer = WasmTrainer(_fake_kernel(999))

    with pytest.raises(AbiMismatch) as info:
        trainer.train(spec, weights, x, y, TrainConfig(), np.random.default_rng(0))
    assert info.value.found == 999


def test_wasm_trainer_rejects_a_module_without_the_abi() -> None:
    with pytest.raises(AbiMismatch):
        WasmTrainer(_module('(module (func (export "f")))'))


def test_kernel_errors_share_one_base() -> None:
    for cls in (KernelTrap, FuelExhausted, MemoryLimitExceeded, AbiMismatch):
        assert issubclass(cls, KernelError)


def test_packaged_kernel_is_the_committed_file() -> None:
    assert packaged_kernel() == (KERNELS / "mlp.wasm").read_bytes()


def test_committed_kernel_equals_a_fresh_build(tmp_path: Path) -> None:
    missing = [tool for tool in ("clang", "wasm-ld", "make") if shutil.which(tool) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed (CI installs clang and lld)")

    result = subprocess.run(
        ["make", "-C", str(KERNELS), "check", f"TMPDIR={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_wasm_trainer_reuses_its_instance_with_identical_results() -> None:
    small = _problem([7, 13, 5, 3], n=40, seed=2)
    large = _problem([40, 100, 100, 10], n=101, seed=3)  # more input bytes: a new block
    config = TrainConfig(batch_size=16, lr=0.1)
    reused = WasmTrainer()

    got = [
        reused.train(*problem, config, np.random.default_rng(5))
        for problem in (small, large, small, large)
    ]

    for problem, result in zip((small, large, small, large), got, strict=True):
        fresh = WasmTrainer().train(*problem, config, np.random.default_rng(5))
        np.testing.assert_array_equal(result, fresh)


def test_every_call_on_a_reused_instance_gets_the_full_fuel_budget() -> None:
    spec, weights, x, y = _problem([40, 100, 100, 10], n=64, seed=4)
    probe = WasmTrainer()
    probe.train(spec, weights, x, y, TrainConfig(), np.random.default_rng(0))
    assert probe._idle is not None
    used = DEFAULT_FUEL - probe._idle.store.get_fuel()
    trainer = WasmTrainer(fuel=used + used // 10)  # enough for one call, not for two

    results = [
        trainer.train(spec, weights, x, y, TrainConfig(), np.random.default_rng(0))
        for _ in range(3)
    ]

    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_instance_is_replaced_after_fuel_exhaustion_and_next_call_succeeds() -> None:
    small = _problem([4, 3], n=8, seed=1)
    large = _problem([40, 100, 100, 10], n=200, seed=1)
    trainer = WasmTrainer(fuel=200_000)
    trainer.train(*small, TrainConfig(), np.random.default_rng(0))

    with pytest.raises(FuelExhausted):
        trainer.train(*large, TrainConfig(), np.random.default_rng(0))
    got = trainer.train(*small, TrainConfig(), np.random.default_rng(0))

    want = reference.train_local(*small, TrainConfig(), np.random.default_rng(0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_instance_is_replaced_after_a_trap_and_next_call_succeeds(trainer: WasmTrainer) -> None:
    spec, weights, x, y = _problem([4, 3], n=8, seed=1)

    with pytest.raises(KernelTrap):
        trainer.train(spec, weights, x, y, TrainConfig(), BadOrder(np.random.PCG64(0)))
    got = trainer.train(spec, weights, x, y, TrainConfig(), np.random.default_rng(0))

    want = reference.train_local(spec, weights, x, y, TrainConfig(), np.random.default_rng(0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unmetered_trainer_trains_exactly_as_the_metered_one() -> None:
    spec, weights, x, y = _problem([11, 18, 9, 6], n=50, seed=6)
    config = TrainConfig(batch_size=8)

    metered = WasmTrainer().train(spec, weights, x, y, config, np.random.default_rng(1))
    unmetered = WasmTrainer(fuel=None).train(spec, weights, x, y, config, np.random.default_rng(1))

    np.testing.assert_array_equal(unmetered, metered)


def test_wasm_trainer_serialises_calls_from_two_threads() -> None:
    spec, weights, x, y = _problem([12, 16, 4], n=64, seed=7)
    trainer = WasmTrainer()
    want = trainer.train(spec, weights, x, y, TrainConfig(), np.random.default_rng(2))
    results: list[np.ndarray] = []

    def work() -> None:
        for _ in range(5):
            results.append(
                trainer.train(spec, weights, x, y, TrainConfig(), np.random.default_rng(2))
            )

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.0)

    assert len(results) == 10
    for result in results:
        np.testing.assert_array_equal(result, want)
