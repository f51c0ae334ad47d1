"""The privacy options as values: what the schedule carries, what the coordinator refuses
at start, what it counts after a restart, and the bounds that still hold on sums."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.privacy import PrivacyConfig, ledger_for
from coordinator.store import StateStore
from tern.admit import Terms
from tern.codecs import CodecName
from tern.errors import MalformedMessage
from tern.fleet import COORDINATOR
from tern.members import new_members
from tern.messages import RoundSchedule
from tern.policy import Policy
from tern.privacy.terms import DpTerms, Noise
from tern.rounds.opening import next_scales
from tern.rounds.record import RoundRecord
from tern.rounds.releasing import kept_share
from tern.schedule import privacy_conflict
from tern.secagg.terms import SecAggTerms
from tern.spec import ModelSpec, TensorSpec

SA = SecAggTerms((0.02, 0.03))
DP = DpTerms(clip=1.5, multiplier=0.8, noise=Noise.DISTRIBUTED, weight_cap=500.0)


def test_a_schedule_carries_its_privacy_terms_and_a_plain_one_has_none_on_the_wire() -> None:
    plain = RoundSchedule(3, 2, CodecName.TERNARY, 100.0, 1)
    private = RoundSchedule(3, 2, CodecName.TERNARY, 100.0, 1, secagg=SA, dp=DP)

    assert "secagg" not in plain.to_body() and "dp" not in plain.to_body()
    assert RoundSchedule.from_body(private.to_body()) == private


@pytest.mark.parametrize(
    ("field", "value"),
    [("threshold", 0.5), ("threshold", 1.5), ("weight_levels", 0), ("weight_levels", 256),
     ("scales", []), ("scales", [0.0]), ("keys_s", -1.0), ("degree", 5000)],
)  # fmt: skip
def test_a_schedule_with_secagg_terms_out_of_range_is_malformed(field: str, value: object) -> None:
    body = RoundSchedule(1, 0, CodecName.TERNARY, 1.0, 1, secagg=SA).to_body()
    body["secagg"][field] = value  # type: ignore[index]

    with pytest.raises(MalformedMessage):
        RoundSchedule.from_body(body)


def test_secure_aggregation_with_an_aggregator_of_individual_updates_is_refused() -> None:
    why = privacy_conflict(CodecName.TERNARY, Policy(cohort="median"), SA, None)

    assert why is not None and "'median' needs individual updates" in why
    assert privacy_conflict(CodecName.TERNARY, Policy(), SA, DP) is None
    central = DpTerms(clip=1.0, multiplier=1.0)
    assert privacy_conflict(CodecName.FLOAT32, Policy(cohort="median"), None, central) is None


def test_distributed_noise_without_secure_aggregation_is_refused() -> None:
    why = privacy_conflict(CodecName.TERNARY, Policy(), None, DP)

    assert why is not None and "distributed noise needs secure aggregation" in why


@pytest.mark.parametrize("codec", [CodecName.FLOAT32, CodecName.FLOAT16])
def test_the_coordinator_refuses_secure_aggregation_with_another_codec_at_start(
    codec: CodecName, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="cannot be masked in its ring"):
        CoordinatorConfig("mqtt://127.0.0.1:1883", tmp_path, codec=codec,
                          privacy=PrivacyConfig(secagg=True))  # fmt: skip


def test_the_coordinator_refuses_distributed_noise_without_secure_aggregation(
    tmp_path: Path,
) -> None:
    noisy = PrivacyConfig(dp_epsilon=4, dp_noise=Noise.DISTRIBUTED)
    with pytest.raises(ConfigError, match="distributed noise needs secure aggregation"):
        CoordinatorConfig("mqtt://127.0.0.1:1883", tmp_path, rounds=5, privacy=noisy)

    secure = PrivacyConfig(secagg=True, dp_epsilon=4, dp_noise=Noise.DISTRIBUTED)
    CoordinatorConfig("mqtt://127.0.0.1:1883", tmp_path, rounds=5, privacy=secure)


def test_the_coordinator_needs_a_number_of_rounds_to_calibrate_its_noise(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs --rounds"):
        CoordinatorConfig("mqtt://127.0.0.1:1883", tmp_path, privacy=PrivacyConfig(dp_epsilon=4))

    CoordinatorConfig("mqtt://127.0.0.1:1883", tmp_path, rounds=10,
                      privacy=PrivacyConfig(dp_epsilon=4))  # fmt: skip


def test_a_resumed_coordinator_counts_every_round_it_already_spent(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for r, z in ((1, 1.2), (2, 1.2), (3, None), (4, 0.9)):  # round 3 released nothing
        store.save_round(RoundRecord(r, z is not None, r - 1, r, 4, 0, noise_multiplier=z))
    config = PrivacyConfig(dp_epsilon=20.0, dp_delta=1e-6)

    ledger = ledger_for(config, store)

    assert ledger is not None and ledger.history == [1.2, 1.2, 0.9]
    assert ledger.delta == 1e-6 and ledger.budget == 20.0
    assert ledger_for(PrivacyConfig(), store) is None


def test_distributed_noise_widens_the_norm_bound_by_what_its_shares_can_add() -> None:
    spec = ModelSpec((TensorSpec("w", (100,)),))
    schedule = RoundSchedule(1, 0, CodecName.TERNARY, 1.0, 1, dp=DP)
    terms = Terms.of("f", 1, schedule, spec)
    central = Terms.of("f", 1, RoundSchedule(1, 0, CodecName.TERNARY, 1.0, 1,
                                             dp=DpTerms(1.5, 0.8)), spec)  # fmt: skip

    assert central.norm_bound(1) == central.max_norm
    assert terms.norm_bound(1) == pytest.approx(terms.max_norm + 1.2 * 20)
    assert terms.norm_bound(4) == pytest.approx(terms.max_norm + 1.2 * 20 / 2)


def test_the_next_scales_follow_the_model_s_last_step_per_tensor() -> None:
    spec = ModelSpec((TensorSpec("a", (2,)), TensorSpec("b", (2,))))
    step = np.array([0.1, -0.3, 0.0, 0.0], dtype=np.float32)

    scales = next_scales(spec, step, (0.5, 0.7), 12.0)

    assert scales[0] == pytest.approx(12 * 0.2)
    assert scales[1] == 0.7  # a tensor that did not move keeps its scale


def test_the_noise_counted_is_the_least_any_released_cohort_kept() -> None:
    from tern.messages import CheckedUpdate

    layout = {"gw-1": (COORDINATOR, ["d1", "d2", "d3", "d4"]),
              "gw-1a": ("gw-1", ["d5", "d6"]), "gw-2": (COORDINATOR, ["d7", "d8"])}  # fmt: skip
    fleet = new_members("plant", layout).fleet
    spec = ModelSpec((TensorSpec("w", (1,)),))

    def partial(count: int) -> CheckedUpdate:
        return CheckedUpdate(spec, (), float(count), count)

    plain = RoundSchedule(1, 0, CodecName.TERNARY, 1.0, 1, dp=DP)
    secure = RoundSchedule(1, 0, CodecName.TERNARY, 1.0, 1, dp=DP, secagg=SA)
    stands = {"gw-1": 6, "gw-2": 2}

    everyone = kept_share(fleet, plain, {"gw-1": partial(6), "gw-2": partial(2)}, stands)
    one_lost = kept_share(fleet, plain, {"gw-1": partial(5), "gw-2": partial(2)}, stands)
    secured = kept_share(fleet, secure, {"gw-1": partial(4), "gw-2": partial(2)}, stands)

    assert everyone == 1.0
    assert one_lost == pytest.approx(1 / 2)  # gw-1a's cohort of 2 may have lost it
    # two lost: gw-1's cohort of 4 released its sum with at least t = 3 of them, gw-1a's
    # (2) with both; without secure aggregation gw-1a could have kept one of its two
    assert secured == pytest.approx(math.ceil(0.6 * 4) / 4)
