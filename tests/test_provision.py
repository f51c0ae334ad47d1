"""`tern firmware provision --dry-run`: the bundle, the boards file, the mpremote commands."""

from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

import pytest

from firmware.deps import firmware_dir
from firmware.errors import ProvisionError
from firmware.provision import (
    Bundle,
    ProvisionRequest,
    mpremote_commands,
    parse_gateway,
    provision,
    run_mpremote,
)
from gateway.boards import load_boards
from tern import topics
from tern.cli import main

HEX64 = set("0123456789abcdef")


def _provision(tmp_path: Path, *extra: str, device: str = "esp-1") -> int:
    return main(
        [
            "firmware", "provision", "--device", device, "--fleet", "plant-7",
            "--gateway", "10.0.0.5:1884", "--port", "/dev/ttyUSB0",
            "--boards", str(tmp_path / "boards.json"), "--gateway-id", "gw-1",
            "--wifi-ssid", "floor-2", "--wifi-password", "hunter22",
            "--dry-run", "--out", str(tmp_path / f"bundle-{device}"), *extra,
        ]
    )  # fmt: skip


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_dry_run_writes_every_firmware_file_and_a_config_with_topics_from_tern_topics(
    tmp_path: Path,
) -> None:
    rc = _provision(tmp_path)

    bundle = tmp_path / "bundle-esp-1"
    expected = {p.name for p in firmware_dir().iterdir() if p.is_file() and p.suffix != ".pyc"}
    assert rc == 0
    assert expected <= {p.name for p in bundle.iterdir()}
    for name in expected:
        assert (bundle / name).read_bytes() == (firmware_dir() / name).read_bytes()
    config = json.loads((bundle / "config.json").read_text())
    assert config["topics"] == {
        "model": topics.mcu_model("plant-7", "esp-1").path,
        "telemetry": topics.telemetry("plant-7", "esp-1").path,
        "status": topics.status("plant-7", "esp-1").path,
    }
    assert config["broker"]["host"] == "10.0.0.5" and config["broker"]["port"] == 1884
    assert config["wifi"] == {"ssid": "floor-2", "password": "hunter22"}
    assert (config["fleet"], config["device"]) == ("plant-7", "esp-1")


def test_the_board_key_is_fresh_and_matches_its_entry_in_the_boards_file(
    tmp_path: Path,
) -> None:
    _provision(tmp_path, device="esp-1")
    _provision(tmp_path, device="esp-2")

    boards = load_boards(tmp_path / "boards.json")
    keys = {}
    for device in ("esp-1", "esp-2"):
        config = json.loads((tmp_path / f"bundle-{device}" / "config.json").read_text())
        entry = boards.boards[device]
        assert len(config["key"]) == 64 and set(config["key"]) <= HEX64
        assert bytes.fromhex(config["key"]) == entry.key
        assert config["broker"]["user"] == entry.mqtt_user
        assert config["broker"]["password"] == entry.mqtt_password
        keys[device] = entry.key
    assert (boards.fleet, boards.gateway) == ("plant-7", "gw-1")
    assert keys["esp-1"] != keys["esp-2"]


def test_dry_run_prints_the_mpremote_commands_and_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _provision(tmp_path)

    out = capsys.readouterr().out
    config = json.loads((tmp_path / "bundle-esp-1" / "config.json").read_text())
    commands = [shlex.split(line) for line in out.splitlines() if line.startswith("mpremote ")]
    bundle = tmp_path / "bundle-esp-1"
    assert commands[0] == ["mpremote", "connect", "/dev/ttyUSB0", "mip", "install", "umqtt.simple"]
    copied = {c[-1] for c in commands if c[3:5] == ["fs", "cp"]}
    assert copied == {f":{p.name}" for p in bundle.iterdir()}
    assert all(Path(c[5]).parent == bundle for c in commands if c[3:5] == ["fs", "cp"])
    assert commands[-1] == ["mpremote", "connect", "/dev/ttyUSB0", "reset"]
    for secret in (config["key"], config["broker"]["password"], "hunter22"):
        assert secret not in out


def test_the_secrets_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    _provision(tmp_path)

    assert _mode(tmp_path / "bundle-esp-1" / "config.json") == 0o600
    assert _mode(tmp_path / "bundle-esp-1") == 0o700
    assert _mode(tmp_path / "boards.json") == 0o600


def test_a_registered_device_is_refused_unless_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _provision(tmp_path)
    first = load_boards(tmp_path / "boards.json").boards["esp-1"]

    assert _provision(tmp_path) == 1
    assert "already registered" in capsys.readouterr().err
    assert load_boards(tmp_path / "boards.json").boards["esp-1"] == first
    assert _provision(tmp_path, "--replace") == 0
    assert load_boards(tmp_path / "boards.json").boards["esp-1"].key != first.key


def test_a_boards_file_of_another_fleet_or_gateway_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _provision(tmp_path)
    before = (tmp_path / "boards.json").read_bytes()

    other_gateway = _provision(tmp_path, "--gateway-id", "gw-2", device="esp-9")
    other_fleet = main(
        ["firmware", "provision", "--device", "esp-8", "--fleet", "other",
         "--gateway", "h", "--port", "p", "--boards", str(tmp_path / "boards.json"),
         "--dry-run", "--out", str(tmp_path / "b")]
    )  # fmt: skip

    err = capsys.readouterr().err
    assert (other_gateway, other_fleet) == (1, 1)
    assert "gateway 'gw-1'" in err and "fleet 'plant-7'" in err
    assert (tmp_path / "boards.json").read_bytes() == before


def test_a_new_boards_file_needs_the_gateway_id(tmp_path: Path) -> None:
    rc = main(
        ["firmware", "provision", "--device", "esp-1", "--fleet", "plant-7",
         "--gateway", "h", "--port", "p", "--boards", str(tmp_path / "boards.json"),
         "--dry-run", "--out", str(tmp_path / "b")]
    )  # fmt: skip

    assert rc == 1
    assert not (tmp_path / "boards.json").exists()


def test_a_replay_sensor_ships_its_windows_file(tmp_path: Path) -> None:
    windows = tmp_path / "w.txt"
    windows.write_text("1,2,3\n4,5,6\n")

    rc = _provision(tmp_path, "--sensor", "replay", "--replay-file", str(windows))

    config = json.loads((tmp_path / "bundle-esp-1" / "config.json").read_text())
    assert rc == 0
    assert config["sensor"] == {"kind": "replay", "path": "windows.txt"}
    assert (tmp_path / "bundle-esp-1" / "windows.txt").read_text() == "1,2,3\n4,5,6\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("gw.local", ("gw.local", 1884, False)), ("10.0.0.5:1883", ("10.0.0.5", 1883, False))],
)
def test_the_gateway_address_defaults_to_the_gateway_listen_port(
    text: str, expected: tuple[str, int, bool]
) -> None:
    assert parse_gateway(text) == expected


@pytest.mark.parametrize("text", ["", ":1883", "h:x", "h:70000"])
def test_a_bad_gateway_address_is_refused(text: str) -> None:
    with pytest.raises(ProvisionError):
        parse_gateway(text)


def test_a_failed_copy_registers_nothing(tmp_path: Path) -> None:
    req = ProvisionRequest(
        device="esp-1", fleet="plant-7", host="h", port=1884, serial_port="/dev/ttyUSB0",
        boards_file=tmp_path / "boards.json", sensor={"kind": "adc"}, gateway_id="gw-1",
    )  # fmt: skip

    def broken_board(commands: object) -> None:
        raise ProvisionError("mpremote: no device found")

    with pytest.raises(ProvisionError, match="no device"):
        provision(req, out=None, dry_run=False, say=lambda _: None, run=broken_board)

    assert not (tmp_path / "boards.json").exists()


def test_a_missing_mpremote_is_a_clear_error(tmp_path: Path) -> None:
    commands = mpremote_commands("/dev/ttyUSB0", Bundle(tmp_path, ("main.py",)), "no-such-mpremote")

    with pytest.raises(ProvisionError, match="pip install mpremote"):
        run_mpremote(commands, timeout=5)


def test_provisioning_a_board_runs_mpremote_then_registers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "mpremote.log"
    fake = tmp_path / "bin" / "mpremote"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(log))}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")

    rc = main(
        ["firmware", "provision", "--device", "esp-1", "--fleet", "plant-7",
         "--gateway", "gw.local", "--port", "/dev/ttyUSB0", "--gateway-id", "gw-1",
         "--boards", str(tmp_path / "boards.json"), "--timeout", "10"]
    )  # fmt: skip

    calls = log.read_text().splitlines()
    assert rc == 0
    assert calls[0] == "connect /dev/ttyUSB0 mip install umqtt.simple"
    assert {c.split()[-1] for c in calls if " fs cp " in c} >= {":main.py", ":config.json"}
    assert calls[-1] == "connect /dev/ttyUSB0 reset"
    assert "esp-1" in load_boards(tmp_path / "boards.json").boards


def test_a_replay_sensor_without_its_file_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = _provision(tmp_path, "--sensor", "replay", "--replay-file", str(tmp_path / "none.txt"))

    assert rc == 1
    assert "--replay-file" in capsys.readouterr().err
    assert not (tmp_path / "boards.json").exists()
