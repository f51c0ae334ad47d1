"""bench.fleet_scale: real connections per device lose nothing, and its JSON keeps its keys.

Small fleets (CI): the figures are not checked, only that every update sent was counted.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import pytest

from bench import fleet_scale
from bench.fleet_scale_gateway import name_threads
from bench.fleet_scale_procs import split_cpu, summarize_profile
from broker.mosquitto import find_mosquitto
from tests.helpers import unavailable, wait_until

RUN_KEYS = {
    "broker", "devices", "connections", "round_s", "lost", "broker_cpu_s", "broker_rss_mb",
    "gateway_cpu_ms_per_update",
}  # fmt: skip


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    lines = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(lines[-1])
    assert isinstance(doc, dict)
    return doc


def _bench(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    started = time.monotonic()
    assert fleet_scale.main([*argv, "--rounds", "1", "--shared", "", "--json"]) == 0
    assert time.monotonic() - started < 45
    return _last_json(capsys)


def test_fifty_devices_on_one_gateways_amqtt_broker_lose_no_update(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _bench(["--amqtt", "50", "--mosquitto", "0"], capsys)

    assert {"runs", "shared", "limit", "profile"} <= set(out)
    (run,) = out["runs"]
    assert set(run) >= RUN_KEYS
    assert (run["broker"], run["devices"], run["connections"]) == ("amqtt", 50, 50)
    assert run["rounds"] == 1
    assert run["lost"] == 0 and run["unsent"] == 0
    assert run["round_s"] > 0 and run["gateway_cpu_ms_per_update"] is not None


def test_a_hundred_devices_on_two_mosquitto_gateways_lose_no_update(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if find_mosquitto() is None:
        unavailable("mosquitto is not installed")

    out = _bench(["--amqtt", "0", "--mosquitto", "100", "--devices-per-gateway", "50"], capsys)

    (run,) = out["runs"]
    assert set(run) >= RUN_KEYS
    assert (run["broker"], run["gateways"], run["connections"]) == ("mosquitto", 2, 100)
    assert run["lost"] == 0 and run["unsent"] == 0
    counts = run["device_counts"]
    assert counts["acked"] == 2 * 100  # warm-up and measured round, every PUBACK back
    assert counts["live_seals"] == 0  # every update was sealed before the rounds


def test_a_broker_threads_cpu_is_told_from_the_rest_of_its_process() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    burner = threading.Thread(target=spin, name="amqtt-127.0.0.1:0", daemon=True)
    namer = threading.Thread(target=name_threads, args=(stop,), daemon=True)
    burner.start()
    namer.start()
    try:
        before = split_cpu(os.getpid())
        wait_until(lambda: split_cpu(os.getpid())[0] > 0.2, timeout=20.0)
        broker, rest = split_cpu(os.getpid())
    finally:
        stop.set()
        burner.join(5)

    assert broker > 0.2 and before[0] < broker
    assert rest - before[1] < broker - before[0]  # the test's own threads mostly sleep


def test_profile_summary_shares_samples_by_leaf_area_and_thread() -> None:
    lines = [
        "thread (1): gw-loop;feed (broker/loop.py:1);open_envelope (tern/envelope.py:2);"
        "crypto_sign_open (nacl/bindings/crypto_sign.py:3) 30",
        "thread (1): gw-loop;feed (broker/loop.py:1);accumulate_packed (tern/trits.py:4) 10",
        "thread (2): paho;_loop (paho/mqtt/client.py:5) 60",
        "not a sample line",
    ]

    s = summarize_profile(lines)

    assert s.samples == 100
    assert dict(s.by_area) == pytest.approx(
        {"signatures (pynacl)": 0.3, "ternary codec": 0.1, "paho MQTT client": 0.6}
    )
    assert dict(s.by_thread) == pytest.approx({"gw-loop": 0.4, "paho": 0.6})
    assert dict(s.top_total)["feed (broker/loop.py)"] == pytest.approx(0.4)
