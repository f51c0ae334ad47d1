"""bench.secagg keeps running and keeps its JSON contract (figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_secagg_benchmark_smoke_run_prints_exact_sums_and_critical_paths_as_json() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.secagg", "--smoke", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result["cohorts"]) == {"4", "7"} and result["params"] == 15210
    for figures in result["cohorts"].values():
        assert figures["exact"] is True
        for name in ("bits_per_param", "device_cpu_s", "gateway_cpu_s", "round_s",
                     "round_s_plain", "round_s_30pct_dropout", "key_share_bytes"):  # fmt: skip
            assert figures[name] > 0
        assert figures["bits_per_param"] > figures["bits_per_param_plain"]
        for run in ("", "_plain", "_30pct_dropout", "_30pct_dropout_before_mask"):
            parallel, serial = figures["round_s" + run], figures["round_s" + run + "_serial"]
            assert 0 < parallel <= serial, run
        assert figures["threshold"] == result["threshold"]
    assert any(line.startswith("secure aggregation benchmark") for line in lines)
    assert any("critical path" in line for line in lines)
