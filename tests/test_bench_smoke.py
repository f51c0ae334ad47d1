"""Benchmarks keep running and keep their JSON contract (figures are not checked here)."""

from __future__ import annotations

import json

import pytest


def test_soak_benchmark_shows_retention_keeps_the_state_dir_from_growing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench import soak

    assert soak.main(["--rounds", "12", "--warmup", "4", "--keep-models", "2", "--json"]) == 0

    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kept"]["per_round"]["state"] < 2_000  # a round record, no model
    assert result["everything"]["per_round"]["state"] > 60_000  # a model and its momentum
    assert set(result["kept"]["per_round"]) == {"objects", "rss", "state"}


def test_demo_tls_benchmark_compares_both_demos_in_one_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench import demo_tls

    args = ["--repeats", "1", "--rounds", "2", "--devices", "4", "--gateways", "2", "--json"]
    assert demo_tls.main(args) == 0

    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["plain"]["round_s"] > 0 and result["tls"]["round_s"] > 0
    assert result["ratio"] == result["tls"]["round_s"] / result["plain"]["round_s"]
    assert result["same_accuracy"] is True  # TLS changes the links, not the model
    assert any(line.startswith("ratio tls/plain") for line in lines)
