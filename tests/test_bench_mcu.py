"""bench.mcu keeps running and keeps its JSON contract (figures are not checked here)."""

from __future__ import annotations

import json

import pytest

from bench import mcu


def test_mcu_benchmark_prints_table_and_json_last_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert mcu.main(["--windows", "3", "--repeats", "1", "--json"]) == 0

    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["model_bytes"] == 15912 and result["windows"] == 3
    assert set(result["cpython"]) == {"firmware_us_per_inference", "reference_us_per_inference"}
    if result["micropython"] is not None:  # None when node is absent (CI installs it)
        assert result["micropython"]["heap_total_bytes"] <= 64 * 1024
        assert result["micropython"]["us_per_inference"] >= 0
    assert any(line.startswith("mcu benchmark") for line in lines)
