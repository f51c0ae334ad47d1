"""The board app's control flow under CPython, with an in-memory MQTT client.

Only pure control flow is tested here (which model is kept, what the status says, how
long it backs off); the real broker and gateway are in the end-to-end test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from kernels.reference import init_weights, mlp_spec
from tern import mcu
from tern.reports import State, Status, Telemetry
from tests.firmware_fakes import (
    DEVICE,
    FLEET,
    KEY,
    TOPICS,
    FakeBroker,
    FakeClock,
    FixedSensor,
    board_config,
    firmware_modules,
)

RUN = 1_767_225_600_000  # a coordinator's run: ms since the epoch, past 2**32
HI = RUN >> 32


@pytest.fixture(scope="module")
def fw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, ModuleType]]:
    """(tern_board, tern_sensors) imported from firmware/esp32."""
    with firmware_modules() as modules:
        yield modules


# The ordering table: a board that runs (RUN, 7) is offered one model, by (run, version).
# Runs also differ in their high u32 half only, with a low half that orders the other way:
# the firmware reads the u64 as two u32 halves.
CURRENT = (RUN, 7)
ORDER_CASES = {
    "same_run_newer_version": ((RUN, 8), "accepted"),
    "same_run_older_version": ((RUN, 5), "stale"),
    "same_run_same_version": ((RUN, 7), "ignored"),
    "newer_run_version_0": ((RUN + 1, 0), "accepted"),
    "newer_run_high_half": (((HI + 1) << 32, 0), "accepted"),
    "older_run_higher_version": ((RUN - 1, 30), "stale"),
    "older_run_high_half": (((HI - 1) << 32 | 0xFFFFFFFF, 30), "stale"),
}


def seal_model(version: int, run: int = RUN) -> bytes:
    spec = mlp_spec((40, 16, 10))
    weights = init_weights(spec, np.random.default_rng(1))
    body = mcu.quantize(spec, weights, version, run=run).to_bytes()
    return mcu.seal_mcu(body, KEY, FLEET, DEVICE)


@pytest.fixture(scope="module")
def sealed() -> Callable[..., bytes]:
    """sealed(version, run=RUN): the board's model, sealed for it."""
    return seal_model


def _board(fw: tuple[ModuleType, ModuleType], broker: FakeBroker, store: Path, **kw: Any) -> Any:
    return fw[0].Board(
        board_config(),
        FixedSensor(),
        mqtt_factory=broker.factory,
        clock=FakeClock(),
        store_dir=str(store),
        **kw,
    )


def _status(broker: FakeBroker) -> Status:
    return Status.from_json(broker.last(TOPICS["status"]))


def test_board_runs_retained_model_and_publishes_status_and_telemetry(
    fw: tuple[ModuleType, ModuleType], sealed: Callable[..., bytes], tmp_path: Path
) -> None:
    broker = FakeBroker()
    broker.retained[TOPICS["model"].encode()] = sealed(7)
    board = _board(fw, broker, tmp_path)

    board.connect()
    for _ in range(3):
        board.step()
        board.clock.sleep_ms(100)

    client = broker.clients[0]
    assert client.will is not None
    will = Status.from_json(client.will[1])
    assert (will.state, will.detail, client.will[2]) == (State.OFFLINE, "connection lost", True)
    assert _status(broker) == Status(DEVICE, "board", State.ONLINE, "0.1.0", "")
    assert board.model.model_version == 7 and board.stats["accepted"] == 1
    sent = [
        Telemetry.from_json(p) for t, p, _ in broker.published if t == b"tern/demo/telemetry/esp-1"
    ]
    assert [t.seq for t in sent] == [0, 1, 2] and board.stats["telemetry"] == 3
    want = mcu.infer(mcu.open_mcu(sealed(7), KEY, FLEET, DEVICE), FixedSensor().read())
    assert all(t.label == want.label and t.model_version == 7 for t in sent)
    assert abs(sent[0].confidence - want.confidence) < 1e-12


def test_board_refuses_tampered_model_keeps_last_good_and_says_why(
    fw: tuple[ModuleType, ModuleType], sealed: Callable[..., bytes], tmp_path: Path
) -> None:
    broker = FakeBroker()
    broker.retained[TOPICS["model"].encode()] = sealed(7)
    board = _board(fw, broker, tmp_path)
    board.connect()
    tampered = bytearray(sealed(8))
    tampered[200] ^= 1

    broker.deliver(TOPICS["model"], bytes(tampered))
    board.step()

    assert board.model.model_version == 7
    assert board.stats["rejected"] == {"bad_mac": 1}
    assert _status(broker).detail == "model refused: bad_mac"
    assert (tmp_path / "model.bin").read_bytes() == sealed(7)


@pytest.mark.parametrize("case", sorted(ORDER_CASES))
def test_board_accepts_only_a_model_newer_by_run_then_version(
    fw: tuple[ModuleType, ModuleType], sealed: Callable[..., bytes], tmp_path: Path, case: str
) -> None:
    (run, version), outcome = ORDER_CASES[case]
    broker = FakeBroker()
    broker.retained[TOPICS["model"].encode()] = sealed(CURRENT[1], CURRENT[0])
    board = _board(fw, broker, tmp_path)
    board.connect()
    offered = sealed(version, run)

    broker.deliver(TOPICS["model"], offered)
    board.step()

    stats, model = board.stats, board.model
    if outcome == "accepted":
        assert (model.run, model.model_version) == (run, version)
        assert stats["accepted"] == 2 and stats["rejected"] == {} and stats["ignored"] == 0
        assert (tmp_path / "model.bin").read_bytes() == offered
    else:
        assert (model.run, model.model_version) == CURRENT and stats["accepted"] == 1
        assert (tmp_path / "model.bin").read_bytes() == sealed(CURRENT[1], CURRENT[0])
        if outcome == "ignored":  # the retained copy of the model in use
            assert stats["ignored"] == 1 and stats["rejected"] == {}
        else:
            assert stats["ignored"] == 0 and stats["rejected"] == {"stale": 1}
    assert _status(broker).detail == ("model refused: stale" if outcome == "stale" else "")


def test_board_ignores_retained_copy_and_refuses_older_model(
    fw: tuple[ModuleType, ModuleType], sealed: Callable[..., bytes], tmp_path: Path
) -> None:
    broker = FakeBroker()
    broker.retained[TOPICS["model"].encode()] = sealed(7)
    board = _board(fw, broker, tmp_path)
    board.connect()

    broker.deliver(TOPICS["model"], sealed(7))
    board.step()
    broker.deliver(TOPICS["model"], sealed(5))
    board.step()
    broker.deliver(TOPICS["model"], sealed(9))
    board.step()

    assert board.stats["ignored"] == 1 and board.stats["rejected"] == {"stale": 1}
    assert board.model.model_version == 9 and board.stats["accepted"] == 2
    assert _status(broker).detail == ""


def test_rebooted_board_refuses_a_replay_of_an_older_model(
    fw: tuple[ModuleType, ModuleType], sealed: Callable[..., bytes], tmp_path: Path
) -> None:
    broker = FakeBroker()
    broker.retained[TOPICS["model"].encode()] = sealed(3, RUN - 1)
    board = _board(fw, broker, tmp_path)
    board.connect()
    broker.deliver(TOPICS["model"], sealed(0, RUN))  # a new run: accepted and stored
    board.step()
    assert (board.model.run, board.model.model_version) == (RUN, 0)

    rebooted = _board(fw, broker, tmp_path)  # the retained model is still the old run's
    rebooted.connect()
    broker.deliver(TOPICS["model"], sealed(30, RUN - 1))  # an old run's model, replayed
    rebooted.step()

    assert (rebooted.model.run, rebooted.model.model_version) == (RUN, 0)
    assert rebooted.stats["accepted"] == 0
    assert rebooted.stats["rejected"] == {"stale": 2}
    assert (tmp_path / "model.bin").read_bytes() == sealed(0, RUN)
    assert rebooted.detail == "model refused: stale"


def test_board_loads_its_stored_model_at_boot_and_refuses_a_damaged_one(
    fw: tuple[ModuleType, ModuleType], sealed: Callable[..., bytes], tmp_path: Path
) -> None:
    broker = FakeBroker()
    broker.retained[TOPICS["model"].encode()] = sealed(7)
    _board(fw, broker, tmp_path).connect()
    assert not (tmp_path / "model.bin.tmp").exists()

    rebooted = _board(fw, FakeBroker(), tmp_path)
    (tmp_path / "model.bin").write_bytes(sealed(7)[:-1])
    damaged = _board(fw, FakeBroker(), tmp_path)

    assert rebooted.model.model_version == 7
    assert damaged.model is None and damaged.stats["rejected"] == {"bad_mac": 1}
    assert damaged.detail == "stored model refused: bad_mac"


def test_board_backoff_is_jittered_doubling_and_capped(
    fw: tuple[ModuleType, ModuleType], tmp_path: Path
) -> None:
    tern_board = fw[0]
    low = _board(fw, FakeBroker(), tmp_path, getrandbits=lambda n: 0)
    high = _board(fw, FakeBroker(), tmp_path, getrandbits=lambda n: (1 << n) - 1)

    lows = [low.next_backoff_ms() for _ in range(10)]
    highs = [high.next_backoff_ms() for _ in range(10)]

    base = [min(tern_board.BACKOFF_MIN_MS * 2**i, tern_board.BACKOFF_MAX_MS) for i in range(10)]
    assert lows == [b - b // 2 for b in base]
    assert all(b - b // 2 <= h <= b for h, b in zip(highs, base, strict=True))
    assert highs[-1] > lows[-1] and max(highs) <= tern_board.BACKOFF_MAX_MS


def test_board_reconnects_after_losing_its_broker_and_stops_cleanly(
    fw: tuple[ModuleType, ModuleType], sealed: Callable[..., bytes], tmp_path: Path
) -> None:
    broker = FakeBroker()
    broker.retained[TOPICS["model"].encode()] = sealed(7)
    board = _board(fw, broker, tmp_path, getrandbits=lambda n: 0)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        if calls["n"] == 20:
            broker.down = True  # the gateway restarts ...
        if calls["n"] == 40:
            broker.down = False  # ... and comes back
        return calls["n"] > 80

    board.run(stop)

    assert board.stats["reconnects"] >= 1 and len(broker.clients) >= 2
    assert board.model.model_version == 7
    assert _status(broker) == Status(DEVICE, "board", State.OFFLINE, "0.1.0", "shutdown")
    assert board.client is None
