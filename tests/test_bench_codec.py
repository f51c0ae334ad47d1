"""`python -m bench.codec` keeps running and keeps its JSON contract (figures not checked):
both models, every codec with the sparse densities, and the ternary/float32 encode ratio."""

from __future__ import annotations

import json

import pytest

from bench import codec


def test_codec_benchmark_prints_tables_and_one_json_object_last(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert codec.main(["--params", "20000", "--repeats", "1", "--json"]) == 0

    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["params"] == {"demo": 15_210, "large": 20_000}
    names = {"ternary", "sparse 1/100", "sparse 1/32", "sparse 1/16", "float16", "float32"}
    for label in ("demo", "large"):
        figures = result["models"][label]
        assert set(figures) == names
        for f in figures.values():
            assert {"bits_per_param", "encode_mparams_s", "decode_accumulate_mparams_s",
                    "full_receive_mparams_s", "wire_bytes"} <= set(f)  # fmt: skip
        bits = [figures[n]["bits_per_param"] for n in ("sparse 1/100", "sparse 1/32", "ternary")]
        assert bits == sorted(bits)  # sparser is smaller, and every sparse one below dense
        assert result["ternary_over_float32_encode"][label] > 0
    assert sum(line.startswith("ternary/float32 encode time") for line in lines) == 2
