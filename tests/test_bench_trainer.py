"""The trainer benchmark keeps running and keeps its JSON contract (figures are not checked)."""

from __future__ import annotations

import json

import pytest

from bench import trainer as trainer_bench


def test_trainer_benchmark_prints_table_and_json_last_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--samples", "64", "--repeat", "1", "--min-run-s", "0", "--json"]

    assert trainer_bench.main(argv) == 0

    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"demo", "wide", "fuel_overhead", "agent_peak_rss_mb"} <= set(result)
    for model in ("demo", "wide"):
        assert {"wasm_samples_s", "numpy_samples_s", "ratio"} <= set(result[model])
        assert result[model]["wasm_samples_s"] > 0
    assert result["agent_rounds_trained"] == 3
    assert any(line.startswith("demo ") for line in lines)


def test_trainer_benchmark_rejects_zero_repeats() -> None:
    with pytest.raises(SystemExit):
        trainer_bench.main(["--repeat", "0"])
