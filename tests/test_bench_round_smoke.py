"""The round benchmark keeps running and keeps its JSON contract (figures are not checked)."""

from __future__ import annotations

import json

import pytest

from bench import round as round_bench


def test_round_benchmark_on_amqtt_prints_table_and_json_last_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--devices", "10", "--rounds", "1", "--brokers", "amqtt", "--json"]

    assert round_bench.main(argv) == 0

    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"amqtt", "mosquitto", "ratio_mosquitto_over_amqtt"} <= set(result)
    assert set(result["amqtt"]) == {"10"}
    figures = result["amqtt"]["10"]
    assert {"round_s", "msgs_s", "updates_s"} <= set(figures)
    assert figures["rounds"] == 1
    assert result["mosquitto"] == {}
    assert result["ratio_mosquitto_over_amqtt"] == {}
    assert any(line.startswith("amqtt ") for line in lines)


def test_round_benchmark_rejects_an_unknown_broker() -> None:
    with pytest.raises(SystemExit):
        round_bench.main(["--brokers", "rabbitmq"])
