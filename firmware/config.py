"""A board's config.json, built in one place: provisioning writes it, simulated boards use it.

The firmware never builds a topic: the exact strings come from tern.topics here.
Keys are those firmware/esp32/tern_board.py reads (config.example.json).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker.lifecycle import write_atomic
from firmware.errors import ProvisionError
from tern import __version__, topics
from tern.mcu import KEY_BYTES, MAX_MCU_BYTES

__all__ = [
    "CA_NAME",
    "DEFAULT_KEEPALIVE",
    "DEFAULT_NTP_HOST",
    "DEFAULT_RATE_HZ",
    "DEFAULT_WINDOW",
    "adc_sensor",
    "board_config",
    "replay_sensor",
    "write_secret_json",
]

DEFAULT_RATE_HZ = 1.0
DEFAULT_KEEPALIVE = 60  # seconds; umqtt.simple pings only when the app calls ping()
DEFAULT_WINDOW = 40  # MNIST-1D: 40 samples per window
DEFAULT_NTP_HOST = "pool.ntp.org"  # the board sets its clock here before TLS
CA_NAME = "ca.der"  # the fleet CA in the bundle: DER, what MicroPython's ssl loads
_MAX_HOST = 253


def adc_sensor(
    pin: int = 34, window: int = DEFAULT_WINDOW, shift: int = 4, offset: int = 2048
) -> dict[str, Any]:
    """An ESP32 ADC pin: raw 12-bit readings minus `offset`, shifted right by `shift`."""
    return {"kind": "adc", "pin": pin, "window": window, "shift": shift, "offset": offset}


def replay_sensor(path: str = "windows.txt") -> dict[str, Any]:
    """Windows replayed from a text file on the board (one per line, comma-separated)."""
    return {"kind": "replay", "path": path}


def board_config(
    *,
    fleet: str,
    device: str,
    key: bytes,
    host: str,
    port: int,
    mqtt_user: str,
    mqtt_password: str,
    sensor: Mapping[str, Any],
    rate_hz: float = DEFAULT_RATE_HZ,
    wifi_ssid: str = "",
    wifi_password: str = "",
    keepalive: int = DEFAULT_KEEPALIVE,
    tls: bool = False,
    ntp_host: str = DEFAULT_NTP_HOST,
) -> dict[str, Any]:
    """The dict that becomes a board's config.json (it holds the board's secrets).

    With `tls` the board connects with TLS, its broker checked against the fleet CA in
    the bundle (CA_NAME), after setting its clock from `ntp_host`."""
    topics.validate_id(fleet, "fleet")
    topics.validate_id(device, "device")
    if len(key) != KEY_BYTES:
        raise ProvisionError(f"a board key is {KEY_BYTES} bytes, not {len(key)}")
    if not 0 < port < 65536:
        raise ProvisionError(f"port {port} is not a TCP port")
    if not 0 < rate_hz <= 1000:
        raise ProvisionError(f"rate {rate_hz} Hz is not in (0, 1000]")
    if not 0 < keepalive < 65536:
        raise ProvisionError(f"keepalive {keepalive} s is not in (0, 65536)")
    if tls and (not ntp_host or len(ntp_host) > _MAX_HOST or any(c.isspace() for c in ntp_host)):
        raise ProvisionError(f"NTP host {ntp_host[:_MAX_HOST]!r} is not a host name")
    config = {
        "fleet": fleet,
        "device": device,
        "key": key.hex(),
        "broker": {
            "host": host,
            "port": port,
            "user": mqtt_user,
            "password": mqtt_password,
            "keepalive": keepalive,
        },
        "topics": {
            "model": topics.mcu_model(fleet, device).path,
            "telemetry": topics.telemetry(fleet, device).path,
            "status": topics.status(fleet, device).path,
        },
        "rate_hz": rate_hz,
        "sensor": dict(sensor),
        "wifi": {"ssid": wifi_ssid, "password": wifi_password},
        "version": __version__,
        "max_model_bytes": MAX_MCU_BYTES,
    }
    if tls:
        config["tls"] = {"ca": CA_NAME, "ntp": ntp_host}
    return config


def write_secret_json(path: Path, value: Mapping[str, Any]) -> None:
    """Write `value` as JSON readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))
