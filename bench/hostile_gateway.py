"""Part b of bench.hostile: a real gateway process under a flood of hostile messages.

A gateway (`python -m gateway`, its fleet made by `tern fleet init`, its own embedded
broker, a --state-dir) under an embedded upstream broker in this process, with a round
open (this process plays the coordinator): its RSS, then hostile messages of every class
that needs no history (as a compromised device with its own login, on its own update
topic; the model and schedule classes on the upstream topics; stranger connections its
broker refuses), its RSS again, the refusals its metrics count, and one honest round.
"""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from nacl.signing import SigningKey

from bench.hostile_classes import ATTACKER, DEVICES, FLEET, GATEWAY, RUN, AttackClass, Scenario
from broker.embedded import EmbeddedBroker
from broker.limits import BrokerLimits
from broker.transport import Message, MqttTransport
from tern import topics
from tern.cli import main as tern_cli
from tern.envelope import Kind, open_envelope
from tern.errors import TernError
from tern.fleet import COORDINATOR, Fleet, client_id
from tern.keys import signing_key_from_text
from tern.logins import Login
from tern.messages import RoundSchedule, Update
from tern.reports import RoundMetrics

__all__ = ["flood_gateway"]

REPO = Path(__file__).resolve().parents[1]
WAIT = 20.0

# sent first in part b: a gateway verifies a few messages of a sender per round, and these
# cost it most
COSTLIEST = ("update scaled by 100 (norm)", "NaN tensor", "wrong shape", "weight 1e30")


def _fleet_init(directory: Path) -> tuple[Fleet, dict[str, SigningKey], dict[str, Login]]:
    """`tern fleet init` for one gateway and its devices; its files, read back."""
    args = [
        "fleet",
        "init",
        "--fleet",
        FLEET,
        "--gateway",
        f"{GATEWAY}={','.join(DEVICES)}",
        "--out",
        str(directory),
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        if tern_cli(args) != 0:
            raise RuntimeError("tern fleet init failed")
    fleet = Fleet.from_json((directory / "fleet.json").read_text())
    ids = [COORDINATOR, GATEWAY, *DEVICES]
    keys = {i: signing_key_from_text((directory / f"{i}.key").read_text()) for i in ids}
    logins = {i: Login.from_json((directory / f"{i}.login").read_text()) for i in ids}
    logins["observer"] = Login.from_json((directory / "observer.json").read_text())
    return fleet, keys, logins


def _connect_packet(client_id: str, login: tuple[str, str] | None) -> bytes:
    """An MQTT 3.1.1 CONNECT, as a stranger sends it (clean session, 30 s keep-alive)."""

    def field(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    flags = 0x02 | (0xC0 if login else 0)
    body = field(b"MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + field(client_id.encode())
    if login:
        body += field(login[0].encode()) + field(login[1].encode())
    size, length = len(body), b""
    while True:
        byte, size = size & 0x7F, size >> 7
        length += bytes([byte | (0x80 if size else 0)])
        if not size:
            return b"\x10" + length + body


def _stranger(url_port: int, client_id: str, login: tuple[str, str] | None) -> int:
    """One CONNECT; the CONNACK's return code (0: accepted), -1 when the broker hung up."""
    with socket.create_connection(("127.0.0.1", url_port), timeout=5.0) as sock:
        sock.sendall(_connect_packet(client_id, login))
        try:
            ack = sock.recv(4)
        except (TimeoutError, ConnectionError):
            return -1
        return ack[3] if len(ack) == 4 else -1


class _Inbox:
    """Messages received on a subscription, waited for with a deadline."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._cv = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self._cv:
            self.messages.append(message)
            self._cv.notify_all()

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float) -> Message | None:
        with self._cv:
            found: list[Message] = []

            def seen() -> bool:
                found[:] = [m for m in self.messages if predicate(m)]
                return bool(found)

            self._cv.wait_for(seen, timeout)
            return found[0] if found else None


def _rss_mb(proc: Any) -> float:
    return float(proc.memory_info().rss) / (1 << 20)


def _settled_rss(proc: Any, timeout: float = 10.0) -> float:
    """The process's RSS once its CPU use has dropped (it has digested what it got)."""
    deadline = time.monotonic() + timeout
    proc.cpu_percent(None)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if proc.cpu_percent(None) < 5.0:
            break
    return _rss_mb(proc)


@contextlib.contextmanager
def _gateway_process(fleet_dir: Path, upstream: str, state: Path) -> Iterator[tuple[Any, str]]:
    cmd = [
        sys.executable,
        "-m",
        "gateway",
        "--id",
        GATEWAY,
        "--fleet-file",
        str(fleet_dir / "fleet.json"),
        "--key",
        str(fleet_dir / f"{GATEWAY}.key"),
        "--upstream",
        upstream,
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(state),
    ]
    log = (state.parent / "gateway.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log)
    try:
        assert proc.stdout is not None
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(WAIT)
        line = lines[0].decode() if lines else ""
        if " serving on " not in line:
            raise RuntimeError(f"the gateway did not start: {line!r}")
        yield proc, line.strip().rsplit(" ", 1)[1]
    finally:
        proc.terminate()
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)
        log.close()


def flood_gateway(messages: int, strangers: int, seed: int = 0) -> dict[str, Any]:
    """Part b: RSS before and after `messages` hostile messages, the refusals the gateway
    counted, and one honest round after them."""
    with (
        tempfile.TemporaryDirectory(prefix="tern-hostile-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        root = Path(tmp)
        fleet, keys, logins = _fleet_init(root / "fleet")
        s = Scenario(keys, fleet, seed)
        f = FLEET
        upstream = EmbeddedBroker(
            "127.0.0.1", 0, limits=BrokerLimits(unlimited_users=frozenset({COORDINATOR}))
        ).start()
        stack.callback(upstream.stop)

        def client(url: str, client_id: str, user: str) -> MqttTransport:
            t = MqttTransport(
                url,
                client_id,
                login=(logins[user].username, logins[user].password),
                backoff_min=0.05,
                backoff_max=0.5,
                rng=np.random.default_rng(1),
            )
            stack.callback(t.close)
            return t

        coordinator = client(upstream.url, COORDINATOR, COORDINATOR)
        partials, metrics = _Inbox(), _Inbox()
        coordinator.subscribe(topics.partials_to(f, COORDINATOR), partials)
        coordinator.subscribe(topics.metrics(f, GATEWAY), metrics)
        coordinator.connect(WAIT)
        proc, downstream = stack.enter_context(
            _gateway_process(root / "fleet", upstream.url, root / "state")
        )
        gateway = psutil.Process(proc.pid)
        observer = client(downstream, "bench-observer", "observer")
        relayed = _Inbox()
        observer.subscribe(topics.round_schedule(f), relayed)
        observer.connect(WAIT)

        def open_round(rnd: int, seconds: float, participants: Sequence[str]) -> RoundSchedule:
            schedule = s.make_schedule(rnd, time.time() + seconds, participants)
            coordinator.publish(topics.global_model(f), s.model(rnd), retain=True, wait=True)
            data = s.schedule_message(schedule)
            coordinator.publish(topics.round_schedule(f), data, retain=True, wait=True)
            if relayed.wait_for(lambda m: m.payload == data, WAIT) is None:
                raise RuntimeError(f"the gateway did not relay round {rnd}'s schedule")
            return schedule

        # Round 5 is open; the attacker floods it.
        open_round(s.round, 600.0, DEVICES)
        time.sleep(1.0)
        before = _settled_rss(gateway)
        attacker = client(downstream, client_id(f, ATTACKER), ATTACKER).connect(WAIT)
        classes = sorted(
            (c for c in s.classes() if not c.history), key=lambda c: c.name not in COSTLIEST
        )
        sent: dict[str, int] = {}
        t0 = time.perf_counter()
        for i in range(messages):
            case = classes[i % len(classes)]
            data = case.make(i)
            last = i == messages - 1 or i % 100 == 99
            if case.receiver in ("update", "status", "view"):
                topic = _attack_topic(case)
                attacker.publish(topic, data, retain=case.retained, wait=last)
            else:
                kind = (
                    topics.global_model(f) if case.receiver == "model" else topics.round_schedule(f)
                )
                coordinator.publish(kind, data, wait=last)
            sent[case.receiver] = sent.get(case.receiver, 0) + 1
        refused_connects = 0
        identities = [
            ("stranger", None),
            ("stranger", ("dev-02", "not-its-password")),
            (client_id(f, "dev-02"), None),
            (client_id(f, GATEWAY, "down"), ("x", "y")),
            ("bench-observer-2", ("observer", "wrong")),
        ]
        for k in range(strangers):
            cid, login = identities[k % len(identities)]
            refused_connects += _stranger(int(downstream.rsplit(":", 1)[1]), cid, login) != 0
        flood_seconds = time.perf_counter() - t0
        after = _settled_rss(gateway)

        # Round 6 closes round 5 (its metrics count the flood), then three honest devices.
        honest = DEVICES[1:]
        open_round(s.round + 1, 8.0, honest)
        devices = [client(downstream, client_id(f, d), d).connect(WAIT) for d in honest]
        for d, t in zip(honest, devices, strict=True):
            update = s.update(0, s.update_body(), sender=d, rnd=s.round + 1)
            t.publish(topics.update(f, GATEWAY, d), update, wait=True)
        closed = metrics.wait_for(lambda m: _round_of(m) == s.round + 1, WAIT)
        flood = metrics.wait_for(lambda m: _round_of(m) == s.round, 1.0)
        gateway_key = {GATEWAY: keys[GATEWAY].verify_key}

        def honest_partial(m: Message) -> int:
            """How many devices the gateway's partial of round 6 folds (0: not that)."""
            try:
                env = open_envelope(m.payload, gateway_key, fleet=f, kinds=(Kind.PARTIAL,),
                                    round=s.round + 1, run=RUN)  # fmt: skip
                return Update.from_body(env.body).count
            except TernError:
                return 0

        partial = partials.wait_for(lambda m: honest_partial(m) > 0, 5.0)
        completed, contributors = False, 0
        if closed is not None and partial is not None:
            contributors = RoundMetrics.from_json(closed.payload).contributors
            completed = honest_partial(partial) == len(honest) == contributors
        after_round = _settled_rss(gateway)
        rejected: dict[str, int] = {}
        for m in (flood, closed):
            if m is not None:
                for reason, n in RoundMetrics.from_json(m.payload).rejected.items():
                    rejected[reason] = rejected.get(reason, 0) + n
        return {
            "before_mb": round(before, 2),
            "after_mb": round(after, 2),
            "after_round_mb": round(after_round, 2),
            "delta_mb": round(after - before, 2),
            "delta_after_round_mb": round(after_round - before, 2),
            "sent": {
                "device": sum(sent.get(k, 0) for k in ("update", "status", "view")),
                "upstream": sent.get("model", 0) + sent.get("schedule", 0),
                "stranger_connects": strangers,
            },
            "stranger_connects_refused": refused_connects,
            "flood_seconds": round(flood_seconds, 2),
            "counted": sum(rejected.values()),
            "rejected": dict(sorted(rejected.items())),
            "next_round_completed": completed,
            "next_round_contributors": contributors,
        }


def _attack_topic(case: AttackClass) -> topics.Topic:
    """Where the attacker sends `case` (a device may not publish views: its broker refuses
    them, and counts them)."""
    if case.receiver == "status":
        return topics.status(FLEET, case.topic)
    if case.receiver == "view":
        return topics.view(FLEET, case.topic)
    return topics.update(FLEET, GATEWAY, case.topic)


def _round_of(message: Message) -> int:
    try:
        return RoundMetrics.from_json(message.payload).round
    except TernError:
        return -1
