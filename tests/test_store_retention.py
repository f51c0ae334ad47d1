"""The coordinator's state directory stays bounded, resumable, and one coordinator's.

Retention: only the newest `keep_models` model versions stay, pruned after the round
record that commits a newer one, never the version `latest()` resumes from. The lock: a
second process on the same directory is refused; StateStores of one process share it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.__main__ import build_parser
from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.store import DEFAULT_KEEP_MODELS, RoundRecord, StateStore, StoreError

REPO = Path(__file__).resolve().parents[1]
SIZE = 7


def weights(version: int) -> npt.NDArray[np.float32]:
    return np.full(SIZE, float(version), dtype=np.float32)


def commit(store: StateStore, round: int, version: int, *, ok: bool = True) -> int:
    """What the coordinator does when round `round` closes on top of `version`: save the
    next model (if the round produced one), then its record. Returns the version after."""
    after = version + 1 if ok else version
    if ok:
        store.save_model(after, weights(after), weights(after) / np.float32(10))
    store.save_round(RoundRecord(round, ok, version, after, 1 if ok else 0, 0))
    return after


def files(store: StateStore) -> set[str]:
    return {p.name for p in store.models.iterdir()}


def test_fifty_versions_leave_the_newest_three_and_resume_from_the_last(tmp_path: Path) -> None:
    store = StateStore(tmp_path, keep_models=3)
    store.save_model(0, weights(0), weights(0))
    version = 0

    for r in range(1, 51):
        version = commit(store, r, version)
    store.close()

    assert files(store) == {f"{k}{n}.npy" for k in "vm" for n in (48, 49, 50)}
    assert store.round_numbers() == list(range(1, 51))  # every round record is kept
    with StateStore(tmp_path, keep_models=3) as again:
        snapshot = again.latest(SIZE)
    assert snapshot is not None
    assert (snapshot.last_round, snapshot.model_version) == (50, 50)
    assert snapshot.weights.tobytes() == weights(50).tobytes()
    assert snapshot.momentum.tobytes() == (weights(50) / np.float32(10)).tobytes()


def test_failed_rounds_prune_nothing_more(tmp_path: Path) -> None:
    store = StateStore(tmp_path, keep_models=2)
    store.save_model(0, weights(0), weights(0))
    version = commit(store, 1, 0)
    version = commit(store, 2, version)

    for r in range(3, 8):
        version = commit(store, r, version, ok=False)

    assert version == 2
    assert store.model_versions() == [1, 2]


def test_a_model_saved_just_before_a_crash_is_not_pruned_nor_resumed(tmp_path: Path) -> None:
    store = StateStore(tmp_path, keep_models=1)
    store.save_model(0, weights(0), weights(0))
    version = commit(store, 1, 0)
    store.save_model(version + 1, weights(99), weights(99))  # killed before rounds/2.json
    store.close()

    with StateStore(tmp_path, keep_models=1) as resumed:
        snapshot = resumed.latest(SIZE)
        assert snapshot is not None and snapshot.model_version == 1
        assert resumed.model_versions() == [1, 2]
        commit(resumed, 2, 1)  # the re-run round writes v2 again, then commits it

        assert resumed.model_versions() == [2]
        assert resumed.load_model(2, SIZE)[0].tobytes() == weights(2).tobytes()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    keep=st.integers(1, 4),
    steps=st.lists(st.sampled_from(["ok", "failed", "crash"]), min_size=1, max_size=25),
)
def test_the_latest_model_is_always_loadable(
    tmp_path_factory: pytest.TempPathFactory, keep: int, steps: list[str]
) -> None:
    root = tmp_path_factory.mktemp("state")
    store = StateStore(root, keep_models=keep)
    store.save_model(0, weights(0), weights(0))
    version, r = 0, 0

    for step in steps:
        if step == "crash":  # the next model is on disk, its round record is not
            store.save_model(version + 1, weights(-1), weights(-1))
            continue
        r += 1
        version = commit(store, r, version, ok=step == "ok")

        snapshot = StateStore(root, keep_models=keep).latest(SIZE)
        assert snapshot is not None and snapshot.model_version == version
        assert snapshot.weights.tobytes() == weights(version).tobytes()
        on_disk = store.model_versions()
        assert version in on_disk
        assert all(version - keep < v <= version + 1 for v in on_disk)
    store.close()


def test_temporary_files_left_by_a_crash_are_removed_when_the_directory_is_opened(
    tmp_path: Path,
) -> None:
    StateStore(tmp_path).close()
    leftover = tmp_path / "models" / ".v3.npy.abc123.tmp"
    leftover.write_bytes(b"half a model")
    kept = tmp_path / "models" / "notes.txt"
    kept.write_text("the operator's")

    StateStore(tmp_path).close()

    assert not leftover.exists() and kept.exists()


@pytest.mark.parametrize("keep", [0, -1, 1.5, True])
def test_keep_models_below_one_is_refused(tmp_path: Path, keep: object) -> None:
    with pytest.raises(StoreError, match="keep_models"):
        StateStore(tmp_path, keep_models=keep)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="keep_models"):
        CoordinatorConfig("mqtt://127.0.0.1:1", tmp_path, keep_models=keep)  # type: ignore[arg-type]


def test_the_keep_models_flag_reaches_the_configuration_and_defaults_to_the_store_s() -> None:
    required = ["--broker", "mqtt://b:1", "--fleet-file", "f", "--key", "k", "--state-dir", "s"]

    given_flag = build_parser().parse_args([*required, "--keep-models", "12"])
    default = build_parser().parse_args(required)

    assert given_flag.keep_models == 12
    assert (
        default.keep_models
        == DEFAULT_KEEP_MODELS
        == CoordinatorConfig("mqtt://b", Path()).keep_models
    )


def test_the_keep_models_flag_refuses_zero(capsys: pytest.CaptureFixture[str]) -> None:
    required = ["--broker", "mqtt://b:1", "--fleet-file", "f", "--key", "k", "--state-dir", "s"]

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*required, "--keep-models", "0"])

    assert exited.value.code == 2
    assert "--keep-models" in capsys.readouterr().err


# -- one process per state directory ---------------------------------------------------------


def open_elsewhere(root: Path) -> subprocess.CompletedProcess[str]:
    """Open `root` as a StateStore in another Python process."""
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from coordinator.store import StateStore, StoreError\n"
        "try:\n    StateStore(Path(sys.argv[1]))\nexcept StoreError as exc:\n"
        "    print(exc)\n    sys.exit(3)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_another_process_is_refused_until_the_store_is_closed(tmp_path: Path) -> None:
    store = StateStore(tmp_path)

    refused = open_elsewhere(tmp_path)
    store.close()
    allowed = open_elsewhere(tmp_path)

    assert refused.returncode == 3
    assert str(tmp_path) in refused.stdout and "another coordinator" in refused.stdout
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


def test_stores_of_one_process_share_the_lock_until_the_last_is_closed(tmp_path: Path) -> None:
    first, second = StateStore(tmp_path), StateStore(tmp_path)

    first.close()
    first.close()  # idempotent: it does not give up the second one's share
    still_held = open_elsewhere(tmp_path)
    second.close()

    assert still_held.returncode == 3
    assert open_elsewhere(tmp_path).returncode == 0
