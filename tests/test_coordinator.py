"""The coordinator against a real broker: gateways are simulated by sealing partials.

Every wait has a deadline; rounds are short (1-5 s timeouts) and most close early,
when every expected gateway has reported.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nacl.signing import SigningKey

from broker.transport import Message, MqttTransport
from coordinator import Coordinator, CoordinatorConfig, CoordinatorError, TestSet
from coordinator.__main__ import main
from coordinator.store import RoundRecord, StateStore
from coordinator.strategy import sample_participants
from kernels.reference import init_weights, mlp_spec
from tern import topics
from tern.aggregate import Partial, fold_sorted, mean
from tern.codecs import CodecName, Float32Codec, codec_for
from tern.envelope import Envelope, Kind, open_envelope, seal
from tern.fleet import COORDINATOR, Fleet, GatewayEntry
from tern.keys import signing_key_to_text
from tern.messages import GlobalModel, RoundSchedule, Update, encode_update
from tern.reports import RoundMetrics, State, Status
from tern.tensors import TypedArrayTag, encode_array
from tests.mqtt_fixtures import Inbox, MakeTransport, RunningBroker

FLEET = "plant-7"
LAYERS = (4, 3, 2)
SPEC = mlp_spec(LAYERS)
WAIT = 10.0
COORD_KEY = SigningKey(bytes([1]) * 32)
GW_KEYS = {f"gw-{i}": SigningKey(bytes([1 + i]) * 32) for i in (1, 2, 3)}


def make_fleet(gateways: int = 2, devices: int = 2) -> Fleet:
    entries = {}
    for g in range(1, gateways + 1):
        devs = {
            f"dev-{g}{d}": SigningKey(bytes([100 + 10 * g + d]) * 32).verify_key
            for d in range(devices)
        }
        entries[f"gw-{g}"] = GatewayEntry(GW_KEYS[f"gw-{g}"].verify_key, COORDINATOR, devs)
    return Fleet(FLEET, COORD_KEY.verify_key, entries)


def config(broker: RunningBroker, state: Path, **overrides: Any) -> CoordinatorConfig:
    values: dict[str, Any] = {
        "broker_url": broker.url,
        "state_dir": state,
        "layers": LAYERS,
        "init_seed": 5,
        "codec": CodecName.FLOAT32,
        "round_timeout": 5.0,
        "min_contributors": 1,
        "seed": 3,
    }
    values.update(overrides)
    return CoordinatorConfig(**values)


def config_for_url(url: str, state: Path, **overrides: Any) -> CoordinatorConfig:
    """A config for a broker that need not be running (the coordinator is not started)."""

    class _Url:
        def __init__(self, url: str) -> None:
            self.url = url

    return config(_Url(url), state, **overrides)  # type: ignore[arg-type]


def gw_partial(gw: str, seed: int, weight: float = 3.0, count: int = 2) -> Partial:
    values = np.random.default_rng(seed).standard_normal(SPEC.size, dtype=np.float32)
    return Partial(values, weight, count)


def sealed_partial(
    gw: str,
    round: int,
    model: int,
    partial: Partial,
    *,
    key: SigningKey | None = None,
    fleet: str = FLEET,
    body: object = None,
    run: int,
) -> bytes:
    if body is None:
        body = encode_update(Float32Codec(), SPEC, partial)[0].to_body()
    env = Envelope(Kind.PARTIAL, fleet, round, model, gw, body, run=run)
    return seal(env, key or GW_KEYS[gw])


def _schedule_envelope(message: Message) -> Envelope:
    return open_envelope(
        message.payload,
        {COORDINATOR: COORD_KEY.verify_key},
        fleet=FLEET,
        kinds={Kind.SCHEDULE},
    )


def schedule_of(message: Message) -> RoundSchedule:
    return RoundSchedule.from_body(_schedule_envelope(message).body)


def run_of(message: Message) -> int:
    """The coordinator's run, as its schedule carries it (partials must carry the same)."""
    return _schedule_envelope(message).run


def model_of(message: Message) -> tuple[int, int, GlobalModel]:
    env = open_envelope(
        message.payload, {COORDINATOR: COORD_KEY.verify_key}, fleet=FLEET, kinds={Kind.MODEL}
    )
    return env.round, env.model_version, GlobalModel.from_body(env.body)


class Watcher:
    """A dashboard-like client: inboxes for schedule, model, metrics and status."""

    def __init__(self, make_transport: MakeTransport, broker: RunningBroker) -> None:
        self.schedules, self.models, self.metrics, self.status = Inbox(), Inbox(), Inbox(), Inbox()
        self.transport = make_transport(broker.url, "watcher")
        self.run = 0  # the coordinator's run, once a schedule was seen
        self.transport.subscribe(topics.round_schedule(FLEET), self.schedules)
        self.transport.subscribe(topics.global_model(FLEET), self.models)
        self.transport.subscribe(topics.metrics(FLEET, COORDINATOR), self.metrics)
        self.transport.subscribe(topics.status_all(FLEET), self.status)

    def schedule(self, round: int, *, live: bool = True) -> RoundSchedule:
        m = self.schedules.wait_for(
            lambda m: (not live or not m.retain) and schedule_of(m).round == round, WAIT
        )
        self.run = run_of(m)
        return schedule_of(m)

    def model(self, round: int, *, live: bool = True) -> tuple[int, int, GlobalModel]:
        m = self.models.wait_for(
            lambda m: (not live or not m.retain) and model_of(m)[0] == round, WAIT
        )
        return model_of(m)

    def round_metrics(self, round: int) -> RoundMetrics:
        m = self.metrics.wait_for(lambda m: RoundMetrics.from_json(m.payload).round == round, WAIT)
        return RoundMetrics.from_json(m.payload)

    def send(self, gw: str, payload: bytes) -> None:
        self.transport.publish(topics.partial(FLEET, COORDINATOR, gw), payload, wait=True)


class AutoGateways:
    """Answers every live schedule of `rounds` (all when None) with a partial per gateway."""

    def __init__(
        self,
        transport: MqttTransport,
        gateways: list[str],
        rounds: set[int] | None = None,
    ) -> None:
        self.transport, self.gateways, self.rounds = transport, gateways, rounds
        self.answered: set[int] = set()
        self._lock = threading.Lock()
        transport.subscribe(topics.round_schedule(FLEET), self)

    def __call__(self, message: Message) -> None:
        if message.retain:
            return
        s = schedule_of(message)
        with self._lock:
            if s.round in self.answered or (self.rounds is not None and s.round not in self.rounds):
                return
            self.answered.add(s.round)
        codec = codec_for(s.partials, density=s.density)  # as a gateway encodes its partial
        for i, gw in enumerate(self.gateways):
            part = gw_partial(gw, s.round * 10 + i)
            body = encode_update(codec, SPEC, part)[0].to_body()
            payload = sealed_partial(gw, s.round, s.model_version, part, run=run_of(message),
                                     body=body)  # fmt: skip
            self.transport.publish(topics.partial(FLEET, COORDINATOR, gw), payload)


@pytest.fixture
def running() -> Iterator[Callable[[Coordinator], Coordinator]]:
    """Start coordinators; each is stopped after the test, even when it fails."""
    made: list[Coordinator] = []

    def start(c: Coordinator) -> Coordinator:
        made.append(c)
        return c.start()

    yield start
    for c in made:
        c.stop()


# -- a round -----------------------------------------------------------------------------


def test_round_closes_when_every_gateway_reported_with_weights_plus_mean(
    any_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, any_broker)
    c = running(Coordinator(config(any_broker, tmp_path, rounds=2), make_fleet(), COORD_KEY))
    s = watcher.schedule(1)
    _, version, model = watcher.model(1)
    parts = {"gw-1": gw_partial("gw-1", 1, 3.0, 2), "gw-2": gw_partial("gw-2", 2, 5.0, 1)}

    for gw in ("gw-2", "gw-1"):  # arrival order must not matter
        watcher.send(gw, sealed_partial(gw, s.round, s.model_version, parts[gw], run=watcher.run))
    record = c.wait_for_round(1, WAIT)

    expected = model.weights + mean(fold_sorted(parts.items(), SPEC.size))
    assert (s.model_version, version, s.participants) == (0, 0, None)
    assert model.weights.tobytes() == init_weights(SPEC, np.random.default_rng(5)).tobytes()
    assert record.ok and record.model_version == 1 and record.contributors == 3
    assert record.round_seconds < 5.0  # closed early, not at the deadline
    assert c.weights.tobytes() == expected.tobytes()
    assert watcher.model(2)[2].weights.tobytes() == expected.tobytes()
    assert StateStore(tmp_path).load_model(1, SPEC.size)[0].tobytes() == expected.tobytes()
    metrics = watcher.round_metrics(1)
    assert (metrics.component, metrics.model_version, metrics.contributors) == (COORDINATOR, 1, 3)
    assert metrics.bytes_up > 0 and metrics.bytes_down > 0 and metrics.rejected == {}


def test_the_last_rounds_model_is_published_when_the_run_ends(
    any_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    """No next round will carry it, yet gateways derive their boards' models from it."""
    watcher = Watcher(make_transport, any_broker)
    AutoGateways(make_transport(any_broker.url, "gateways"), ["gw-1", "gw-2"])
    c = running(Coordinator(config(any_broker, tmp_path, rounds=1), make_fleet(), COORD_KEY))

    record = c.wait_for_round(1, WAIT)
    final = watcher.models.wait_for(lambda m: model_of(m)[1] == record.model_version, WAIT)

    assert record.ok and record.model_version == 1
    assert model_of(final)[0] == 1 and final.retain is False
    assert model_of(final)[2].weights.tobytes() == c.weights.tobytes()


def test_coordinator_announces_itself_online(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)

    running(Coordinator(config(amqtt_broker, tmp_path), make_fleet(), COORD_KEY))

    m = watcher.status.wait_for(lambda m: Status.from_json(m.payload).state is State.ONLINE, WAIT)
    assert Status.from_json(m.payload).role == "coordinator"


def test_round_closes_at_the_deadline_with_a_gateway_missing(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    cfg = config(amqtt_broker, tmp_path, rounds=1, round_timeout=1.0)
    c = running(Coordinator(cfg, make_fleet(), COORD_KEY))
    s = watcher.schedule(1)

    watcher.send(
        "gw-1", sealed_partial("gw-1", 1, 0, gw_partial("gw-1", 1, 2.0, 1), run=watcher.run)
    )
    record = c.wait_for_round(1, WAIT)

    assert record.ok and record.model_version == 1
    assert record.accepted == ("gw-1",) and record.expected == ("gw-1", "gw-2")
    assert record.contributors == 1 and record.dropped == 3  # 4 devices, 1 folded
    assert record.round_seconds >= 0.9
    assert s.deadline > 0
    assert c.wait_finished(WAIT)
    assert watcher.round_metrics(1).dropped == 3


def test_round_with_too_few_contributors_fails_and_keeps_the_model(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    c = running(
        Coordinator(config(amqtt_broker, tmp_path, min_contributors=5), make_fleet(), COORD_KEY)
    )
    before = c.weights
    watcher.schedule(1)

    for gw in ("gw-1", "gw-2"):
        watcher.send(gw, sealed_partial(gw, 1, 0, gw_partial(gw, 1, 2.0, 2), run=watcher.run))
    record = c.wait_for_round(1, WAIT)

    assert not record.ok and record.contributors == 4
    assert record.model_version == 0 and c.model_version == 0
    assert c.weights.tobytes() == before.tobytes()
    again = watcher.schedule(2)
    assert again.model_version == 0
    assert not (tmp_path / "models" / "v1.npy").exists()


def test_bad_partials_are_counted_by_reason_and_the_round_completes(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    c = running(Coordinator(config(amqtt_broker, tmp_path, rounds=2), make_fleet(), COORD_KEY))
    watcher.schedule(1)
    for gw in ("gw-1", "gw-2"):
        watcher.send(gw, sealed_partial(gw, 1, 0, gw_partial(gw, 1), run=watcher.run))
    c.wait_for_round(1, WAIT)
    watcher.schedule(2)
    good = gw_partial("gw-1", 2)
    nan = Update(
        CodecName.FLOAT32,
        1.0,
        1,
        tuple(
            encode_array(np.full(t.shape, np.nan, dtype=np.float32), TypedArrayTag.FLOAT32_LE)
            for t in SPEC.tensors
        ),
    ).to_body()
    other_spec = mlp_spec((4, 2))
    wrong_shape = encode_update(
        Float32Codec(), other_spec, Partial(np.ones(other_spec.size, np.float32), 1.0, 1)
    )[0].to_body()
    run = watcher.run
    bad = [  # three from each gateway: a sender's messages are verified only a few times
        ("gw-1", b"\x00 not cbor \xff"),
        ("gw-1", sealed_partial("gw-1", 2, 1, good, body=nan, run=run)),
        ("gw-1", sealed_partial("gw-1", 2, 1, good, body=wrong_shape, run=run)),
        ("gw-2", sealed_partial("gw-2", 1, 0, good, run=run)),  # stale round
        ("gw-2", sealed_partial("gw-2", 2, 1, good, fleet="other-fleet", run=run)),
        ("gw-2", sealed_partial("gw-2", 2, 1, good, key=GW_KEYS["gw-1"], run=run)),  # forged
    ]

    for gw, payload in bad:
        watcher.send(gw, payload)
    watcher.send("gw-1", sealed_partial("gw-1", 2, 1, good, run=run))
    watcher.send("gw-2", sealed_partial("gw-2", 2, 1, gw_partial("gw-2", 2), run=run))
    record = c.wait_for_round(2, WAIT)

    expected = {
        "malformed": 1,
        "non_finite": 1,
        "wrong_shape": 1,
        "stale_round": 1,
        "wrong_fleet": 1,
        "bad_signature": 1,
    }
    assert record.ok and record.model_version == 2 and record.contributors == 4
    assert record.rejected == expected
    assert watcher.round_metrics(2).rejected == expected
    assert np.isfinite(c.weights).all()


def test_sampling_with_a_seed_is_deterministic_and_respects_the_fraction(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    fleet = make_fleet(gateways=3, devices=4)
    cfg = config(amqtt_broker, tmp_path / "a", fraction=0.25, seed=11, round_timeout=1.0)
    first = running(Coordinator(cfg, fleet, COORD_KEY))
    s1 = watcher.schedule(1)
    first.stop()
    watcher.schedules.clear()

    second = Coordinator(
        config(amqtt_broker, tmp_path / "b", fraction=0.25, seed=11, round_timeout=1.0, rounds=1),
        fleet,
        COORD_KEY,
    )
    running(second)
    s2 = watcher.schedule(1)
    record = second.wait_for_round(1, WAIT)

    want = sample_participants(fleet.devices, 0.25, np.random.default_rng([11, 1]))
    assert want is not None and len(want) == 3  # ceil(0.25 * 12)
    assert s1.participants == s2.participants == want
    gateways = sorted({fleet.gateway_of(d) for d in want})
    assert list(record.expected) == gateways
    assert not record.ok and record.dropped == 3  # nobody answered


# -- persistence -------------------------------------------------------------------------


def test_restarted_coordinator_resumes_after_the_last_round_with_the_same_model(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    AutoGateways(make_transport(amqtt_broker.url, "gateways"), ["gw-1", "gw-2"])
    first = running(
        Coordinator(
            config(amqtt_broker, tmp_path, rounds=2, server_momentum=0.5), make_fleet(), COORD_KEY
        )
    )
    assert first.wait_finished(WAIT)
    saved = first.weights
    first.stop()

    second = Coordinator(
        config(amqtt_broker, tmp_path, server_momentum=0.5), make_fleet(), COORD_KEY
    )
    assert (second.next_round, second.model_version) == (3, 2)
    assert second.weights.tobytes() == saved.tobytes()
    running(second)
    s = watcher.schedule(3)
    _, version, model = watcher.model(3)
    record = second.wait_for_round(3, WAIT)

    assert (s.model_version, version) == (2, 2)
    assert model.weights.tobytes() == saved.tobytes()
    assert record.ok and record.base_version == 2 and record.model_version == 3


def test_a_round_open_when_the_coordinator_stopped_runs_again_after_restart(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    AutoGateways(make_transport(amqtt_broker.url, "gateways-1"), ["gw-1", "gw-2"], {1})
    first = running(
        Coordinator(config(amqtt_broker, tmp_path, round_timeout=30.0), make_fleet(), COORD_KEY)
    )
    first.wait_for_round(1, WAIT)
    watcher.schedule(2)
    after_one = first.weights
    first.stop()  # round 2 is open
    watcher.schedules.clear()

    # a fresh client: the first one may still be handed the abandoned round 2's schedule
    AutoGateways(make_transport(amqtt_broker.url, "gateways-2"), ["gw-1", "gw-2"], {2})
    second = Coordinator(config(amqtt_broker, tmp_path, rounds=2), make_fleet(), COORD_KEY)
    assert (second.next_round, second.model_version) == (2, 1)
    assert not (tmp_path / "rounds" / "2.json").exists()
    running(second)
    s = watcher.schedule(2)
    record = second.wait_for_round(2, WAIT)

    assert s.model_version == 1
    assert second.records[2].base_version == 1 and record.ok
    assert StateStore(tmp_path).load_model(1, SPEC.size)[0].tobytes() == after_one.tobytes()
    assert sorted(StateStore(tmp_path).round_numbers()) == [1, 2]


def test_coordinator_refuses_a_key_that_is_not_the_fleets(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(broker_url="mqtt://127.0.0.1:1", state_dir=tmp_path, layers=LAYERS)

    with pytest.raises(CoordinatorError):
        Coordinator(cfg, make_fleet(), GW_KEYS["gw-1"])


def test_evaluates_on_the_test_set_when_given_one(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    AutoGateways(make_transport(amqtt_broker.url, "gateways"), ["gw-1", "gw-2"])
    rng = np.random.default_rng(0)
    test_set = TestSet(rng.standard_normal((20, 4), dtype=np.float32), rng.integers(0, 2, 20))

    c = running(
        Coordinator(
            config(amqtt_broker, tmp_path, rounds=1), make_fleet(), COORD_KEY, test_set=test_set
        )
    )
    c.wait_for_round(1, WAIT)

    metrics = watcher.round_metrics(1)
    assert metrics.accuracy is not None and 0 <= metrics.accuracy <= 1
    assert metrics.loss is not None and metrics.loss > 0


def test_command_line_runs_the_configured_rounds(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    AutoGateways(make_transport(amqtt_broker.url, "gateways"), ["gw-1", "gw-2"])
    (tmp_path / "fleet.json").write_text(make_fleet().to_json())
    (tmp_path / "coordinator.key").write_text(signing_key_to_text(COORD_KEY))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", x=rng.standard_normal((10, 4)), y=rng.integers(0, 2, 10))

    code = main(
        [
            "--broker",
            amqtt_broker.url,
            "--fleet-file",
            str(tmp_path / "fleet.json"),
            "--key",
            str(tmp_path / "coordinator.key"),
            "--state-dir",
            str(tmp_path / "state"),
            "--layers",
            "4,3,2",
            "--codec",
            "float32",
            "--rounds",
            "2",
            "--round-timeout",
            "5",
            "--test-set",
            str(tmp_path / "test.npz"),
        ]
    )

    assert code == 0
    assert watcher.round_metrics(2).model_version == 2
    assert StateStore(tmp_path / "state").round_numbers() == [1, 2]


def test_rounds_open_no_sooner_than_the_interval_and_report_to_on_round(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    AutoGateways(make_transport(amqtt_broker.url, "gateways"), ["gw-1", "gw-2"])
    seen: list[int] = []
    cfg = config(amqtt_broker, tmp_path, rounds=2, interval=0.6)

    c = running(Coordinator(cfg, make_fleet(), COORD_KEY, on_round=lambda r: seen.append(r.round)))
    assert c.wait_finished(WAIT)

    gap = watcher.schedule(2).deadline - watcher.schedule(1).deadline
    assert gap >= 0.55
    assert seen == [1, 2]


def test_a_model_written_without_its_round_record_is_not_resumed(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    ones = np.ones(SPEC.size, dtype=np.float32)
    store.save_model(0, ones, ones * 0)
    store.save_model(1, ones * 2, ones * 0)  # crashed before rounds/1.json

    snapshot = store.latest(SPEC.size)

    assert snapshot is not None
    assert (snapshot.last_round, snapshot.model_version) == (0, 0)
    assert snapshot.weights.tobytes() == ones.tobytes()


def test_the_command_stops_cleanly_on_sigterm(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    (tmp_path / "fleet.json").write_text(make_fleet().to_json())
    (tmp_path / "coordinator.key").write_text(signing_key_to_text(COORD_KEY))
    args = [
        sys.executable, "-m", "coordinator", "--broker", amqtt_broker.url,
        "--fleet-file", str(tmp_path / "fleet.json"), "--key", str(tmp_path / "coordinator.key"),
        "--state-dir", str(tmp_path / "state"), "--layers", "4,3,2", "--round-timeout", "30",
    ]  # fmt: skip
    process = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1])
    try:
        watcher.schedule(1)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=WAIT)

    assert code == 0
    offline = watcher.status.wait_for(
        lambda m: Status.from_json(m.payload).state is State.OFFLINE, WAIT
    )
    assert Status.from_json(offline.payload).detail == "shutdown"
    assert StateStore(tmp_path / "state").round_numbers() == []


# -- runs, and nothing non-finite --------------------------------------------------------


def test_a_state_dir_keeps_its_run_and_a_fresh_one_gets_a_higher_run(tmp_path: Path) -> None:
    first = StateStore(tmp_path / "a").run(lambda: 1_800_000_000.0)
    again = StateStore(tmp_path / "a").run(lambda: 1_900_000_000.0)
    fresh = StateStore(tmp_path / "b").run(lambda: 1_800_000_000.5)

    assert first == again == 1_800_000_000_000
    assert fresh > first


def test_every_message_of_the_coordinator_carries_its_run(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    c = running(Coordinator(config(amqtt_broker, tmp_path, rounds=1), make_fleet(), COORD_KEY))

    watcher.schedule(1)
    model = watcher.models.wait_for(lambda m: not m.retain, WAIT)
    keys = {COORDINATOR: COORD_KEY.verify_key}

    assert watcher.run == c.run == StateStore(tmp_path).run(lambda: 0.0) > 0
    assert open_envelope(model.payload, keys, fleet=FLEET, kinds={Kind.MODEL}).run == c.run


def test_a_partial_of_another_run_is_refused(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    c = running(Coordinator(config(amqtt_broker, tmp_path, rounds=1), make_fleet(), COORD_KEY))
    s = watcher.schedule(1)
    part = gw_partial("gw-1", 1)

    watcher.send("gw-1", sealed_partial("gw-1", 1, s.model_version, part, run=c.run - 1))
    watcher.send("gw-1", sealed_partial("gw-1", 1, s.model_version, part, run=c.run))
    watcher.send("gw-2", sealed_partial("gw-2", 1, s.model_version, part, run=c.run))
    record = c.wait_for_round(1, WAIT)

    assert record.ok and record.rejected == {"stale_run": 1}


def test_a_strategy_step_that_is_not_finite_fails_the_round_and_is_never_saved(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    class Poisoned:
        def apply(self, weights: Any, momentum: Any, partial: Partial) -> Any:
            return np.full_like(weights, np.nan), momentum

    watcher = Watcher(make_transport, amqtt_broker)
    AutoGateways(make_transport(amqtt_broker.url, "gateways"), ["gw-1", "gw-2"])
    c = Coordinator(config(amqtt_broker, tmp_path, rounds=2), make_fleet(), COORD_KEY)
    c.strategy = Poisoned()  # type: ignore[assignment]
    before = c.weights
    running(c)

    first = c.wait_for_round(1, WAIT)
    second_schedule = watcher.schedule(2)

    assert not first.ok and first.rejected == {"non_finite_model": 1}
    assert first.model_version == 0 and c.weights.tobytes() == before.tobytes()
    assert second_schedule.model_version == 0
    assert not (tmp_path / "models" / "v1.npy").exists()
    assert np.isfinite(watcher.model(2)[2].weights).all()


def test_a_poisoned_state_dir_is_never_resumed(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    weights = init_weights(SPEC, np.random.default_rng(5))
    store.save_model(0, weights, np.zeros_like(weights))
    poisoned = weights.copy()
    poisoned[3] = np.nan
    np.save(tmp_path / "models" / "v1.npy", poisoned)  # written behind the store's back
    np.save(tmp_path / "models" / "m1.npy", np.zeros_like(weights))
    (tmp_path / "rounds" / "1.json").write_text(
        RoundRecord(
            round=1, ok=True, base_version=0, model_version=1, contributors=1, dropped=0
        ).to_json()
    )

    with pytest.raises(CoordinatorError, match="NaN or infinity"):
        Coordinator(config_for_url("mqtt://127.0.0.1:1", tmp_path), make_fleet(), COORD_KEY)
    with pytest.raises(CoordinatorError, match="not finite"):
        store.save_model(2, poisoned, np.zeros_like(weights))


def test_partials_with_no_round_open_are_counted_in_the_next_record(
    amqtt_broker: RunningBroker, make_transport: MakeTransport, running: Any, tmp_path: Path
) -> None:
    watcher = Watcher(make_transport, amqtt_broker)
    c = running(
        Coordinator(config(amqtt_broker, tmp_path, rounds=2, interval=1.5), make_fleet(), COORD_KEY)
    )
    s = watcher.schedule(1)
    for gw in ("gw-1", "gw-2"):
        part = gw_partial(gw, 1)
        watcher.send(gw, sealed_partial(gw, 1, s.model_version, part, run=watcher.run))
    c.wait_for_round(1, WAIT)

    watcher.send("gw-1", b"between rounds")  # round 2 opens 1.5 s after round 1
    s2 = watcher.schedule(2)
    for gw in ("gw-1", "gw-2"):
        part = gw_partial(gw, 2)
        watcher.send(gw, sealed_partial(gw, 2, s2.model_version, part, run=watcher.run))
    record = c.wait_for_round(2, WAIT)

    assert record.rejected == {"no_open_round": 1}
