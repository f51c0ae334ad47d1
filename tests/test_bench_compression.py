"""bench.compression's smoke run: every hop's variant runs through the real codecs, and
the table's figures come from the sealed messages (the full run is by hand)."""

from __future__ import annotations

import json

import pytest

from bench import compression


def test_the_compression_bench_prints_accuracy_and_bytes_per_hop_for_every_variant(
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = ["float32", "ternary_ef", "ternary_dl", "ternary_all", "sparse_all"]

    code = compression.main(["--rounds", "2", "--variants", ",".join(names), "--json"])

    out = capsys.readouterr().out
    doc = json.loads(out.strip().splitlines()[-1])
    b = doc["bytes"]
    assert code == 0 and set(doc["accuracy"]) == set(names) and doc["rounds"] == [2]
    assert "vs Flower" in out and "ternary_dl" in out
    # every hop compressed: ternary down is ~16x below the float32 model
    assert b["ternary_dl"]["down"] < b["ternary_ef"]["down"] / 10
    assert b["ternary_all"]["partial"] < b["ternary_dl"]["partial"] / 10
    assert b["sparse_all"]["bits_per_param_up"] < b["ternary_ef"]["bits_per_param_up"] / 2
    assert b["float32"]["bits_per_param_up"] > 32  # a float32 tensor and its framing
    assert all(0 <= a[0] <= 100 for a in doc["accuracy"].values())


def test_the_compression_bench_refuses_an_unknown_variant() -> None:
    with pytest.raises(SystemExit):
        compression.main(["--variants", "zip"])
