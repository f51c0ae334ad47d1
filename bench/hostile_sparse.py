"""The sparse ternary attack classes of bench.hostile (issue 13): a round whose devices send
sparse updates (`CodecName.SPARSE` at `DENSITY`), and updates whose sparse tensors claim
more entries than the density allows, another Rice parameter, a position past the end,
set padding bits, or a gap string longer than any valid one. Each is a device's sealed
update of about the size of a valid sparse one, refused by the receiver's strict decoder
(tern.sparse) with "invalid_sparse"; their baseline is a valid sparse update accepted.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from bench.hostile_classes import NORM, WEIGHT, AttackClass, Scenario
from tern.aggregate import Partial
from tern.codecs import CodecName, SparseTernaryCodec
from tern.messages import RoundSchedule, encode_update
from tern.sparse import max_count

__all__ = ["DENSITY", "RECEIVER", "SparseRound"]

DENSITY = 1 / 32
RECEIVER = "sparse"  # the Collector of a round on the sparse codec


class SparseRound:
    """The scenario's open round on the sparse codec, and its valid and hostile updates."""

    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.schedule: RoundSchedule = replace(
            scenario.schedule, codec=CodecName.SPARSE, density=DENSITY
        )
        self.honest = self.body(DENSITY)

    def body(self, density: float) -> dict[str, Any]:
        """A device's update body, its tensors keeping `density` of their entries."""
        s = self.s
        d = s.rng.standard_normal(s.spec.size).astype(np.float32)
        d = (d / np.linalg.norm(d) * NORM * WEIGHT).astype(np.float32)
        update, _ = encode_update(SparseTernaryCodec(density), s.spec, Partial(d, WEIGHT, 1))
        body: dict[str, Any] = update.to_body()
        return body

    def update(self, i: int, body: dict[str, Any] | None = None) -> bytes:
        return self.s.update(i, self.honest if body is None else body)

    def tensor0(self, **changes: Any) -> dict[str, Any]:
        """The honest body with its first (largest) tensor's fields changed."""
        tensors = [dict(t) for t in self.honest["tensors"]]
        tensors[0].update(changes)
        return {**self.honest, "tensors": tensors}

    def classes(self) -> list[AttackClass]:
        first = self.honest["tensors"][0]
        shape = self.s.spec.tensors[0].shape
        n = self.s.spec.tensors[0].size
        x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
        # the first tensor keeps one entry more than the density allows, the rest honest
        denser, _ = SparseTernaryCodec((max_count(DENSITY, n) + 1) / n).encode(x)
        over = {**self.honest, "tensors": [denser, *self.honest["tensors"][1:]]}
        # the first tensor's last position moved to n, one past the end
        _, decoded = SparseTernaryCodec(DENSITY).encode(x)
        positions = np.flatnonzero(decoded)
        signs = np.packbits(decoded.reshape(-1)[positions] < 0).tobytes()
        positions[-1] = n
        past = {"gaps": _gap_code(positions, first["rice"]), "signs": signs}
        gaps, signs = first["gaps"], first["signs"]
        changes: list[tuple[str, dict[str, Any]]] = [
            ("count past the density", over),
            ("Rice parameter 0", self.tensor0(rice=0)),
            ("Rice parameter 2**40", self.tensor0(rice=2**40)),
            ("position past the end", self.tensor0(**past)),
            ("padding bits set", self.tensor0(signs=signs[:-1] + bytes([signs[-1] | 1]))),
            ("gap string past its bound", self.tensor0(gaps=gaps + b"\x55" * 48)),
        ]
        return [self._attack(name, body) for name, body in changes]

    def _attack(self, name: str, body: dict[str, Any]) -> AttackClass:
        return AttackClass(f"sparse: {name}", RECEIVER, "invalid_sparse",
                           lambda i: self.update(i, body))  # fmt: skip


def _gap_code(positions: np.ndarray, r: int) -> bytes:
    """The `gaps` bytes of increasing `positions` (tern.sparse's layout), unchecked."""
    g = np.diff(positions, prepend=-1).astype(np.int64) - 1
    q = g >> r
    low = ((g[:, None] >> np.arange(r - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
    unary = np.zeros(int(q.sum()) + g.size, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 1
    return np.packbits(np.concatenate([low, unary])).tobytes()
