"""The coordinator's privacy options: secure aggregation in every cohort, differential
privacy with its budget, and the accountant that keeps it.

Both are per-fleet options the coordinator signs into every schedule (tern.secagg.terms,
tern.privacy.terms); off by default. The accountant (tern.privacy.ledger, the `privacy`
extra: dp-accounting) is built only when differential privacy is on, and rebuilt from
the round records of the state directory when a coordinator resumes, so a restart never
forgets what was spent.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tern.codecs import CodecName
from tern.errors import TernError
from tern.policy import Policy
from tern.privacy.terms import DpTerms, Noise
from tern.rounds.record import RoundRecord
from tern.schedule import privacy_conflict
from tern.secagg.terms import SecAggTerms

if TYPE_CHECKING:
    from tern.privacy.ledger import PrivacyLedger

__all__ = [
    "INITIAL_SCALE",
    "PrivacyConfig",
    "Records",
    "add_privacy_arguments",
    "ledger_for",
    "privacy_from_args",
]

# The first round's shared scale of every tensor under secure aggregation; later rounds
# follow the model's steps (tern.rounds.opening.next_scales).
INITIAL_SCALE = 0.02


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """`secagg`: secure aggregation in every gateway cohort, with its `threshold`
    (fraction of a member's share holders), graph `degree` (0: chosen from the cohort's
    size), `weight_levels` and `weight_cap` (a device's weight is an integer 1..levels,
    its samples over the cap), and `stage_s`, the length of its key, share and unmask
    stages (None: a tenth of the round timeout each).

    `dp_epsilon`: differential privacy with this budget at `dp_delta`; `dp_clip` bounds
    each device's weighted contribution; `dp_noise` is central or distributed;
    `dp_multiplier` the noise multiplier (None: calibrated so that the configured number
    of rounds spends exactly the budget)."""

    secagg: bool = False
    threshold: float = 0.6
    degree: int = 0
    weight_levels: int = 8
    weight_cap: float = 1000.0
    stage_s: float | None = None
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    dp_noise: Noise = Noise.CENTRAL
    dp_multiplier: float | None = None

    def check(self, rounds: int | None) -> str | None:
        """What is wrong with these options (a sentence), or None."""
        if self.dp_epsilon is not None:
            if not (math.isfinite(self.dp_epsilon) and self.dp_epsilon > 0):
                return "dp_epsilon must be finite and > 0"
            if not 0 < self.dp_delta < 1:
                return "dp_delta must be in (0, 1)"
            if not (math.isfinite(self.dp_clip) and self.dp_clip > 0):
                return "dp_clip must be finite and > 0"
            if self.dp_multiplier is None and rounds is None:
                return (
                    "differential privacy needs --rounds (to calibrate its noise) or a multiplier"
                )
            if self.dp_noise is Noise.DISTRIBUTED and not self.secagg:
                return None  # each device's noise share; the gateway still reads updates
        if self.stage_s is not None and not (math.isfinite(self.stage_s) and self.stage_s > 0):
            return "secagg stage_s must be finite and > 0"
        try:
            self.secagg_terms(30.0)
        except TernError as exc:
            return exc.message
        return None

    def refusal(self, rounds: int | None, codec: CodecName) -> str | None:
        """Why these options cannot run (`check`), or cannot run together with `codec`
        and the coordinator's aggregation (`tern.schedule.privacy_conflict`); None when
        they can."""
        return self.check(rounds) or privacy_conflict(
            codec, Policy(), self.secagg_terms(30.0), self.dp_terms_unset()
        )

    def secagg_terms(self, round_timeout: float) -> SecAggTerms | None:
        if not self.secagg:
            return None
        stage = self.stage_s if self.stage_s is not None else round_timeout / 10
        return SecAggTerms(
            (INITIAL_SCALE,), float(self.threshold), self.degree, self.weight_levels,
            float(self.weight_cap), stage, stage, stage,
        )  # fmt: skip

    def dp_terms_unset(self) -> DpTerms | None:
        """The DP terms' shape without their calibrated noise (what checks need)."""
        return None if self.dp_epsilon is None else DpTerms(1.0, 0.0, self.dp_noise)

    def dp_terms(self, rounds: int | None) -> DpTerms | None:
        if self.dp_epsilon is None:
            return None
        z = self.dp_multiplier
        if z is None:
            from tern.privacy.ledger import calibrate  # the `privacy` extra

            assert rounds is not None
            z = calibrate(self.dp_epsilon, self.dp_delta, rounds)
        return DpTerms(self.dp_clip, z, self.dp_noise, float(self.weight_cap))


class Records(Protocol):
    """Where a coordinator's round records are (coordinator.store.StateStore)."""

    def round_numbers(self) -> list[int]: ...

    def load_round(self, round: int) -> RoundRecord: ...


def ledger_for(config: PrivacyConfig, records: Records) -> PrivacyLedger | None:
    """The accountant of a coordinator under differential privacy (None without it),
    with every round already recorded in its state directory counted again."""
    if config.dp_epsilon is None:
        return None
    from tern.privacy.ledger import PrivacyLedger  # the `privacy` extra

    ledger = PrivacyLedger(config.dp_delta, config.dp_epsilon)
    for r in records.round_numbers():
        multiplier = records.load_round(r).noise_multiplier
        if multiplier is not None:
            ledger.record(multiplier)
    return ledger


def add_privacy_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("privacy (topics.md: secure aggregation, differential privacy)")
    g.add_argument("--secagg", action="store_true",
                   help="secure aggregation in every gateway cohort")  # fmt: skip
    g.add_argument("--secagg-threshold", type=float, default=0.6,
                   help="share holders (fraction) that rebuild a member's secrets")  # fmt: skip
    g.add_argument("--secagg-degree", type=int, default=0,
                   help="neighbours per member in the masking graph (0: chosen)")  # fmt: skip
    g.add_argument("--secagg-weight-levels", type=int, default=8)
    g.add_argument("--secagg-weight-cap", type=float, default=1000.0,
                   help="samples at which a device's weight stops growing")  # fmt: skip
    g.add_argument("--secagg-stage", type=float, default=None,
                   help="seconds for each of the key, share and unmask stages")  # fmt: skip
    g.add_argument("--dp-epsilon", type=float, default=None,
                   help="differential privacy: the budget epsilon (off by default)")  # fmt: skip
    g.add_argument("--dp-delta", type=float, default=1e-5)
    g.add_argument("--dp-clip", type=float, default=1.0,
                   help="L2 bound of a device's weighted contribution")  # fmt: skip
    g.add_argument("--dp-noise", choices=[str(n) for n in Noise], default="central")
    g.add_argument("--dp-multiplier", type=float, default=None,
                   help="noise multiplier (default: calibrated for --rounds)")  # fmt: skip


def privacy_from_args(args: argparse.Namespace) -> PrivacyConfig:
    return PrivacyConfig(
        secagg=args.secagg,
        threshold=args.secagg_threshold,
        degree=args.secagg_degree,
        weight_levels=args.secagg_weight_levels,
        weight_cap=args.secagg_weight_cap,
        stage_s=args.secagg_stage,
        dp_epsilon=args.dp_epsilon,
        dp_delta=args.dp_delta,
        dp_clip=args.dp_clip,
        dp_noise=Noise(args.dp_noise),
        dp_multiplier=args.dp_multiplier,
    )
