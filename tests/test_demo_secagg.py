"""`tern demo --secagg` and `--dp-*` over real MQTT: every cohort aggregates securely, and
what a device sends sniffed on its gateway's broker is a masked vector, not an update."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from broker.transport import Message, MqttTransport
from coordinator.privacy import PrivacyConfig
from demo.run import run_demo
from demo.watching import WatchPoints
from tern import topics
from tern.envelope import Kind, loads_bounded
from tern.errors import TernError
from tern.logins import Login
from tern.messages import Update
from tern.secagg.ring import from_ring, unpack

REPO = Path(__file__).resolve().parent.parent


def test_a_device_s_masked_contribution_sniffed_on_its_gateway_s_broker_is_no_update() -> None:
    sniffed: list[bytes] = []
    lock = threading.Lock()
    sniffers: list[MqttTransport] = []

    def sniff(points: WatchPoints) -> None:
        login = Login.from_json(points.login_file.read_text())  # the observer's
        for i, url in enumerate(points.brokers[1:]):  # each gateway's own broker
            t = MqttTransport(url, f"sniffer-{i}", login=(login.username, login.password))
            t.connect(timeout=10.0)

            def keep(m: Message) -> None:
                with lock:
                    sniffed.append(m.payload)

            t.subscribe(topics.Topic(topics.TopicKind.UPDATE, "demo"), keep)
            sniffers.append(t)

    try:
        result = run_demo(
            devices=4, gateways=2, rounds=2, boards=0, trainer="numpy", out=None,
            privacy=PrivacyConfig(secagg=True), on_ready=sniff,
        )  # fmt: skip
    finally:
        for t in sniffers:
            t.close()

    assert result.to_json()["secagg"] is True
    assert [r["contributors"] for r in result.rounds] == [4, 4]
    masked = []
    for data in sniffed:
        env = loads_bounded(data, 1 << 20)
        kind = env["kind"]
        assert kind in {k.value for k in Kind if k.name.startswith("SA_")} | {"failure"}
        with pytest.raises(TernError):
            Update.from_body(env["body"])
        if kind == Kind.SA_MASKED:
            masked.append(env["body"])
    assert len(masked) == 8  # four devices, two rounds
    n = result.params + 2
    for body in masked:
        values = from_ring(unpack(body["data"], n, body["bits"]), body["bits"])
        # a plain contribution is trits times a weight of at most 8; masked, it spreads
        # over the whole ring
        assert np.mean(np.abs(values) <= 8) < 0.5


def test_demo_command_with_secagg_and_dp_says_so_in_its_json() -> None:
    args = [sys.executable, "-m", "demo", "--devices", "4", "--gateways", "2", "--rounds", "2"]
    done = subprocess.run(
        [*args, "--boards", "0", "--trainer", "numpy", "--secagg", "--dp-epsilon", "8",
         "--dp-noise", "distributed", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["secagg"] is True
    assert result["dp"]["noise"] == "distributed" and result["dp"]["epsilon_budget"] == 8
    assert [r["contributors"] for r in result["rounds"]] == [4, 4]
    eps = [r["epsilon"] for r in result["rounds"]]
    assert 0 < eps[0] < eps[1] <= 8
    assert "secure aggregation in every cohort" in done.stdout
