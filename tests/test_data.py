"""`tern data mnist1d`: per-device files with disjoint samples, and a test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device.data import device_ids, main

ARGS = ["mnist1d", "--devices", "4", "--alpha", "0.5", "--seed", "3", "--samples", "1000"]


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def test_data_writes_one_file_per_device_and_a_test_set(written: Path) -> None:
    names = sorted(p.name for p in written.iterdir())
    assert names == ["dev-01.npz", "dev-02.npz", "dev-03.npz", "dev-04.npz", "test.npz"]
    test = load(written / "test.npz")
    assert test["x"].shape == (200, 40) and test["y"].shape == (200,)


def test_data_devices_hold_disjoint_samples_covering_the_training_set(written: Path) -> None:
    files = [load(written / f"{d}.npz") for d in device_ids(4)]
    indices = np.concatenate([f["index"] for f in files])
    assert np.array_equal(np.sort(indices), np.arange(800))
    for f in files:
        assert f["x"].dtype == np.float32 and f["y"].dtype == np.int64
        assert f["x"].shape == (f["y"].size, 40) and f["y"].size >= 10


def test_data_is_deterministic_for_a_seed(written: Path, tmp_path: Path) -> None:
    assert main([*ARGS, "--out", str(tmp_path)]) == 0
    for name in ("dev-01.npz", "dev-04.npz", "test.npz"):
        a, b = load(written / name), load(tmp_path / name)
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_data_with_another_seed_splits_differently(written: Path, tmp_path: Path) -> None:
    args = [a if a != "3" else "4" for a in ARGS]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert not np.array_equal(
        load(written / "dev-01.npz")["index"], load(tmp_path / "dev-01.npz")["index"]
    )


def test_data_refuses_more_devices_than_samples(tmp_path: Path) -> None:
    args = ["mnist1d", "--devices", "500", "--seed", "1", "--samples", "1000"]
    assert main([*args, "--out", str(tmp_path)]) == 2


def test_device_ids_sort_as_numbers() -> None:
    assert device_ids(3) == ["dev-01", "dev-02", "dev-03"]
    assert device_ids(100)[:2] == ["dev-001", "dev-002"]
