"""The coordinator's state directory: the newest model versions and every closed round.

Layout::

    lock              held (flock) by the one process that uses the directory
    run.json          {"run": R}: this state's run number (topics.md "Freshness")
    models/v{N}.npy   the flat float32 weights of model version N
    models/m{N}.npy   the server momentum buffer that came with it
    rounds/{r}.json   the record of closed round r (ok or failed)

Every file is written to a temporary name in the same directory, flushed, and renamed,
so a crash leaves the old file or the new one, never half of one. A round record is
written last: it is the commit point, and what `latest()` resumes from. A model that
is not finite is never written, and never resumed from.

Retention: only the newest `keep_models` versions stay (each with its momentum), counted
back from the version the last round record names, and pruned only after that record is
written, so the version `latest()` resumes from is never deleted and older ones remain
to roll back to. Round records (about 1 KB each) are all kept: they are the run's history.

One process at a time: a second process opening the directory (a second coordinator)
gets StoreError. StateStores of one process share the lock (a tool or a test reads the
directory while its coordinator runs); it is released when the last of them is closed
or collected, and by the OS when the process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from broker.lifecycle import write_atomic
from coordinator.config import CoordinatorError
from tern.rounds.record import RoundRecord  # re-exported: the record the store keeps

__all__ = ["DEFAULT_KEEP_MODELS", "RoundRecord", "Snapshot", "StateStore", "StoreError"]

F32Array = npt.NDArray[np.float32]

log = logging.getLogger(__name__)

DEFAULT_KEEP_MODELS = 5
# v{N}: weights; m{N}: FedAvg's momentum; s{N}-{name}: any other server-state buffer
_MODEL_FILE = re.compile(
    r"([vm])(0|[1-9][0-9]{0,18})\.npy|(s)(0|[1-9][0-9]{0,18})-[a-z0-9_]{1,32}\.npy"
)
_LEFTOVER = re.compile(r"\..+\.tmp")  # write_atomic's temporary names, after a crash


class StoreError(CoordinatorError):
    """The state directory holds something unreadable or inconsistent."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Where to resume: the last closed round (0: none) and the model it left."""

    last_round: int
    model_version: int
    weights: F32Array
    buffers: Mapping[str, F32Array] = field(default_factory=dict)  # the server state

    @property
    def momentum(self) -> F32Array:
        """FedAvg's momentum buffer; zeros when the strategy has none."""
        found = self.buffers.get("momentum")
        return np.zeros_like(self.weights) if found is None else found


def _buffer_file(version: int, name: str) -> str:
    return f"m{version}.npy" if name == "momentum" else f"s{version}-{name}.npy"


def _npy(a: F32Array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class _Held:
    """One process's flock on one lock file, shared by that process's StateStores."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.holders = 0


_locks: dict[tuple[int, int], _Held] = {}  # (device, inode) of a lock file -> its hold
_locks_guard = threading.Lock()


def _lock(root: Path) -> tuple[tuple[int, int], bool]:
    """Take (or share) this process's lock on `root`: its key, and whether this is the
    only holder in the process. StoreError if another process has it."""
    path = root / "lock"
    with _locks_guard:
        try:
            fh = path.open("a+b")  # created if missing, never truncated before it is ours
        except OSError as exc:
            raise StoreError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        try:
            stat = os.fstat(fh.fileno())
            key = (stat.st_dev, stat.st_ino)
            held = _locks.get(key)
            if held is None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fh.seek(0)
                fh.truncate()
                fh.write(f"{os.getpid()}\n".encode())
                fh.flush()
                held = _locks[key] = _Held(fh)
            else:
                fh.close()  # a second description: closing it leaves the flock alone
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read(24).strip()
            fh.close()
            who = f" (pid {pid.decode()})" if pid.isdigit() else ""
            raise StoreError(
                f"{root} is in use: another coordinator{who} holds it; one state directory"
                " serves one coordinator"
            ) from None
        except OSError as exc:
            fh.close()
            raise StoreError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        held.holders += 1
        return key, held.holders == 1


def _unlock(key: tuple[int, int]) -> None:
    with _locks_guard:
        held = _locks.get(key)
        if held is None:
            return
        held.holders -= 1
        if held.holders == 0:
            del _locks[key]
            held.fh.close()  # releases the flock


class StateStore:
    """Reads and writes one coordinator's state directory; see the module for its rules.

    `keep_models`: model versions kept (>= 1), the newest; older ones are deleted once a
    newer round record is written. close() gives up the directory's lock.
    """

    def __init__(self, root: Path, *, keep_models: int = DEFAULT_KEEP_MODELS) -> None:
        if isinstance(keep_models, bool) or not isinstance(keep_models, int) or keep_models < 1:
            raise StoreError(f"keep_models must be an integer >= 1, got {keep_models!r}")
        self.root = Path(root)
        self.keep_models = keep_models
        self.models = self.root / "models"
        self.rounds = self.root / "rounds"
        try:
            self.models.mkdir(parents=True, exist_ok=True)
            self.rounds.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot use {self.root} as a state directory: {exc}") from exc
        key, alone = _lock(self.root)
        self._release: Callable[[], object] = weakref.finalize(self, _unlock, key)
        if alone:  # no other process, and no other store of this one: nobody is mid-write
            self._remove_leftovers()

    def close(self) -> None:
        """Give up the lock (the last StateStore of this process releases it). Idempotent."""
        self._release()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, clock: Callable[[], float]) -> int:
        """This state's run number: made on first use (milliseconds of `clock`, so a
        later fresh state directory gets a higher one) and kept in ``run.json``."""
        path = self.root / "run.json"
        if path.exists():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                run = doc["run"]
                if not isinstance(run, int) or isinstance(run, bool) or not 0 < run < 2**64:
                    raise ValueError("run is not an integer in (0, 2**64)")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"cannot read {path}: {exc!r}") from exc
            return run
        run = max(1, int(clock() * 1000))
        write_atomic(path, json.dumps({"run": run}).encode())
        return run

    def save_model(self, version: int, weights: F32Array, momentum: F32Array) -> None:
        """Save a model with FedAvg's state (its momentum buffer)."""
        self.save_state(version, weights, {"momentum": momentum})

    def save_state(self, version: int, weights: F32Array, buffers: Mapping[str, F32Array]) -> None:
        """Save model `version` with the server strategy's state buffers (by name)."""
        arrays = [weights, *buffers.values()]
        if not all(np.isfinite(a).all() for a in arrays):
            raise StoreError(f"model v{version} is not finite: not saved")
        # the state first: a model file implies its state is already there
        for name, buffer in sorted(buffers.items()):
            write_atomic(self.models / _buffer_file(version, name), _npy(buffer))
        write_atomic(self.models / f"v{version}.npy", _npy(weights))

    def load_model(self, version: int, size: int) -> tuple[F32Array, F32Array]:
        """Model `version` and FedAvg's momentum buffer."""
        weights, buffers = self.load_state(version, size, ("momentum",))
        return weights, buffers["momentum"]

    def load_state(
        self, version: int, size: int, names: Sequence[str]
    ) -> tuple[F32Array, dict[str, F32Array]]:
        """Model `version` and the state buffers `names` (the strategy's) saved with it."""
        files = [f"v{version}.npy", *(_buffer_file(version, n) for n in names)]
        out = []
        for name in files:
            path = self.models / name
            try:
                a = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise StoreError(f"cannot read {path}: {exc}") from exc
            if a.dtype != np.float32 or a.shape != (size,):
                raise StoreError(f"{path} holds {a.dtype} {a.shape}, the spec needs ({size},)")
            if not np.isfinite(a).all():
                raise StoreError(f"{path} holds NaN or infinity: this state is not resumed")
            out.append(a)
        return out[0], dict(zip(names, out[1:], strict=True))

    def save_round(self, record: RoundRecord) -> None:
        """Write `record` (the commit point of its round), then prune old model versions."""
        write_atomic(self.rounds / f"{record.round}.json", record.to_json().encode())
        try:
            self._prune(record.model_version)
        except OSError as exc:  # the round is committed: a file left over costs only space
            log.warning("state %s: old models not pruned: %s", self.root, exc)

    def model_versions(self) -> list[int]:
        """The versions whose weights are on disk, oldest first."""
        found = (_MODEL_FILE.fullmatch(p.name) for p in self.models.iterdir())
        return sorted(int(m[2]) for m in found if m is not None and m[1] == "v")

    def _prune(self, committed: int) -> None:
        """Delete the versions older than the newest `keep_models` up to `committed` (the
        version the newest record names). Newer ones (a model saved just before a crash)
        are left: the next round writes them again."""
        cutoff = committed - self.keep_models  # this version and older ones go
        doomed = []
        for path in self.models.iterdir():
            found = _MODEL_FILE.fullmatch(path.name)
            if found is None:
                continue
            kind, version = (found[1], found[2]) if found[1] else (found[3], found[4])
            if int(version) <= cutoff:
                doomed.append((int(version), kind != "v", path))
        # weights before momentum: a model file still implies its momentum file
        for _, _, path in sorted(doomed):
            path.unlink(missing_ok=True)

    def _remove_leftovers(self) -> None:
        """Temporary files a crash left mid-write (write_atomic cleans up after errors)."""
        for directory in (self.root, self.models, self.rounds):
            for path in directory.iterdir():
                if _LEFTOVER.fullmatch(path.name) and path.is_file():
                    path.unlink(missing_ok=True)

    def load_round(self, round: int) -> RoundRecord:
        path = self.rounds / f"{round}.json"
        try:
            return RoundRecord.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise StoreError(f"cannot read {path}: {exc}"[:400]) from exc

    def round_numbers(self) -> list[int]:
        return sorted(int(p.stem) for p in self.rounds.glob("*.json") if p.stem.isdigit())

    def latest(
        self, size: int, names: Sequence[str] = ("momentum",), *, fresh: Sequence[str] = ()
    ) -> Snapshot | None:
        """The state after the last closed round, with the server-state buffers `names`;
        None for an empty directory. A buffer named in `fresh` that this state was saved
        without (a state from before it existed) starts at zeros."""
        rounds = self.round_numbers()
        last, version = (0, 0)
        if rounds:
            record = self.load_round(rounds[-1])
            last, version = record.round, record.model_version
        elif not (self.models / "v0.npy").exists():
            return None
        absent = [n for n in names if n in fresh
                  and not (self.models / _buffer_file(version, n)).exists()]  # fmt: skip
        kept = [n for n in names if n not in absent]
        weights, buffers = self.load_state(version, size, kept)
        buffers.update({n: np.zeros(size, dtype=np.float32) for n in absent})
        return Snapshot(last, version, weights, buffers)
