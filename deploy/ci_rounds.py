"""Wait until a running stack's coordinator has closed N rounds; print what they took.

Run inside the tern image on the compose network (.ci/containers does):
    python3 - N DEVICES [URL] [FLEET_DIR] < deploy/ci_rounds.py
It subscribes to the coordinator's retained metrics as the fleet's observer (the read-only
login; TLS with the fleet CA for an mqtts:// URL) and exits 0 once N rounds closed with
every one of the DEVICES devices contributing (rounds while the stack was still starting
do not count), 1 after the deadline.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

from broker.tls import client_tls
from broker.transport import Message, MqttTransport
from tern import topics
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.logins import Login
from tern.reports import RoundMetrics

DEADLINE_S = 420.0


def main(argv: list[str]) -> int:
    rounds, devices = int(argv[0]), int(argv[1])
    url = argv[2] if len(argv) > 2 else "mqtts://mosquitto:8883"
    fleet_dir = Path(argv[3] if len(argv) > 3 else "/fleet")
    fleet = json.loads((fleet_dir / "fleet.json").read_text())["fleet"]
    login_file = fleet_dir / "observer.json"
    login = Login.from_json(login_file.read_text())
    tls = client_tls(url, login_file, login_file, login.username)
    seen: dict[int, RoundMetrics] = {}  # every round closed
    full: dict[int, RoundMetrics] = {}  # those every device contributed to
    done = threading.Event()

    def on_metrics(message: Message) -> None:
        try:
            m = RoundMetrics.from_json(message.payload)
        except TernError as exc:
            print(f"ci_rounds: bad metrics: {exc}", file=sys.stderr)
            return
        if m.round not in seen:
            seen[m.round] = m
            acc = "-" if m.accuracy is None else f"{m.accuracy:.3f}"
            print(
                f"round {m.round}: {m.contributors} contributors, {m.dropped} dropped, "
                f"accuracy {acc}, {m.round_seconds:.2f} s",
                flush=True,
            )
        if m.contributors == devices:
            full[m.round] = m
        if len(full) >= rounds:
            done.set()

    transport = MqttTransport(
        url, "tern-ci-rounds", login=(login.username, login.password), tls=tls
    )
    transport.subscribe(topics.metrics(fleet, COORDINATOR), on_metrics)
    started = time.monotonic()
    transport.connect(DEADLINE_S)
    ok = done.wait(max(0.0, DEADLINE_S - (time.monotonic() - started)))
    transport.close()
    if not ok:
        print(
            f"ci_rounds: {len(full)} of {rounds} rounds with all {devices} devices"
            f" ({len(seen)} closed) in {DEADLINE_S:g} s",
            file=sys.stderr,
        )
        return 1
    times = [m.round_seconds for m in full.values()]
    print(
        f"stack: {len(full)} rounds with all {devices} devices ({len(seen)} closed),"
        f" median {statistics.median(times):.2f} s per round,"
        f" {time.monotonic() - started:.0f} s waited"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
