"""The privacy benchmark keeps running and keeps its JSON contract (figures are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_privacy_benchmark_smoke_run_prints_table_and_json_last_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.privacy", "--smoke", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"non_private", "points"}
    assert 0.0 <= result["non_private"] <= 1.0
    combos = {(p["noise"], p["secagg"]) for p in result["points"]}
    assert combos == {
        ("central", False),
        ("central", True),
        ("distributed", False),
        ("distributed", True),
    }
    for point in result["points"]:
        assert set(point) == {"epsilon", "noise", "secagg", "accuracy"}
        assert point["epsilon"] == 8.0 and 0.0 <= point["accuracy"] <= 1.0
    assert any(line.startswith("non-private") for line in lines)
