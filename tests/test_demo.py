"""The demo end to end: coordinator, gateways and devices on MNIST-1D over real MQTT.

Its round logic (the model bytes, determinism, the Wasm kernel against the numpy
trainer) is tested on the in-memory bus (tests/test_memory_fleet.py), fast and with the
same machines; these tests run the real processes' code over real brokers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from demo.run import run_demo

REPO = Path(__file__).resolve().parents[1]
ROUND_KEYS = {
    "round",
    "accuracy",
    "contributors",
    "bytes_device_to_gateway",
    "bytes_gateway_to_coordinator",
    "bytes_downlink",
    "seconds",
    "hops",
}


def test_demo_runs_every_round_with_every_device_and_ternary_uplinks_are_small() -> None:
    """Devices send ternary updates and gateways ternary partials (the demo's default)."""
    result = run_demo(devices=4, gateways=2, rounds=2, boards=0, out=None)

    assert result.boards == [] and result.boards_skipped is None  # none asked for
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert result.params > 0
    for row in result.rounds:
        assert row["contributors"] == 4
        assert row["accuracy"] is not None and 0 <= row["accuracy"] <= 1
        assert row["bytes_device_to_gateway"] > 0
        assert row["bytes_gateway_to_coordinator"] > 0
        assert row["bytes_downlink"] > 0
        # two ternary partials, each about the size of one of its two devices' updates
        assert row["bytes_gateway_to_coordinator"] <= 0.55 * row["bytes_device_to_gateway"]
    assert result.final_accuracy == result.rounds[-1]["accuracy"]


def test_demo_command_prints_the_documented_json_on_its_last_line() -> None:
    args = [sys.executable, "-m", "demo", "--devices", "4", "--gateways", "2", "--rounds", "2"]

    done = subprocess.run(
        [*args, "--json"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr  # e.g. a broker task that lost a message
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == {"codec", "params", "final_accuracy", "rounds", "boards", "tls",
                           "secagg", "dp", "partials", "downlink"}  # fmt: skip
    assert result["secagg"] is False and result["dp"] is None
    assert result["tls"] is False
    assert result["codec"] == "ternary" and result["params"] > 0
    assert result["partials"] == "ternary"
    assert [set(r) for r in result["rounds"]] == [ROUND_KEYS, ROUND_KEYS]
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert all(r["contributors"] == 4 for r in result["rounds"])
    assert result["final_accuracy"] == result["rounds"][-1]["accuracy"]
    # three simulated boards ran the final model and their telemetry reached the top broker
    boards = result["boards"]
    assert [b["device"] for b in boards] == ["esp-1", "esp-2", "esp-3"]
    assert [b["gateway"] for b in boards] == ["gw-1", "gw-2", "gw-1"]
    for b in boards:
        assert b["model_version"] == 2 and b["predictions_last_model"] > 0, b
        assert 0 <= b["accuracy_last_model"] <= 1 and b["latency_us_median"] > 0
        assert b["refused"] == {}
    assert "boards (firmware under CPython" in done.stdout
