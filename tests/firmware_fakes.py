"""The board app's world under CPython: an in-memory umqtt broker and client, a clock, a
sensor, and its config (tests/test_firmware_board*.py).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tern import topics

__all__ = [
    "DEVICE",
    "ESP32",
    "FLEET",
    "KEY",
    "TOPICS",
    "FakeBroker",
    "FakeClient",
    "FakeClock",
    "FixedSensor",
    "board_config",
    "firmware_modules",
]

ESP32 = Path(__file__).resolve().parents[1] / "firmware" / "esp32"
KEY = bytes(range(32))
FLEET, DEVICE = "demo", "esp-1"
TOPICS = {
    "model": topics.mcu_model(FLEET, DEVICE).path,
    "telemetry": topics.telemetry(FLEET, DEVICE).path,
    "status": topics.status(FLEET, DEVICE).path,
}


@contextlib.contextmanager
def firmware_modules() -> Iterator[tuple[ModuleType, ModuleType]]:
    """(tern_board, tern_sensors) imported from firmware/esp32."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ESP32))
        yield importlib.import_module("tern_board"), importlib.import_module("tern_sensors")


class FakeBroker:
    """Retained messages and a log of publishes; `down` makes every call fail."""

    def __init__(self) -> None:
        self.retained: dict[bytes, bytes] = {}
        self.published: list[tuple[bytes, bytes, bool]] = []
        self.clients: list[FakeClient] = []
        self.down = False

    def factory(self, *args: Any) -> FakeClient:
        client = FakeClient(self, *args)
        self.clients.append(client)
        return client

    def deliver(self, topic: str, payload: bytes) -> None:
        for c in self.clients:
            if c.connected and topic.encode() in c.subscribed:
                c.inbox.append((topic.encode(), payload))

    def last(self, topic: str) -> bytes:
        return [p for t, p, _ in self.published if t == topic.encode()][-1]


class FakeClient:
    """umqtt.simple.MQTTClient's surface, in memory."""

    def __init__(self, broker: FakeBroker, client_id: str, *args: Any) -> None:
        self.broker, self.client_id, self.args = broker, client_id, args
        self.cb: Callable[[bytes, bytes], None] | None = None
        self.will: tuple[bytes, bytes, bool, int] | None = None
        self.subscribed: set[bytes] = set()
        self.inbox: list[tuple[bytes, bytes]] = []
        self.connected = False
        self.pings = 0

    def _up(self) -> None:
        if self.broker.down:
            raise OSError("connection refused")

    def set_callback(self, cb: Callable[[bytes, bytes], None]) -> None:
        self.cb = cb

    def set_last_will(self, topic: bytes, msg: bytes, retain: bool, qos: int) -> None:
        self.will = (topic, msg, retain, qos)

    def connect(self) -> int:
        self._up()
        self.connected = True
        return 0

    def publish(self, topic: bytes, msg: bytes, retain: bool = False, qos: int = 0) -> None:
        self._up()
        self.broker.published.append((topic, msg, retain))
        if retain:
            self.broker.retained[topic] = msg

    def subscribe(self, topic: bytes, qos: int = 0) -> None:
        self._up()
        self.subscribed.add(topic)
        if topic in self.broker.retained:
            assert self.cb is not None
            self.cb(topic, self.broker.retained[topic])

    def check_msg(self) -> None:
        self._up()
        if self.inbox:
            assert self.cb is not None
            self.cb(*self.inbox.pop(0))

    def ping(self) -> None:
        self._up()
        self.pings += 1

    def disconnect(self) -> None:
        self.connected = False


class FakeClock:
    def __init__(self) -> None:
        self.ms = 0

    def ticks_ms(self) -> int:
        return self.ms

    def ticks_us(self) -> int:
        return self.ms * 1000

    def ticks_diff(self, a: int, b: int) -> int:
        return a - b

    def sleep_ms(self, ms: int) -> None:
        self.ms += ms


class FixedSensor:
    def read(self) -> list[int]:
        return [(i * 7) % 255 - 127 for i in range(40)]


def board_config(**extra: Any) -> dict[str, Any]:
    return {
        "fleet": FLEET,
        "device": DEVICE,
        "key": KEY.hex(),
        "broker": {"host": "gw", "port": 1883, "user": DEVICE, "password": "pw", "keepalive": 60},
        "topics": TOPICS,
        "rate_hz": 10,
        "sensor": {"kind": "replay", "path": "windows.txt"},
        "version": "0.1.0",
        "max_model_bytes": 65536,
        **extra,
    }
