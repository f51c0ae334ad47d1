"""`tern watch` against a real fleet broker holding retained metrics, status and views."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.fleet_access import broker_policy
from broker.tls import TlsServer
from broker.transport_types import TlsClient
from tern import pki, topics
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER, Login
from tern.members import Members, new_members
from tern.reports import (
    Activity,
    FleetView,
    MemberView,
    Reading,
    Role,
    RoundMetrics,
    State,
    Status,
    ViewState,
)
from tests.mqtt_fixtures import MakeTransport, free_port

FLEET = "plant-7"


@pytest.fixture
def members() -> Members:
    return new_members(
        FLEET, {"gw-1": (COORDINATOR, ["dev-01", "dev-02"])}, rng=np.random.default_rng(3)
    )


@pytest.fixture
def fleet_broker(members: Members) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(port=0, access=AccessControl(broker_policy(members.fleet, COORDINATOR)))
    with broker:
        yield broker


def observer_file(tmp_path: Path, login: Login) -> Path:
    path = tmp_path / "observer.json"
    path.write_text(login.to_json())
    return path


def watch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tern", "watch", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_watch_once_prints_the_rounds_gateways_and_fleet_tree_the_broker_holds(
    tmp_path: Path,
    members: Members,
    fleet_broker: EmbeddedBroker,
    make_transport: MakeTransport,
) -> None:
    url = fleet_broker.url
    coordinator = make_transport(url, COORDINATOR, login=members.login(COORDINATOR))
    gateway = make_transport(url, f"tern-{FLEET}-gw-1-up", login=members.login("gw-1"))
    for r, acc in ((1, 0.5), (2, 0.8125)):
        coordinator.publish(
            topics.metrics(FLEET, COORDINATOR),
            RoundMetrics(COORDINATOR, r, r, 2, 0, {}, 1000, 2000, acc, 0.5, 1.0).to_json(),
            retain=True,
            wait=True,
        )
    coordinator.publish(
        topics.status(FLEET, COORDINATOR),
        Status(COORDINATOR, "coordinator", State.ONLINE, "0.1.0").to_json(),
        retain=True,
        wait=True,
    )
    gateway.publish(
        topics.metrics(FLEET, "gw-1"),
        RoundMetrics("gw-1", 2, 2, 2, 0, {"stale_round": 3}).to_json(),
        retain=True,
        wait=True,
    )
    members_view = {
        "dev-01": MemberView(Role.DEVICE, ViewState.ONLINE, Activity.TRAINING, 2),
        "dev-02": MemberView(Role.DEVICE, ViewState.OFFLINE, last_error="kernel_fuel"),
        "esp-1": MemberView(Role.BOARD, ViewState.ONLINE, telemetry=Reading(4, 0.75, 812, 2, 9)),
    }
    gateway.publish(
        topics.view(FLEET, "gw-1"),
        FleetView("gw-1", COORDINATOR, 1_796_000_000.0, 2, members_view).to_json(),
        retain=True,
        wait=True,
    )
    login = observer_file(tmp_path, members.logins[OBSERVER])

    done = watch("--broker", url, "--fleet", FLEET, "--login", str(login), "--once",
                 "--timeout", "10", "--width", "160")  # fmt: skip

    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "0.812" in out  # the retained (last) round
    assert "stale_round 3" in out  # the gateway's refusals
    assert "coordinator coordinator online" in out
    assert "gw-1 gateway" in out
    assert "dev-01 device online  training, round 2" in out
    assert "dev-02 device offline  (kernel_fuel)" in out
    assert "esp-1 board online  v2 label 4 (0.75) 812 us #9" in out


def test_watch_refused_by_the_broker_says_so_and_exits_1(
    tmp_path: Path, members: Members, fleet_broker: EmbeddedBroker
) -> None:
    login = observer_file(tmp_path, Login(OBSERVER, "not-the-password"))

    done = watch("--broker", fleet_broker.url, "--fleet", FLEET, "--login", str(login), "--once",
                 "--timeout", "5")  # fmt: skip

    assert done.returncode == 1
    assert "tern watch:" in done.stderr and "refused" in done.stderr


def test_watch_with_a_file_that_is_not_a_login_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "observer.json"
    bad.write_text('{"username": "observer"}')

    done = watch("--broker", "mqtt://127.0.0.1:1", "--fleet", FLEET, "--login", str(bad), "--once")

    assert done.returncode == 1
    assert "is not a login file" in done.stderr


def test_the_demo_prints_where_to_watch_and_keeps_its_json_last_line() -> None:
    port = free_port()

    done = subprocess.run(
        [sys.executable, "-m", "tern", "demo", "--rounds", "2", "--devices", "2", "--gateways",
         "1", "--boards", "0", "--trainer", "numpy", "--port", str(port), "--dashboard", "--json"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["round"] for r in json.loads(done.stdout.splitlines()[-1])["rounds"]] == [1, 2]
    watch_lines = [line for line in done.stderr.splitlines() if line.startswith("watch: ")]
    text = "\n".join(watch_lines)
    assert f"broker mqtt://127.0.0.1:{port}, fleet demo" in text
    assert f"tern watch --broker mqtt://127.0.0.1:{port} --fleet demo --login " in text
    assert re.search(r"broker over WebSockets ws://127\.0\.0\.1:\d+/mqtt", text)
    assert re.search(r"dashboard http://127\.0\.0\.1:\d+/", text)


def test_watch_over_tls_trusts_the_fleet_ca_beside_the_observer_login(
    tmp_path: Path, members: Members, make_transport: MakeTransport
) -> None:
    ca = pki.new_ca(FLEET)
    server = pki.server_cert(ca, COORDINATOR, ["127.0.0.1"])
    files = {"ca.crt": ca.cert_pem, "server.crt": server.cert_pem, "server.key": server.key_pem}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    login = observer_file(tmp_path, members.logins[OBSERVER])  # ca.crt is beside it
    tls = TlsServer(str(tmp_path / "server.crt"), str(tmp_path / "server.key"))
    access = AccessControl(broker_policy(members.fleet, COORDINATOR))
    with EmbeddedBroker(port=0, access=access, tls=tls) as broker:
        coordinator = make_transport(
            broker.url,
            COORDINATOR,
            login=members.login(COORDINATOR),
            tls=TlsClient(str(tmp_path / "ca.crt")),
        )
        coordinator.publish(
            topics.metrics(FLEET, COORDINATOR),
            RoundMetrics(COORDINATOR, 7, 7, 2, 0, accuracy=0.6875).to_json(),
            retain=True,
            wait=True,
        )

        done = watch("--broker", broker.url, "--fleet", FLEET, "--login", str(login), "--once",
                     "--timeout", "10", "--width", "160")  # fmt: skip

    assert broker.url.startswith("mqtts://")
    assert done.returncode == 0, done.stderr
    assert "0.688" in done.stdout
