"""The coordinator's server step comes from its configuration, travels in the schedule's
policy, and its whole state (not only FedAvg's momentum) survives a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator import Coordinator, CoordinatorConfig
from coordinator.__main__ import build_parser
from coordinator.config import ConfigError
from coordinator.store import StateStore, StoreError
from tern.aggregate import Partial
from tern.fleet import COORDINATOR
from tern.policy import StrategySpec
from tern.rounds.opening import schedule_for
from tern.strategies import FedAdam, ServerState
from tests.fleet_fixtures import build_fleet

LAYERS = (4, 3, 2)
KIT = build_fleet({"gw-1": (COORDINATOR, ["dev-1"])})


def config(state: Path, **overrides: object) -> CoordinatorConfig:
    values: dict[str, object] = {"broker_url": "mqtt://127.0.0.1:1", "state_dir": state,
                                 "layers": LAYERS}  # fmt: skip
    values.update(overrides)
    return CoordinatorConfig(**values)  # type: ignore[arg-type]


def test_fedavg_at_its_defaults_puts_no_policy_on_the_wire(tmp_path: Path) -> None:
    c = Coordinator(config(tmp_path), KIT.fleet, KIT.coordinator_key)

    body = schedule_for(c.settings, KIT.fleet, 1, 0, 0.0, c.machine.kernel).to_body()

    assert c.settings.policy.strategy == StrategySpec()
    assert "policy" not in body
    c.store.close()


def test_fedadam_is_named_in_the_policy_with_its_parameters(tmp_path: Path) -> None:
    cfg = config(tmp_path, strategy="fedadam", strategy_params=(("lr", 0.05), ("beta1", 0.8)))
    c = Coordinator(cfg, KIT.fleet, KIT.coordinator_key)

    assert c.settings.policy.strategy == StrategySpec("fedadam", (("beta1", 0.8), ("lr", 0.05)))
    assert isinstance(c.strategy, FedAdam) and (c.strategy.lr, c.strategy.beta1) == (0.05, 0.8)
    c.store.close()


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy": "fedprox"},
        {"strategy": "fedadam", "strategy_params": (("beta1", 1.5),)},
        {"strategy": "fedadam", "server_lr": 0.5},
    ],
)
def test_a_strategy_the_coordinator_cannot_run_is_a_config_error(
    tmp_path: Path, overrides: dict[str, object]
) -> None:
    with pytest.raises(ConfigError):
        config(tmp_path, **overrides)


def test_fedadam_state_is_saved_with_each_model_and_resumed_bit_for_bit(tmp_path: Path) -> None:
    cfg = config(tmp_path, strategy="fedadam")
    first = Coordinator(cfg, KIT.fleet, KIT.coordinator_key)
    rng = np.random.default_rng(3)
    size = first.spec.size
    partial = Partial(rng.normal(size=size).astype(np.float32), 2.0, 2)
    stepped = first.machine.model.step(first.strategy, partial)
    assert stepped is not None
    first._save_model(type("A", (), {"model": stepped})())  # type: ignore[arg-type]
    first.store.save_round(_record(1, stepped.version))
    first.store.close()

    again = Coordinator(cfg, KIT.fleet, KIT.coordinator_key)

    model = again.machine.model
    assert model.version == 1 and model.weights.tobytes() == stepped.weights.tobytes()
    assert model.state.same_as(ServerState(1, stepped.state.buffers))
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "s0-m.npy", "s0-v.npy", "s1-m.npy", "s1-v.npy", "v0.npy", "v1.npy"
    ]  # fmt: skip
    again.store.close()


def test_a_state_dir_of_another_strategy_is_not_resumed(tmp_path: Path) -> None:
    Coordinator(config(tmp_path), KIT.fleet, KIT.coordinator_key).store.close()

    with pytest.raises(StoreError):
        Coordinator(config(tmp_path, strategy="fedadam"), KIT.fleet, KIT.coordinator_key)


def test_old_buffers_are_pruned_with_their_model(tmp_path: Path) -> None:
    store = StateStore(tmp_path, keep_models=1)
    zeros = np.zeros(3, dtype=np.float32)
    for v in range(3):
        store.save_state(v, zeros, {"m": zeros, "v": zeros})
    store.save_round(_record(2, 2))

    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "s2-m.npy", "s2-v.npy", "v2.npy"
    ]  # fmt: skip
    store.close()


def test_the_command_takes_a_strategy_and_its_parameters() -> None:
    args = build_parser().parse_args(
        ["--broker", "mqtt://h:1", "--fleet-file", "f", "--key", "k", "--state-dir", "s",
         "--strategy", "fedadam", "--strategy-param", "lr=0.02", "--strategy-param", "tau=0.01"]
    )  # fmt: skip

    assert args.strategy == "fedadam"
    assert args.strategy_param == [("lr", 0.02), ("tau", 0.01)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--broker", "b", "--fleet-file", "f", "--key", "k",
                                   "--state-dir", "s", "--strategy-param", "lr"])  # fmt: skip


def _record(r: int, version: int):  # type: ignore[no-untyped-def]
    from coordinator.store import RoundRecord

    return RoundRecord(round=r, ok=True, base_version=version - 1, model_version=version,
                       contributors=1, dropped=0)  # fmt: skip
