"""Cohort aggregators: how a receiver turns its accepted contributions into one partial.

The seam between collecting a round (tern.collect: who may send what, checked at the
trust boundary) and folding it. An aggregator sees every accepted contribution of its
round at once, keyed by sender, so aggregators that need individual updates (robust
ones: median, trimmed mean, Krum) fit the same interface as the exact sum, and a
privacy step can wrap any of them. Each is pure and chosen by name from the round's
signed policy (tern.policy), so a receiver that does not know a name refuses the
round instead of folding it some other way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tern.aggregate import Accumulator, Partial
from tern.errors import TernError
from tern.messages import CheckedUpdate

__all__ = ["AGGREGATORS", "Aggregator", "ExactSum", "Folded", "UnknownAggregator", "aggregator_for"]


class UnknownAggregator(TernError):
    """The policy names an aggregator this component cannot run."""

    reason = "policy_unsupported"


@dataclass(frozen=True, slots=True)
class Folded:
    """An aggregator's result: the partial, and the contributions it left out, by why."""

    partial: Partial
    left_out: Mapping[str, str] = field(default_factory=dict)  # sender -> reason


class Aggregator(Protocol):
    """Folds one round's accepted contributions into a partial (sum, weight, count)."""

    @property
    def name(self) -> str: ...

    def fold(self, accepted: Mapping[str, CheckedUpdate], size: int) -> Folded:
        """Pure in `accepted` (not modified); the same inputs give the same bits."""
        ...


@dataclass(frozen=True, slots=True)
class ExactSum:
    """The weighted sum of every contribution, in ascending sender id (tern.aggregate).

    Bounded norms and weights keep every sum finite; should one still overflow, the
    contributions that make it so are left out (``overflow``) in sender order.
    """

    name: str = "sum"

    def fold(self, accepted: Mapping[str, CheckedUpdate], size: int) -> Folded:
        senders = sorted(accepted)
        # Decoding straight into one accumulator in sender order gives the same bits as
        # aggregate.fold_sorted over decoded partials, without a copy per sender.
        acc = Accumulator(size)
        with np.errstate(over="ignore", invalid="ignore"):
            for sender in senders:
                accepted[sender].add_to(acc)
        result = acc.result()
        if _finite(result):
            return Folded(result)
        result, left_out = Partial.zero(size), {}
        for sender in senders:
            trial = Accumulator(size)
            trial.add(result)
            with np.errstate(over="ignore", invalid="ignore"):
                accepted[sender].add_to(trial)
            if _finite(trial.result()):
                result = trial.result()
            else:
                left_out[sender] = "overflow"
        return Folded(result, left_out)


AGGREGATORS: Mapping[str, Aggregator] = {"sum": ExactSum()}


def aggregator_for(name: str) -> Aggregator:
    """The aggregator a policy names; UnknownAggregator when this build has none."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise UnknownAggregator(f"no aggregator named {name[:32]!r} here") from None


def _finite(p: Partial) -> bool:
    return bool(np.isfinite(p.weighted_sum).all()) and bool(np.isfinite(p.total_weight))
