"""A round's stages: each with its own close time and its own minimum of survivors.

Today's plain rounds have one stage (``collect``). Protocols with several (secure
aggregation: keys, shares, masked inputs, unmasking) close one stage after another;
each stage closes when it is complete or at its time, and the round fails at the first
stage that ends with fewer survivors than its minimum. Pure: the caller owns time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tern.errors import TernError

__all__ = ["Stage", "StageError", "Stages"]


class StageError(TernError):
    """A stage plan that cannot run (times out of order, a negative minimum)."""

    reason = "bad_stages"


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    close_at: float  # on the machine's clock
    min_survivors: int = 1


class Stages:
    """The stages of one round, in order; `current` is the one open now."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        if not stages:
            raise StageError("a round has at least one stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise StageError(f"stage names repeat: {names}")
        for s in stages:
            if not math.isfinite(s.close_at) or s.min_survivors < 0:
                raise StageError(f"stage {s.name}: close time and minimum must be valid")
        times = [s.close_at for s in stages]
        if times != sorted(times):
            raise StageError("stages must close in order")
        self.plan = tuple(stages)
        self._index = 0
        self.survivors: dict[str, int] = {}  # closed stage -> how many went on
        self.failure = ""  # "<stage>: <why>" once a stage has failed

    @property
    def current(self) -> Stage | None:
        """The open stage; None once the last has closed or one has failed."""
        if self.failure or self._index >= len(self.plan):
            return None
        return self.plan[self._index]

    @property
    def done(self) -> bool:
        return self.current is None

    @property
    def succeeded(self) -> bool:
        return self._index >= len(self.plan) and not self.failure

    def close(self, survivors: int) -> bool:
        """Close the open stage with `survivors`; True when the round goes on (or is done
        with success), False when this stage had too few and the round failed."""
        stage = self.current
        if stage is None:
            raise StageError("no stage is open")
        self.survivors[stage.name] = survivors
        if survivors < stage.min_survivors:
            need = stage.min_survivors
            self.failure = f"{stage.name}: {survivors} survivors, at least {need} needed"
            return False
        self._index += 1
        return True
