"""The aggregation policy (tern.policy) and how it travels in the signed round schedule."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from tern.caps import schedule_caps
from tern.cbor import Caps, decode
from tern.codecs import CodecName
from tern.envelope import Envelope, Kind, open_envelope, seal
from tern.errors import MalformedMessage, NonFiniteValue, TernError, TooComplex
from tern.fleet import COORDINATOR, Fleet
from tern.messages import (
    Bounds,
    KernelRef,
    Policy,
    RoundSchedule,
    StrategySpec,
    open_schedule,
)
from tern.policy import KNOWN_AGGREGATORS, KNOWN_STRATEGIES, MAX_NAME, MAX_STRATEGY_PARAMS

KEY = SigningKey(bytes(range(32)))
FLEET = Fleet("plant-7", KEY.verify_key, {})
ADAM = Policy(strategy=StrategySpec.of("fedadam", lr=0.05, tau=1e-4))


def _schedule(policy: Policy | None = None, **kw: Any) -> RoundSchedule:
    fields: dict[str, Any] = {
        "round": 12,
        "model_version": 11,
        "codec": CodecName.TERNARY,
        "deadline": 1_700_000_000.5,
        "min_contributors": 2,
        "participants": ("dev-01", "dev-03"),
        "seed": 7,
        "kernel": KernelRef("ab" * 32, 1, 10**9, 1 << 24),
        "bounds": Bounds(500.0, 20.0),
        **kw,
    }
    return RoundSchedule(**fields) if policy is None else RoundSchedule(**fields, policy=policy)


def _sealed(schedule: RoundSchedule, fleet: str = "plant-7") -> bytes:
    env = Envelope(
        Kind.SCHEDULE,
        fleet,
        schedule.round,
        schedule.model_version,
        COORDINATOR,
        schedule.to_body(),
        run=1_796_000_000_000,
    )
    return seal(env, KEY)


def _cbor(value: object) -> Any:
    return cbor2.loads(cbor2.dumps(value, canonical=True))


# == the default is the schedule of before =============================================

# sha256 of _sealed(_schedule()) as tern/schedule.py made it before schedules had a policy
DEFAULT_SCHEDULE_SHA256 = "2b1dc4bac97de298c19c1af726df25a4208d957ed5fd3592af733b98fa1909c9"


def test_a_schedule_with_the_default_policy_is_sealed_byte_for_byte_as_before() -> None:
    with_default = _sealed(_schedule(Policy()))

    assert with_default == _sealed(_schedule())
    assert hashlib.sha256(with_default).hexdigest() == DEFAULT_SCHEDULE_SHA256
    assert "policy" not in _schedule(Policy()).to_body()


def test_asking_for_fedavgs_default_parameters_is_the_default_policy() -> None:
    spec = StrategySpec.of("fedavg", lr=1.0, momentum=0.0)

    assert spec == StrategySpec()
    assert "policy" not in _schedule(Policy(strategy=spec)).to_body()


# == a policy through seal and open ====================================================


def test_a_non_default_policy_survives_seal_and_open() -> None:
    schedule = _schedule(ADAM)

    _, opened = open_schedule(_sealed(schedule), FLEET)

    assert opened == schedule
    assert opened.policy.strategy.values()["lr"] == 0.05
    assert opened.policy.supported() is None


def test_a_policy_is_one_key_of_the_schedule_with_a_small_map() -> None:
    body = _schedule(ADAM).to_body()

    assert set(body) - set(_schedule().to_body()) == {"policy"}
    assert body["policy"] == {
        "cohort": "sum",
        "top": "sum",
        "strategy": {"name": "fedadam", "params": {"lr": 0.05, "tau": 1e-4}},
    }


def test_a_schedule_refuses_the_default_policy_written_out() -> None:
    body = {**_schedule().to_body(), "policy": Policy().to_cbor()}

    with pytest.raises(MalformedMessage):
        RoundSchedule.from_body(_cbor(body))


# == names this build does not know decode, and supported() names them =================


@pytest.mark.parametrize(
    ("policy", "unknown"),
    [
        (Policy(cohort="median"), "median"),
        (Policy(top="trimmed_mean"), "trimmed_mean"),
        (Policy(strategy=StrategySpec("fedyogi", (("lr", 0.1),))), "fedyogi"),
        (Policy(strategy=StrategySpec("fedavg", (("mu", 0.01),))), "mu"),
    ],
    ids=["cohort", "top", "strategy", "parameter"],
)
def test_a_policy_this_build_cannot_run_decodes_and_says_what_it_lacks(
    policy: Policy, unknown: str
) -> None:
    _, opened = open_schedule(_sealed(_schedule(policy)), FLEET)

    why = opened.policy.supported()

    assert opened.policy == policy
    assert why is not None and unknown in why


def test_every_known_name_is_supported() -> None:
    for cohort in KNOWN_AGGREGATORS:
        for top in KNOWN_AGGREGATORS:
            for name in KNOWN_STRATEGIES:
                assert Policy(cohort, top, StrategySpec(name)).supported() is None


# == malformed policies are refused at decode =============================================


def _policy_body(**override: object) -> dict[str, object]:
    return {**ADAM.to_cbor(), **override}


def _strategy(name: object = "fedadam", params: object = None) -> dict[str, object]:
    return {"name": name, "params": {"lr": 0.1} if params is None else params}


LONG = "a" * (MAX_NAME + 1)
MANY = {f"p{i}": 1.0 for i in range(MAX_STRATEGY_PARAMS + 1)}


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        pytest.param(None, "malformed", id="null"),
        pytest.param(["sum", "sum"], "malformed", id="array"),
        pytest.param({"cohort": "sum", "top": "sum"}, "malformed", id="no-strategy"),
        pytest.param(_policy_body(extra=1), "malformed", id="extra-key"),
        pytest.param(_policy_body(cohort=7), "malformed", id="int-cohort"),
        pytest.param(_policy_body(top=""), "malformed", id="empty-top"),
        pytest.param(_policy_body(cohort=LONG), "malformed", id="long-cohort"),
        pytest.param(_policy_body(cohort="Median"), "malformed", id="not-a-slug"),
        pytest.param(_policy_body(cohort="médian"), "malformed", id="not-ascii"),
        pytest.param(_policy_body(top="sum\n"), "malformed", id="newline"),
        pytest.param(_policy_body(strategy="fedadam"), "malformed", id="strategy-text"),
        pytest.param(_policy_body(strategy={"name": "fedadam"}), "malformed", id="no-params"),
        pytest.param(_policy_body(strategy=_strategy(name=None)), "malformed", id="null-name"),
        pytest.param(_policy_body(strategy=_strategy(params=[])), "malformed", id="params-array"),
        pytest.param(_policy_body(strategy=_strategy(params=MANY)), "malformed", id="too-many"),
        pytest.param(
            _policy_body(strategy=_strategy(params={LONG: 1.0})), "malformed", id="long-param"
        ),
        pytest.param(
            _policy_body(strategy=_strategy(params={"lr": "0.1"})), "malformed", id="text-value"
        ),
        pytest.param(
            _policy_body(strategy=_strategy(params={"lr": True})), "malformed", id="bool-value"
        ),
        pytest.param(
            _policy_body(strategy=_strategy(params={"lr": math.nan})), "non_finite", id="nan"
        ),
        pytest.param(
            _policy_body(strategy=_strategy(params={"mu": -math.inf})), "non_finite", id="inf"
        ),
        pytest.param(
            _policy_body(strategy=_strategy(params={"lr": -0.1})), "malformed", id="lr-negative"
        ),
        pytest.param(
            _policy_body(strategy=_strategy(params={"beta2": 1.0})), "malformed", id="beta2-1"
        ),
        pytest.param(
            _policy_body(strategy=_strategy("fedavg", {"momentum": 1.5})),
            "malformed",
            id="momentum-1.5",
        ),
    ],
)
def test_a_malformed_policy_is_refused_with_its_reason(policy: object, reason: str) -> None:
    body = {**_schedule().to_body(), "policy": policy}

    with pytest.raises(TernError) as info:
        RoundSchedule.from_body(_cbor(body))

    assert info.value.reason == reason


@pytest.mark.parametrize(
    "make",
    [
        lambda: Policy(cohort="Sum"),
        lambda: StrategySpec("fedavg", (("momentum", 0.5), ("lr", 2.0))),
        lambda: StrategySpec("fedavg", (("lr", 2.0), ("lr", 3.0))),
        lambda: StrategySpec("fedavg", (("lr", math.inf),)),
        lambda: StrategySpec.of("fedadam", tau=0.0),
    ],
    ids=["not-a-slug", "unsorted", "repeated", "infinite", "out-of-range"],
)
def test_a_malformed_policy_cannot_be_made_either(make: Any) -> None:
    with pytest.raises((MalformedMessage, NonFiniteValue)):
        make()


# == property tests ==========================================================================

names = st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True)
any_values = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def strategy_specs(draw: st.DrawFn) -> StrategySpec:
    name = draw(st.sampled_from(sorted(KNOWN_STRATEGIES)) | names)
    # unknown parameters take any finite value; known ones only what their range allows
    keys = draw(st.lists(names, max_size=MAX_STRATEGY_PARAMS, unique=True))
    params = {k: draw(any_values) for k in keys}
    spec = StrategySpec(name)
    for k in spec.values():
        if k in params:
            params[k] = spec.values()[k] * draw(st.floats(min_value=0.5, max_value=1.0))
    return StrategySpec(name, tuple(sorted(params.items())))


policies = st.builds(
    Policy,
    cohort=st.sampled_from(sorted(KNOWN_AGGREGATORS)) | names,
    top=st.sampled_from(sorted(KNOWN_AGGREGATORS)) | names,
    strategy=strategy_specs(),
)


@settings(max_examples=150, deadline=None)
@given(policy=policies)
def test_a_policy_round_trips_through_a_schedules_canonical_cbor(policy: Policy) -> None:
    schedule = _schedule(policy)

    got = RoundSchedule.from_body(_cbor(schedule.to_body()))

    assert got == schedule
    assert cbor2.dumps(got.to_body(), canonical=True) == cbor2.dumps(
        schedule.to_body(), canonical=True
    )
    assert ("policy" in schedule.to_body()) == (policy != Policy())


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
cbor_values = st.recursive(
    scalars | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    policy=policies,
    path=st.sampled_from(
        [(), ("cohort",), ("top",), ("strategy",), ("strategy", "name"), ("strategy", "params")]
    ),
    value=cbor_values,
)
def test_a_policy_decoder_raises_only_tern_errors(
    policy: Policy, path: tuple[str, ...], value: object
) -> None:
    wire: Any = policy.to_cbor()
    if path:
        target = wire
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    else:
        wire = value

    try:
        got = Policy.from_cbor(_cbor(wire))
    except TernError as exc:
        assert exc.reason in {"malformed", "non_finite"}
    else:  # what decodes is a valid policy that encodes back to itself
        assert Policy.from_cbor(_cbor(got.to_cbor())) == got


# == caps ======================================================================================


def _largest_schedule(devices: int) -> bytes:
    params = tuple((f"{chr(97 + i)}" * MAX_NAME, -1.1e300) for i in range(MAX_STRATEGY_PARAMS))
    policy = Policy("c" * MAX_NAME, "t" * MAX_NAME, StrategySpec("s" * MAX_NAME, params))
    schedule = RoundSchedule(
        2**32 - 1,
        2**32 - 1,
        CodecName.TERNARY,
        1.1e300,
        2**32 - 1,
        tuple(f"{i:064d}" for i in range(devices)),
        2**32 - 1,
        kernel=KernelRef("ab" * 32, 2**32 - 1, 2**63 - 1, 2**63 - 1),
        bounds=Bounds(1.1e300, 1.1e300),
        policy=policy,
    )
    env = Envelope(
        Kind.SCHEDULE,
        "f" * 64,
        2**32 - 1,
        2**32 - 1,
        COORDINATOR,
        schedule.to_body(),
        run=2**64 - 1,
    )
    return seal(env, KEY)


@pytest.mark.parametrize("devices", [0, 1, 100])
def test_the_largest_schedule_with_a_policy_fits_the_schedule_caps(devices: int) -> None:
    data = _largest_schedule(devices)
    caps = schedule_caps(devices)
    items = _items(decode(data, Caps(1 << 20, 1 << 20)))

    env = open_envelope(
        data, {COORDINATOR: KEY.verify_key}, fleet="f" * 64, kinds=(Kind.SCHEDULE,), caps=caps
    )

    assert RoundSchedule.from_body(env.body).policy.supported() is not None
    assert len(data) <= caps.max_bytes and items <= caps.max_items
    with pytest.raises(TooComplex):  # `_items` counts what the decoder counts
        decode(data, Caps(len(data), items - 1))


def _items(value: object) -> int:
    """CBOR data items of a decoded body (a map entry is two)."""
    if isinstance(value, dict):
        return 1 + sum(1 + _items(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(_items(v) for v in value)
    return 1
