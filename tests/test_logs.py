"""Log lines people can read: one line a round, a summary, -q and --log-json.

The formatting (broker.logs) is checked on its own, then on real processes: a coordinator
with --log-json, a gateway and a device with -q, under a top broker with the fleet's
rights, whose round lines must say what the coordinator's metrics say.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.fleet_access import broker_policy
from broker.limits import fleet_limits
from broker.logs import RunTally, human_bytes, log_device_round, log_round, setup_logging
from broker.mosquitto import free_port
from broker.transport import format_url
from tern import topics
from tern.fleet import COORDINATOR
from tern.reports import FleetView, RoundMetrics, ViewState
from tern.rounds.device import RoundOutcome
from tests.fleet_fixtures import build_fleet, device_data, write_fleet
from tests.helpers import wait_until
from tests.mqtt_fixtures import Inbox, MakeTransport
from tests.process_helpers import Spawned, component_args

WAIT = 60.0
REPR = re.compile(r"[{}\[\]]|\(\'|RoundMetrics|Status\(|<\w+\.")  # dicts, lists, reprs

METRICS = RoundMetrics(
    component="coordinator", round=12, model_version=12, contributors=20, dropped=1,
    rejected={"bad_signature": 2, "duplicate": 1}, bytes_up=68_100, bytes_down=122_000,
    accuracy=0.8125, loss=0.55, round_seconds=1.94, failed={"kernel_fuel": 1},
)  # fmt: skip


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    yield stream
    logging.getLogger().handlers.clear()


def test_a_round_line_says_what_the_metrics_say_without_reprs(logged: io.StringIO) -> None:
    setup_logging("coordinator", stream=logged)

    log_round(logging.getLogger("coordinator"), METRICS)

    line = logged.getvalue().strip()
    assert line.endswith(
        "round 12  acc 0.812  loss 0.55  contributors 20  dropped 1  failed 1 (kernel_fuel 1)"
        "  rejected 3 (bad_signature 2, duplicate 1)  up 68.1 KB  down 122 KB  1.9 s"
    )
    assert not REPR.search(line)


def test_a_gateway_s_line_names_it_and_has_no_accuracy(logged: io.StringIO) -> None:
    setup_logging("gw-1", stream=logged)
    m = RoundMetrics("gw-1", 3, 2, 2, 0, {}, 1_000, 2_000, round_seconds=0.5)

    log_round(logging.getLogger("gateway"), m, who="gateway gw-1")

    line = logged.getvalue().strip()
    assert line.endswith("gateway gw-1: round 3  contributors 2  dropped 0  rejected 0  up 1 KB"
                         "  down 2 KB  0.5 s")  # fmt: skip


def test_with_log_json_every_line_is_an_object_with_the_round_s_fields(
    logged: io.StringIO,
) -> None:
    setup_logging("gw-1", json_lines=True, stream=logged)
    log = logging.getLogger("gateway")

    log_round(log, METRICS)
    log.warning("a plain line with %s", "an argument")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")

    objects = [json.loads(line) for line in logged.getvalue().splitlines()]
    assert [o["event"] for o in objects] == ["round", "log", "log"]
    assert all(o["component"] == "gw-1" and o["t"].endswith("Z") for o in objects)
    r = objects[0]
    assert (r["level"], r["round"], r["contributors"], r["bytes_up"], r["accuracy"]) == (
        "info",
        12,
        20,
        68_100,
        0.8125,
    )
    assert r["rejected"] == METRICS.rejected and r["failed"] == METRICS.failed
    assert objects[1]["message"] == "a plain line with an argument"
    assert "ValueError: boom" in objects[2]["exception"]


def test_quiet_keeps_warnings_and_drops_round_lines(logged: io.StringIO) -> None:
    setup_logging("dev-01", quiet=True, stream=logged)
    log = logging.getLogger("device")

    log_device_round(log, "dev-01", RoundOutcome(3, 3, 40, 3_400, 0.25))
    log_device_round(
        log, "dev-01", RoundOutcome(4, 4, 40, error="out of fuel", reason="kernel_fuel")
    )

    (line,) = logged.getvalue().splitlines()
    assert line.endswith("device dev-01: round 4  skipped: kernel_fuel: out of fuel")


def test_a_device_line_says_what_it_trained_and_sent(logged: io.StringIO) -> None:
    setup_logging("dev-01", stream=logged)

    log_device_round(logging.getLogger("device"), "dev-01", RoundOutcome(3, 3, 40, 3_412, 0.25))

    assert (
        logged.getvalue()
        .strip()
        .endswith("device dev-01: round 3  trained 40 samples in 0.25 s  sent 3.41 KB")
    )


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 B"), (999, "999 B"), (1_000, "1 KB"), (68_100, "68.1 KB"),
                    (122_400, "122 KB"), (2_500_000, "2.5 MB"), (3e9, "3 GB")],
)  # fmt: skip
def test_bytes_read_as_people_write_them(n: float, text: str) -> None:
    assert human_bytes(n) == text


def test_the_summary_adds_up_the_rounds() -> None:
    tally = RunTally()
    for r, acc in ((1, 0.5), (2, 0.75), (3, 0.625)):
        tally.add(
            RoundMetrics("coordinator", r, r, 2, 0, {"duplicate": 1}, 100, 1_000, acc, 1.0, 2.0)
        )

    fields = tally.fields(7.0)

    assert (fields["rounds"], fields["best_accuracy"], fields["best_round"]) == (3, 0.75, 2)
    assert (fields["final_accuracy"], fields["bytes_up"], fields["bytes_down"]) == (
        0.625,
        300,
        3_000,
    )
    assert fields["rejected"] == {"duplicate": 3} and fields["round_seconds"] == 6.0
    assert tally.text(7.0).startswith("summary: 3 rounds in 7.0 s  best acc 0.750 (round 2)")


# -- real processes ---------------------------------------------------------------------


def test_processes_log_one_line_a_round_that_matches_the_metrics(
    tmp_path: Path, stack: ExitStack, make_transport: MakeTransport
) -> None:
    kit = build_fleet({"gw-1": (COORDINATOR, ["dev-01"])}, "log-fleet")
    kit_dir = tmp_path / "kit"
    write_fleet(kit, kit_dir)
    f = kit.fleet.fleet
    top = EmbeddedBroker(port=0, access=AccessControl(broker_policy(kit.fleet, COORDINATOR)),
                         limits=fleet_limits(kit.fleet, COORDINATOR)).start()  # fmt: skip
    stack.callback(top.stop)
    metrics, views = Inbox(), Inbox()
    observer = make_transport(top.url, "watcher", login=kit.login("observer"))
    observer.subscribe(topics.metrics(f, COORDINATOR), metrics)
    observer.subscribe(topics.view_all(f), views)
    port = free_port("127.0.0.1")
    args = component_args("gateway", kit_dir, top.url, tmp_path)
    args[args.index("127.0.0.1:0")] = f"127.0.0.1:{port}"
    gateway = Spawned([*args, "-q"], stack)
    down_url = format_url("127.0.0.1", port)
    device = Spawned([*component_args("device", kit_dir, down_url, tmp_path), "-q"], stack)

    def device_online() -> bool:
        last = [FleetView.from_json(m.payload) for m in list(views.messages)][-1:]
        return bool(last) and last[0].members["dev-01"].state is ViewState.ONLINE

    wait_until(device_online, WAIT)
    x, y = device_data("dev-01")
    np.savez(tmp_path / "test.npz", x=x, y=np.minimum(y, 2))
    test_set = ["--test-set", str(tmp_path / "test.npz")]
    args = component_args("coordinator", kit_dir, top.url, tmp_path)
    flags = ["--rounds", "2", "--round-timeout", "10", *test_set, "--log-json"]
    coordinator = Spawned([*args, *flags], stack)
    assert coordinator.popen.wait(WAIT) == 0

    objects = [json.loads(line) for line in coordinator.stderr().splitlines()]
    rounds = [o for o in objects if o["event"] == "round"]
    (summary,) = [o for o in objects if o["event"] == "summary"]
    sent = {m.round: m for m in map(RoundMetrics.from_json, (x.payload for x in metrics.messages))}
    assert [o["round"] for o in rounds] == [1, 2] and set(sent) >= {1, 2}
    for o in rounds:
        m = sent[o["round"]]
        assert {k: o[k] for k in ("contributors", "dropped", "rejected", "bytes_up", "bytes_down",
                                  "accuracy", "loss", "round_seconds")} == {
            "contributors": m.contributors, "dropped": m.dropped, "rejected": m.rejected,
            "bytes_up": m.bytes_up, "bytes_down": m.bytes_down, "accuracy": m.accuracy,
            "loss": m.loss, "round_seconds": m.round_seconds,
        }  # fmt: skip
        assert o["message"].startswith(f"round {m.round}  acc {m.accuracy:.3f}")
        assert o["contributors"] == 1
    assert summary["rounds"] == 2
    assert summary["bytes_up"] == sum(sent[r].bytes_up for r in (1, 2))
    assert summary["final_accuracy"] == sent[2].accuracy
    gateway.popen.terminate()
    device.popen.terminate()
    assert gateway.popen.wait(WAIT) == 0 and device.popen.wait(WAIT) == 0
    quiet = [line for p in (gateway, device) for line in p.stderr().splitlines()]
    assert [line for line in quiet if " INFO " in line] == []
