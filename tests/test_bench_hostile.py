"""A smoke run of `python -m bench.hostile`: both parts, tiny numbers."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

from bench.hostile import Scenario, demo_fleet, main, measure_costs

# a word of each attack class the brief lists
BRIEF = ("random", "28/29", "tag 4", "tag 5", "tag 30", "bignum", "nesting", "declared length",
         "oversize", "unknown tag", "indefinite", "bad signature", "partial, count 1000", "1e30",
         "5e-324", "by 100", "NaN", "shape", "stale", "run", "duplicate", "budget", "old model",
         "old schedule", "forged model")  # fmt: skip


@pytest.fixture(scope="module")
def costs() -> dict[str, Any]:
    fleet, keys = demo_fleet(0)
    return measure_costs(Scenario(keys, fleet), repeat=1, samples=2)


def test_every_attack_class_is_refused_with_its_expected_reason(costs: dict[str, Any]) -> None:
    classes = costs["classes"]

    wrong = {
        n: (c["reason"], c["expected"]) for n, c in classes.items() if c["reason"] != c["expected"]
    }

    assert len(classes) >= 25
    assert not wrong


def test_the_classes_of_the_brief_are_measured(costs: dict[str, Any]) -> None:
    names = " | ".join(costs["classes"])

    missing = [word for word in BRIEF if word not in names]

    assert not missing


def test_both_parts_print_one_json_object_last() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--repeat", "1", "--samples", "2", "--messages", "60", "--strangers", "5",
                     "--json"])  # fmt: skip

    result = json.loads(out.getvalue().strip().splitlines()[-1])
    assert code == 0
    assert result["accept_us"] > 0
    for c in result["classes"].values():
        assert {"refuse_us", "ratio", "reason"} <= set(c)
        assert c["reason"] == c["expected"]
    rss = result["rss"]
    assert {"before_mb", "after_mb", "delta_mb", "counted", "sent"} <= set(rss)
    sent = rss["sent"]
    assert sent["device"] + sent["upstream"] == 60
    assert rss["counted"] == sent["device"] + sent["upstream"] + sent["stranger_connects"]
    assert rss["stranger_connects_refused"] == 5
    assert rss["next_round_completed"] and rss["next_round_contributors"] == 3
