"""The coordinator's state directory: every model version and every closed round.

Layout::

    run.json          {"run": R}: this state's run number (topics.md "Freshness")
    models/v{N}.npy   the flat float32 weights of model version N
    models/m{N}.npy   the server momentum buffer that came with it
    rounds/{r}.json   the record of closed round r (ok or failed)

Every file is written to a temporary name in the same directory, flushed, and renamed,
so a crash leaves the old file or the new one, never half of one. A round record is
written last: it is the commit point, and what `latest()` resumes from. A model that
is not finite is never written, and never resumed from.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from broker.lifecycle import write_atomic
from coordinator.config import CoordinatorError
from tern.reports import RoundMetrics

__all__ = ["RoundRecord", "Snapshot", "StateStore", "StoreError"]

F32Array = npt.NDArray[np.float32]


class StoreError(CoordinatorError):
    """The state directory holds something unreadable or inconsistent."""


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One closed round. `model_version` is the version the round ended with."""

    round: int
    ok: bool
    base_version: int
    model_version: int
    contributors: int
    dropped: int
    rejected: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)  # devices' reported failures
    bytes_up: int = 0
    bytes_down: int = 0
    accuracy: float | None = None
    loss: float | None = None
    round_seconds: float = 0.0
    participants: tuple[str, ...] | None = None
    expected: tuple[str, ...] = ()
    accepted: tuple[str, ...] = ()
    kernel: str = ""  # SHA-256 of the training kernel the round's schedule named

    def metrics(self, component: str) -> RoundMetrics:
        return RoundMetrics(
            component=component,
            round=self.round,
            model_version=self.model_version,
            contributors=self.contributors,
            dropped=self.dropped,
            rejected=dict(self.rejected),
            failed=dict(self.failed),
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            accuracy=self.accuracy,
            loss=self.loss,
            round_seconds=self.round_seconds,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> RoundRecord:
        try:
            v: dict[str, Any] = json.loads(text)
            participants = v.pop("participants")
            return cls(
                **{k: v[k] for k in v if k not in ("expected", "accepted")},
                participants=None if participants is None else tuple(participants),
                expected=tuple(v["expected"]),
                accepted=tuple(v["accepted"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"round record is not valid: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Where to resume: the last closed round (0: none) and the model it left."""

    last_round: int
    model_version: int
    weights: F32Array
    momentum: F32Array


def _npy(a: F32Array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class StateStore:
    """Reads and writes one coordinator's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.models = self.root / "models"
        self.rounds = self.root / "rounds"
        self.models.mkdir(parents=True, exist_ok=True)
        self.rounds.mkdir(parents=True, exist_ok=True)

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
        if not (np.isfinite(weights).all() and np.isfinite(momentum).all()):
            raise StoreError(f"model v{version} is not finite: not saved")
        # momentum first: a model file implies its momentum is already there
        write_atomic(self.models / f"m{version}.npy", _npy(momentum))
        write_atomic(self.models / f"v{version}.npy", _npy(weights))

    def load_model(self, version: int, size: int) -> tuple[F32Array, F32Array]:
        out = []
        for name in (f"v{version}.npy", f"m{version}.npy"):
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
        return out[0], out[1]

    def save_round(self, record: RoundRecord) -> None:
        write_atomic(self.rounds / f"{record.round}.json", record.to_json().encode())

    def load_round(self, round: int) -> RoundRecord:
        path = self.rounds / f"{round}.json"
        try:
            return RoundRecord.from_json(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc

    def round_numbers(self) -> list[int]:
        return sorted(int(p.stem) for p in self.rounds.glob("*.json") if p.stem.isdigit())

    def latest(self, size: int) -> Snapshot | None:
        """The state after the last closed round; None for an empty directory."""
        rounds = self.round_numbers()
        if rounds:
            record = self.load_round(rounds[-1])
            weights, momentum = self.load_model(record.model_version, size)
            return Snapshot(record.round, record.model_version, weights, momentum)
        if (self.models / "v0.npy").exists():
            weights, momentum = self.load_model(0, size)
            return Snapshot(0, 0, weights, momentum)
        return None
