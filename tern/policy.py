"""The round's aggregation policy, signed in its schedule so the whole fleet follows it.

`cohort` names the aggregator each gateway runs over what its devices and child
gateways send; `top` the one the coordinator runs over its gateways' partials;
`strategy` the server step the coordinator applies to the mean (tern.strategies).
Field-by-field schema in topics.md ("schedule", `policy`).

A policy decodes when it is well formed, whether or not this build knows the names
in it: a newer coordinator may name an aggregator or a strategy an older gateway
cannot run. `Policy.supported()` says what is not known here, so a receiver refuses
the round (``policy_unsupported``) instead of folding it some other way. Malformed
values (wrong types, names that are not short slugs, non-finite numbers, too many
parameters, a known parameter out of its range) are refused at construction and at
decode with the schedule's usual errors (`MalformedMessage`, `NonFiniteValue`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from tern.errors import MalformedMessage, TernError
from tern.fields import body_map, real_field, slug_field

__all__ = [
    "KNOWN_AGGREGATORS",
    "KNOWN_STRATEGIES",
    "MAX_NAME",
    "MAX_STRATEGY_PARAMS",
    "STRATEGY_PARAMS",
    "ParamRule",
    "Policy",
    "PolicyError",
    "StrategySpec",
]

MAX_NAME = 32  # characters of an aggregator, strategy or parameter name
MAX_STRATEGY_PARAMS = 8

KNOWN_AGGREGATORS = frozenset({"sum"})  # tern.aggregators runs each of these


def _name(value: object, what: str) -> str:
    return slug_field(value, what, MAX_NAME)


class PolicyError(TernError):
    """A well-formed policy that this build cannot run: an unknown name or parameter."""

    reason = "policy_unsupported"


@dataclass(frozen=True, slots=True)
class ParamRule:
    """A strategy parameter's default and its range: `low` < value (or <= when
    `low_closed`) and value < `high`."""

    default: float
    low: float
    high: float = math.inf
    low_closed: bool = False

    def admits(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        return above and value < self.high and math.isfinite(value)

    def describe(self) -> str:
        return f"{'[' if self.low_closed else '('}{self.low}, {self.high})"


_POSITIVE = ParamRule(1.0, 0.0)
_UNIT = ParamRule(0.0, 0.0, 1.0, low_closed=True)  # [0, 1)

# Each known strategy's parameters (tern.strategies builds them from these).
STRATEGY_PARAMS: Mapping[str, Mapping[str, ParamRule]] = MappingProxyType(
    {
        "fedavg": MappingProxyType({"lr": _POSITIVE, "momentum": _UNIT}),
        "fedadam": MappingProxyType(
            {
                "lr": ParamRule(0.01, 0.0),
                "beta1": ParamRule(0.9, 0.0, 1.0, low_closed=True),
                "beta2": ParamRule(0.99, 0.0, 1.0, low_closed=True),
                "tau": ParamRule(1e-3, 0.0),
            }
        ),
    }
)
KNOWN_STRATEGIES = frozenset(STRATEGY_PARAMS)


@dataclass(frozen=True, slots=True)
class StrategySpec:
    """A server strategy by name, with its parameters sorted by name (unnamed ones take
    their defaults, `STRATEGY_PARAMS`)."""

    name: str = "fedavg"
    params: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        _name(self.name, "policy.strategy.name")
        if not isinstance(self.params, tuple) or len(self.params) > MAX_STRATEGY_PARAMS:
            raise MalformedMessage(
                f"policy.strategy.params must be at most {MAX_STRATEGY_PARAMS} pairs"
            )
        rules = STRATEGY_PARAMS.get(self.name, {})
        names: list[str] = []
        for pair in self.params:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise MalformedMessage("policy.strategy.params must be (name, value) pairs")
            key = _name(pair[0], "a policy.strategy parameter name")
            value = real_field(pair[1], f"policy.strategy.params.{key}")
            rule = rules.get(key)
            if rule is not None and not rule.admits(value):
                raise MalformedMessage(
                    f"policy.strategy.params.{key} of {self.name} must be in {rule.describe()}"
                )
            names.append(key)
        if names != sorted(set(names)):
            raise MalformedMessage("policy.strategy.params must be sorted by name, each once")

    @classmethod
    def of(cls, name: str, **params: float) -> StrategySpec:
        """A spec with `params` sorted, as floats; a known parameter at its default is
        left out, so ``StrategySpec.of("fedavg", lr=1.0, momentum=0.0) == StrategySpec()``
        and a schedule that asks for the defaults encodes as one that names none."""
        rules = STRATEGY_PARAMS.get(name, {})
        kept = tuple(
            (k, float(v))
            for k, v in sorted(params.items())
            if k not in rules or float(v) != rules[k].default
        )
        return cls(name, kept)

    def values(self) -> dict[str, float]:
        """Every parameter of a known strategy: its defaults, overridden by `params`."""
        out = {k: rule.default for k, rule in STRATEGY_PARAMS.get(self.name, {}).items()}
        out.update(self.params)
        return out

    def supported(self) -> str | None:
        """None when this build runs the strategy, else what it does not know."""
        rules = STRATEGY_PARAMS.get(self.name)
        if rules is None:
            return f"strategy {self.name!r} is not one of {sorted(KNOWN_STRATEGIES)}"
        unknown = [k for k, _ in self.params if k not in rules]
        if unknown:
            return f"strategy {self.name!r} has no parameters {unknown}"
        return None

    def to_cbor(self) -> dict[str, object]:
        return {"name": self.name, "params": {k: float(v) for k, v in self.params}}

    @classmethod
    def from_cbor(cls, value: object) -> StrategySpec:
        m = body_map(value, frozenset({"name", "params"}), "schedule.policy.strategy")
        params = m["params"]
        if not isinstance(params, Mapping) or len(params) > MAX_STRATEGY_PARAMS:
            raise MalformedMessage(
                f"schedule.policy.strategy.params must be a map of at most "
                f"{MAX_STRATEGY_PARAMS} entries"
            )
        name = _name(m["name"], "schedule.policy.strategy.name")
        pairs = [
            (_name(k, "a schedule.policy.strategy parameter name"), v) for k, v in params.items()
        ]
        return cls(
            name,
            tuple(
                (k, real_field(v, f"schedule.policy.strategy.params.{k}"))
                for k, v in sorted(pairs, key=lambda kv: kv[0])
            ),
        )


@dataclass(frozen=True, slots=True)
class Policy:
    """How round contributions are aggregated: by gateways (`cohort`), by the
    coordinator (`top`), and the coordinator's server step (`strategy`)."""

    cohort: str = "sum"
    top: str = "sum"
    strategy: StrategySpec = field(default_factory=StrategySpec)

    def __post_init__(self) -> None:
        _name(self.cohort, "policy.cohort")
        _name(self.top, "policy.top")
        if not isinstance(self.strategy, StrategySpec):
            raise MalformedMessage("policy.strategy must be a strategy spec")

    def supported(self) -> str | None:
        """None when this build can run every part of the policy; otherwise what it
        cannot (names are short slugs, safe to log). A receiver that gets a policy it
        cannot run refuses the round's schedule with ``policy_unsupported``."""
        for part, name in (("cohort", self.cohort), ("top", self.top)):
            if name not in KNOWN_AGGREGATORS:
                return f"{part} aggregator {name!r} is not one of {sorted(KNOWN_AGGREGATORS)}"
        return self.strategy.supported()

    def to_cbor(self) -> dict[str, object]:
        return {"cohort": self.cohort, "top": self.top, "strategy": self.strategy.to_cbor()}

    @classmethod
    def from_cbor(cls, value: object) -> Policy:
        m = body_map(value, frozenset({"cohort", "top", "strategy"}), "schedule.policy")
        return cls(
            _name(m["cohort"], "schedule.policy.cohort"),
            _name(m["top"], "schedule.policy.top"),
            StrategySpec.from_cbor(m["strategy"]),
        )
