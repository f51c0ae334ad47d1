"""A gateway's boards file: what it holds, how it is written, and the clear error a bad or
missing one (or one of another gateway) is.
"""

from __future__ import annotations

import json
import stat
from contextlib import ExitStack
from pathlib import Path

import pytest

from gateway import GatewayError
from gateway.boards import Boards, BoardsError, load_boards, new_board_entry, save_boards
from tests.boards_helpers import FLEET, entry, start_gateway
from tests.mqtt_fixtures import AmqttBroker

# -- the boards file -------------------------------------------------------------------


def test_boards_file_round_trips_and_is_private(tmp_path: Path) -> None:
    boards = Boards(FLEET, "gw-1").with_board("esp-1", new_board_entry("esp-1"))
    boards = boards.with_board("esp-2", entry(2))
    path = tmp_path / "boards.json"

    save_boards(path, boards)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = load_boards(path)
    assert back == boards and dict(back.boards) == dict(boards.boards)
    doc = json.loads(path.read_text())
    assert set(doc) == {"fleet", "gateway", "boards"}
    assert doc["boards"]["esp-2"] == {
        "key": (bytes([2]) * 32).hex(),
        "mqtt_user": "user-2",
        "mqtt_password": "password-2",
    }


def test_new_board_entries_are_fresh() -> None:
    a, b = new_board_entry("esp-1"), new_board_entry("esp-1")

    assert len(a.key) == 32 and a.mqtt_user == "esp-1"
    assert a.key != b.key and a.mqtt_password != b.mqtt_password
    assert a.key.hex() not in repr(a) and a.mqtt_password not in repr(a)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"fleet": "f", "gateway": "gw-1"}',
        '{"fleet": "f", "gateway": "gw-1", "boards": {"esp-1": {"key": "00"}}}',
        '{"fleet": "f", "gateway": "gw-1", "boards": {"esp-1": '
        '{"key": "zz", "mqtt_user": "u", "mqtt_password": "p"}}}',
        '{"fleet": "f", "gateway": "gw-1", "boards": {"esp/1": '
        '{"key": "' + "00" * 32 + '", "mqtt_user": "u", "mqtt_password": "p"}}}',
        '{"fleet": "f", "gateway": "gw-1", "boards": {"esp-1": '
        '{"key": "' + "00" * 32 + '", "mqtt_user": "", "mqtt_password": "p"}}}',
    ],
    ids=["json", "array", "missing", "fields", "key", "id", "user"],
)
def test_a_bad_boards_file_is_a_clear_gateway_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "boards.json"
    path.write_text(text)

    with pytest.raises(BoardsError, match=r"boards file .*boards\.json"):
        load_boards(path)


def test_a_missing_boards_file_is_a_gateway_error(tmp_path: Path) -> None:
    with pytest.raises(GatewayError, match="cannot be read"):
        load_boards(tmp_path / "absent.json")


def test_gateway_refuses_boards_of_another_gateway(
    amqtt_broker: AmqttBroker, tmp_path: Path, stack: ExitStack
) -> None:
    path = tmp_path / "boards.json"
    save_boards(path, Boards(FLEET, "gw-9", {"esp-1": entry(1)}))

    with pytest.raises(BoardsError, match="gw-9"):
        start_gateway(stack, amqtt_broker.url, path)
