"""The board app's payloads, config and sensors under CPython: what it publishes, byte for byte,
what config it refuses, and how the replay sensor reads its windows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tern.reports import State, Status, Telemetry
from tests.firmware_fakes import DEVICE, FakeClock, FixedSensor, board_config, firmware_modules


@pytest.fixture(scope="module")
def fw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, ModuleType]]:
    """(tern_board, tern_sensors) imported from firmware/esp32."""
    with firmware_modules() as modules:
        yield modules


def test_payload_helpers_match_tern_reports_byte_for_byte(
    fw: tuple[ModuleType, ModuleType],
) -> None:
    tern_board = fw[0]

    status = tern_board.status_json(DEVICE, "online", "0.1.0", 'model refused: "x"')
    telemetry = tern_board.telemetry_json(DEVICE, 12, 881, 3, 0.9312345678901234, 5120)

    assert status == Status(DEVICE, "board", State.ONLINE, "0.1.0", 'model refused: "x"').to_json()
    assert telemetry == Telemetry(DEVICE, 12, 881, 3, 0.9312345678901234, 5120).to_json()


def test_replay_sensor_cycles_through_its_windows_and_clamps(
    fw: tuple[ModuleType, ModuleType], tmp_path: Path
) -> None:
    path = tmp_path / "windows.txt"
    path.write_text("# two windows\n1,2,3\n\n-200,0,200\n")
    sensor = fw[1].make_sensor({"kind": "replay", "path": str(path)})

    seen = [list(sensor.read()) for _ in range(3)]
    sensor.close()

    assert seen == [[1, 2, 3], [-127, 0, 127], [1, 2, 3]]
    with pytest.raises(ValueError, match="unknown sensor kind"):
        fw[1].make_sensor({"kind": "i2c"})


def test_board_config_with_a_short_key_is_refused(fw: tuple[ModuleType, ModuleType]) -> None:
    with pytest.raises(ValueError, match="64 hex"):
        fw[0].Board({**board_config(), "key": "00" * 16}, FixedSensor(), clock=FakeClock())


def test_status_json_round_trips(fw: tuple[ModuleType, ModuleType]) -> None:
    raw = fw[0].status_json(DEVICE, "offline", "0.1.0", "connection lost")

    assert json.loads(raw) == {
        "detail": "connection lost",
        "id": DEVICE,
        "role": "board",
        "state": "offline",
        "version": "0.1.0",
    }
