"""A gateway's partials upstream (tern.rounds.uplink): the schedule's `partials` codec,
the gateway's own error feedback, the receiver's norm bound kept; the trust boundary's
codec and caps for partials; the options that choose them."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.__main__ import build_parser
from coordinator.compression import partials_from_args
from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.privacy import PrivacyConfig
from demo.run import main as demo_main
from tern.admit import Terms, admit, peers_of
from tern.aggregate import Partial
from tern.codecs import CodecName, Float32Codec, codec_for
from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.messages import Bounds, RoundSchedule, TrainConfig, Update, cohort_message, encode_update
from tern.privacy.terms import DpTerms, Noise
from tern.rounds.opening import RoundSettings
from tern.rounds.uplink import Uplink, bounded_encode
from tern.spec import ModelSpec
from tern.topics import partial as partial_topic
from tests.fleet_fixtures import FleetKit, build_fleet

SPEC = ModelSpec.of({"w": (40, 30), "b": (30,)})
RUN = 1_764_000_000_000
BOUND = 4.0
LAYOUT = {"gw-1": (COORDINATOR, ["dev-1", "dev-2", "dev-3"])}


def schedule(round: int = 7, **changes: object) -> RoundSchedule:
    s = RoundSchedule(
        round=round, model_version=round - 1, codec=CodecName.TERNARY, deadline=1.0,
        min_contributors=1, train=TrainConfig(), partials=CodecName.TERNARY,
        bounds=Bounds(max_weight=500.0, max_norm=BOUND),
    )  # fmt: skip
    return replace(s, **changes)  # type: ignore[arg-type]


def terms(s: RoundSchedule, spec: ModelSpec = SPEC, run: int = RUN) -> Terms:
    return Terms.of("plant-7", run, s, spec)


def fold(seed: int, weight: float = 300.0, norm: float = 1.0, spec: ModelSpec = SPEC) -> Partial:
    """A cohort's fold whose mean delta has L2 norm `norm`."""
    d = np.random.default_rng(seed).standard_normal(spec.size)
    mean = d / np.linalg.norm(d) * norm
    return Partial((mean * weight).astype(np.float32), weight, 3)


def decoded(update: Update, density: float | None = None) -> np.ndarray:
    return update.check(SPEC, density=density).to_partial().weighted_sum


def mean_norm(update: Update, density: float | None = None) -> float:
    return math.sqrt(update.check(SPEC, density=density).sq_norm()) / update.weight


# -- error feedback ---------------------------------------------------------------------


def test_a_gateway_carries_what_its_ternary_partial_dropped_into_the_next_round() -> None:
    uplink = Uplink()
    p1, p2 = fold(1), fold(2)

    u1 = uplink.encode(RUN, schedule(1), terms(schedule(1)), p1)
    r1 = uplink.residual
    u2 = uplink.encode(RUN, schedule(2), terms(schedule(2)), p2)
    r2 = uplink.residual

    assert u1.codec is CodecName.TERNARY and r1 is not None and r2 is not None
    w = np.float32(300.0)
    assert np.allclose(r1, (p1.weighted_sum - decoded(u1)) / w, atol=1e-6)
    # nothing lost for good: what went up in two rounds is both sums but the last residual
    sent = decoded(u1) + decoded(u2)
    assert np.allclose(sent, p1.weighted_sum + p2.weighted_sum - r2 * w, atol=1e-3)
    assert not np.allclose(sent, p1.weighted_sum + p2.weighted_sum, atol=1e-3)


def test_a_round_opened_again_starts_from_the_residual_before_its_first_attempt() -> None:
    uplink = Uplink()
    uplink.encode(RUN, schedule(1), terms(schedule(1)), fold(1))
    first = uplink.encode(RUN, schedule(2), terms(schedule(2)), fold(2))
    after_first = uplink.residual

    again = replace(schedule(2), deadline=5.0)  # the coordinator restarted: round 2 again
    second = uplink.encode(RUN, again, terms(again), fold(2))

    assert second.to_body() == first.to_body()
    assert uplink.residual is not None and after_first is not None
    assert uplink.residual.tobytes() == after_first.tobytes()


@pytest.mark.parametrize("change", ["run", "spec"])
def test_a_new_run_or_a_new_model_starts_without_a_residual(change: str) -> None:
    other = ModelSpec.of({"w": (40, 30), "b": (30,), "c": (2,)}) if change == "spec" else SPEC
    run = RUN + 1 if change == "run" else RUN
    p = fold(3, spec=other)
    uplink = Uplink()
    uplink.encode(RUN, schedule(1), terms(schedule(1)), fold(1))

    carried = uplink.encode(run, schedule(2), terms(schedule(2), other, run), p)
    fresh = Uplink().encode(run, schedule(2), terms(schedule(2), other, run), p)

    assert carried.to_body() == fresh.to_body()


def test_float32_partials_are_the_exact_sum_with_no_residual() -> None:
    uplink = Uplink()
    s = schedule(1, partials=CodecName.FLOAT32)
    p = fold(4)

    update = uplink.encode(RUN, s, terms(s), p)

    assert uplink.residual is None
    assert decoded(update).tobytes() == p.weighted_sum.tobytes()
    assert cohort_message(SPEC, p, {}, update) == cohort_message(SPEC, p, {})


# -- the norm bound -----------------------------------------------------------------------


def test_an_honest_partial_at_the_bound_with_a_large_residual_is_admitted() -> None:
    kit = build_fleet(LAYOUT, "plant-7")
    s = schedule(3)
    p = fold(5, norm=BOUND * 0.999)
    residual = (fold(6, norm=BOUND).weighted_sum / np.float32(300.0)).astype(np.float32)
    plain, _ = encode_update(codec_for(CodecName.TERNARY), SPEC, p, residual)
    assert mean_norm(plain) > BOUND  # without the cap this partial would be refused

    update, carried = bounded_encode(codec_for(CodecName.TERNARY), SPEC, p, residual, BOUND)

    assert mean_norm(update) <= BOUND
    assert float(np.linalg.norm(carried.astype(np.float64))) <= BOUND * (1 + 1e-6)
    env = Envelope(Kind.PARTIAL, "plant-7", s.round, s.model_version, "gw-1",
                   update.to_body(), run=RUN)  # fmt: skip
    peer = peers_of(kit.fleet, COORDINATOR, s)["gw-1"]
    got = admit(seal(env, kit.keys["gw-1"]), partial_topic("plant-7", COORDINATOR, "gw-1"),
                peer, terms(s))  # fmt: skip
    assert got.update is not None and got.update.count == 3


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    norm=st.floats(0.01, 1.0),
    carried=st.floats(0.0, 3.0),
    codec=st.sampled_from([CodecName.TERNARY, CodecName.FLOAT16, CodecName.SPARSE]),
)
def test_the_decoded_partial_never_passes_the_bound(
    seed: int, norm: float, carried: float, codec: CodecName
) -> None:
    density = 0.05 if codec is CodecName.SPARSE else None
    p = fold(seed, norm=BOUND * norm)
    residual = (fold(seed + 1, norm=BOUND * carried).weighted_sum / np.float32(300.0)).astype(
        np.float32
    )

    update, new = bounded_encode(codec_for(codec, density=density), SPEC, p, residual, BOUND,
                                 density)  # fmt: skip

    assert mean_norm(update, density) <= BOUND
    assert np.isfinite(new).all()


# -- the trust boundary ------------------------------------------------------------------


def sealed_partial(kit: FleetKit, s: RoundSchedule, body: object) -> bytes:
    env = Envelope(Kind.PARTIAL, "plant-7", s.round, s.model_version, "gw-1", body, run=RUN)
    return seal(env, kit.keys["gw-1"])


def refusal(kit: FleetKit, s: RoundSchedule, data: bytes, spec: ModelSpec = SPEC) -> str:
    peer = peers_of(kit.fleet, COORDINATOR, s)["gw-1"]
    with pytest.raises(TernError) as info:
        admit(data, partial_topic("plant-7", COORDINATOR, "gw-1"), peer, terms(s, spec))
    return info.value.reason


@pytest.mark.parametrize(
    ("partials", "sent"),
    [(CodecName.TERNARY, CodecName.FLOAT32), (CodecName.FLOAT32, CodecName.TERNARY)],
)
def test_a_partial_not_in_the_schedule_s_partials_codec_is_refused(
    partials: CodecName, sent: CodecName
) -> None:
    kit = build_fleet(LAYOUT, "plant-7")
    small = ModelSpec.of({"w": (4, 3)})
    s = schedule(3, partials=partials)
    update, _ = encode_update(codec_for(sent), small, fold(7, spec=small))

    assert refusal(kit, s, sealed_partial(kit, s, update.to_body()), small) == "wrong_codec"


def test_a_float32_sized_partial_is_oversize_where_partials_are_ternary() -> None:
    kit = build_fleet(LAYOUT, "plant-7")
    big = ModelSpec.of({"w": (100, 30)})  # 12 KB in float32, more than a failure's cap
    s = schedule(3)
    update, _ = encode_update(Float32Codec(), big, fold(8, spec=big))

    assert refusal(kit, s, sealed_partial(kit, s, update.to_body()), big) == "oversize"


# -- options -------------------------------------------------------------------------------


def test_central_noise_with_lossy_partials_is_refused_and_distributed_noise_is_not() -> None:
    central = DpTerms(1.0, 1.0, Noise.CENTRAL)
    base = RoundSettings(CodecName.TERNARY, 10.0, 1)

    with pytest.raises(ValueError, match="central noise"):
        replace(base, dp=central, partials=CodecName.TERNARY)
    replace(base, dp=central, partials=CodecName.FLOAT32)
    replace(base, dp=DpTerms(1.0, 1.0, Noise.DISTRIBUTED), partials=CodecName.TERNARY)


def test_the_schedule_carries_the_settings_partials_codec() -> None:
    from tern.messages import KernelFile
    from tern.rounds.opening import schedule_for

    kit = build_fleet(LAYOUT, "plant-7")
    settings = RoundSettings(CodecName.TERNARY, 10.0, 1, kernel_fuel=10**9, kernel_memory=2**20,
                             partials=CodecName.SPARSE, density=0.1)  # fmt: skip

    s = schedule_for(settings, kit.fleet, 1, 0, 0.0, KernelFile(1, b"\0asm"))

    assert (s.partials, s.density) == (CodecName.SPARSE, 0.1)
    assert RoundSchedule.from_body(s.to_body()) == s


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"partials": CodecName.TERNARY, "privacy": PrivacyConfig(dp_epsilon=1.0)}, "partials"),
        ({"partials": CodecName.SPARSE}, "density"),
        ({"density": 0.1}, "density"),
        ({"partials": CodecName.SPARSE, "density": 1.5}, "density"),
    ],
)
def test_the_coordinator_refuses_compression_options_that_cannot_run(
    tmp_path: object, changes: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        CoordinatorConfig("mqtt://127.0.0.1:1883", tmp_path, rounds=5, **changes)  # type: ignore[arg-type]
    assert info.value.field == field


def test_the_command_line_sends_ternary_partials_unless_central_noise_needs_exact_ones() -> None:
    base = ["--broker", "mqtt://h", "--fleet-file", "f", "--key", "k", "--state-dir", "s"]
    parse = build_parser().parse_args
    central = PrivacyConfig(dp_epsilon=1.0).dp_terms_unset()

    assert partials_from_args(parse(base), None) is CodecName.TERNARY
    assert partials_from_args(parse(base), central) is CodecName.FLOAT32
    explicit = parse([*base, "--partial-codec", "float16"])
    assert partials_from_args(explicit, central) is CodecName.FLOAT16


def test_the_demo_refuses_ternary_partials_with_central_noise_before_it_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        demo_main(["--partial-codec", "ternary", "--dp-epsilon", "1", "--rounds", "3"])

    assert info.value.code == 2
    assert "central noise" in capsys.readouterr().err
