"""Chunked messages under hostile input: bench.hostile_chunks at smoke size, and the
chunk layer's fuzz targets registered with bench.fuzz."""

from __future__ import annotations

from typing import Any

import pytest

from bench.fuzz import build_targets, sample
from bench.hostile_chunks import CLASSES, chunk_costs, chunk_flood, main
from tern.chunks import CHUNK_REASONS


@pytest.fixture(scope="module")
def costs() -> dict[str, Any]:
    return chunk_costs(repeat=1, samples=1)


def test_every_chunk_class_is_refused_with_its_reason_and_the_next_update_is_taken(
    costs: dict[str, Any],
) -> None:
    classes = costs["classes"]

    wrong = {n: (c["reason"], c["expected"]) for n, c in classes.items() if not c["counted"]}
    lost = [n for n, c in classes.items() if not c["taken_after"]]

    assert len(classes) == len(CLASSES) and not wrong and not lost
    assert {c["reason"] for c in classes.values()} == set(CHUNK_REASONS)
    assert costs["accept_us"] > 0 and all(c["ratio"] > 0 for c in classes.values())


def test_honest_updates_arrive_whole_through_a_flood_within_the_budget() -> None:
    flood = chunk_flood(3 * len(CLASSES), every=len(CLASSES))

    assert flood["honest"] == 3 and flood["honest_whole"]
    assert flood["counted"] >= 3 * (len(CLASSES) - 2)
    assert 0 < flood["max_reserved"] <= flood["budget"]


def test_the_bench_prints_a_table_and_one_json_object_last(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--repeat", "1", "--samples", "1", "--messages", "20", "--json"]) == 0

    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("{") and '"flood"' in lines[-1]
    assert any("attack class" in line for line in lines)


@pytest.mark.parametrize(
    "name", ["chunks.decode_manifest", "chunks.Reassembler", "chunks.Reassembler.manifest"]
)
def test_the_chunk_decoders_are_fuzzed_without_a_crash(name: str) -> None:
    result = sample(build_targets()[name], 300, 0)

    assert result.inputs == 300 and result.crashes == 0, result.first_crashes
