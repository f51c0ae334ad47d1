"""The board's pure model code under real MicroPython (WebAssembly port, under node).

tern_model.py must verify, parse and infer exactly as the CPython reference tern.mcu does,
bit for bit, and the demo model with its inference must fit 64 KB of MicroPython heap.
"""

from __future__ import annotations

import hmac
import json
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest

from firmware.micropython import (
    MicroPythonUnavailable,
    find_node,
    heap_use,
    npm_install,
    run_micropython,
)
from kernels.partition import load_mnist1d
from kernels.reference import init_weights, mlp_spec, train_local
from tern import mcu
from tern.messages import TrainConfig
from tern.reports import State, Status, Telemetry
from tests.helpers import unavailable
from tests.test_firmware_board import CURRENT, ORDER_CASES, RUN

ESP32 = Path(__file__).resolve().parents[1] / "firmware" / "esp32"
KEY = bytes(range(32))
FLEET, DEVICE = "demo", "esp-1"
HEAP_LIMIT = 64 * 1024
WINDOWS = 50
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def micropython() -> None:
    try:
        find_node()
        npm_install()
    except MicroPythonUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="module")
def demo() -> tuple[mcu.McuModel, list[list[int]]]:
    """The demo MLP (40-100-100-10) after one local epoch, and MNIST-1D test windows."""
    data = load_mnist1d(num_samples=2000)
    spec = mlp_spec((40, 100, 100, 10))
    rng = np.random.default_rng(0)
    weights = train_local(spec, init_weights(spec, rng), data.x[:400], data.y[:400],
                          TrainConfig(), rng)  # fmt: skip
    model = mcu.quantize(spec, weights, model_version=7, run=RUN)
    windows = [mcu.quantize_window(x, model.in_exp) for x in data.x_test[:WINDOWS]]
    return model, windows


def _sealed(model: mcu.McuModel, key: bytes = KEY) -> bytes:
    return mcu.seal_mcu(model.to_bytes(), key, FLEET, DEVICE)


def _run(source: str, files: dict[str, bytes]) -> list[str]:
    # tern_board imports both; the board's own modules, as on its filesystem
    own = ("tern_model.py", "tern_tls.py")
    files = {**{name: (ESP32 / name).read_bytes() for name in own}, **files}
    return run_micropython(source, timeout=TIMEOUT, files=files).splitlines()


def _with_version(model: mcu.McuModel, version: int, run: int = RUN) -> mcu.McuModel:
    return mcu.McuModel(version, run, model.in_exp, model.sizes, model.layers)


def _version_1(body: bytes, domain: str) -> bytes:
    """A format-2 body rewritten as format 1 (version 1, no run), tagged under `domain`."""
    v1 = body[:4] + b"\x01" + body[5:12] + body[20:]
    prefix = f"{domain}\0{FLEET}\0{DEVICE}\0".encode()
    return v1 + hmac.new(KEY, prefix + v1, sha256).digest()


def test_micropython_predictions_equal_cpython_reference_bit_for_bit(
    micropython: None, demo: tuple[mcu.McuModel, list[list[int]]]
) -> None:
    model, windows = demo
    source = f"""
import json, tern_model
model = tern_model.load(open("model.bin", "rb").read(), {KEY!r}, {FLEET!r}, {DEVICE!r})
for w in {windows!r}:
    label, logits, exp, conf = model.infer(w)
    print(json.dumps([label, logits, exp, repr(conf)]))
"""

    lines = _run(source, {"model.bin": _sealed(model)})

    assert len(lines) == len(windows)
    for line, window in zip(lines, windows, strict=True):
        label, logits, exp, conf = json.loads(line)
        want = mcu.infer(model, window)
        assert (label, tuple(logits), exp) == (want.label, want.logits, want.exp)
        assert abs(float(conf) - want.confidence) <= 1e-9
    assert len({json.loads(line)[0] for line in lines}) > 1  # not a constant prediction


def test_demo_model_and_inference_fit_64k_of_micropython_heap(
    micropython: None, demo: tuple[mcu.McuModel, list[list[int]]]
) -> None:
    model, windows = demo
    old, new = _sealed(_with_version(model, 6)), _sealed(model)

    base, grown = heap_use(
        old, new, windows[0], key=KEY, fleet=FLEET, device=DEVICE, timeout=TIMEOUT
    )

    total = base + grown
    print(f"MicroPython heap: {base} B after import + {grown} B grown = {total} B")
    assert total <= HEAP_LIMIT


def test_micropython_refuses_tampered_models_with_their_reason(
    micropython: None, demo: tuple[mcu.McuModel, list[list[int]]]
) -> None:
    model, _ = demo
    good = _sealed(model)
    flipped = bytearray(good)
    flipped[100] ^= 0x04
    body = model.to_bytes()
    cases = {
        "flipped": (bytes(flipped), "bad_mac"),
        "cut_tail": (good[:-1], "bad_mac"),  # the tag no longer covers what arrived
        "cut_short": (good[:40], "truncated"),
        "signed_truncated": (mcu.seal_mcu(body[:-4], KEY, FLEET, DEVICE), "truncated"),
        "signed_extra": (mcu.seal_mcu(body + b"\0", KEY, FLEET, DEVICE), "malformed"),
        "bad_magic": (mcu.seal_mcu(b"XMCU" + body[4:], KEY, FLEET, DEVICE), "bad_magic"),
        "bad_version": (
            mcu.seal_mcu(body[:4] + b"\x03" + body[5:], KEY, FLEET, DEVICE),
            "bad_version",
        ),
        "version_1": (  # format 1's layout and domain: its tag never verifies as format 2
            _version_1(body, "tern-mcu-1"),
            "bad_mac",
        ),
        "version_1_retagged": (_version_1(body, "tern-mcu-2"), "bad_version"),
        "wrong_key": (_sealed(model, bytes(32)), "bad_mac"),
        "other_board": (mcu.seal_mcu(body, KEY, FLEET, "esp-2"), "bad_mac"),
        "stale": (_sealed(_with_version(model, 3)), "stale"),
        "older_run": (_sealed(_with_version(model, 30, RUN - 1)), "stale"),
        "oversize": (good + bytes(65536), "oversize"),
    }
    current = RUN << 32 | 5  # the mark of (RUN, 5)
    source = f"""
import tern_model
for name in {sorted(cases)!r}:
    try:
        tern_model.load(open(name, "rb").read(), {KEY!r}, {FLEET!r}, {DEVICE!r}, {current})
        print(name, "accepted")
    except tern_model.ModelError as exc:
        print(name, exc.reason)
"""

    lines = _run(source, {name: data for name, (data, _) in cases.items()})

    assert dict(line.split() for line in lines) == {n: r for n, (_, r) in cases.items()}


_ORDER_SOURCE = """
import json, os, tern_board
def read(name):
    with open(name, "rb") as f:
        return f.read()
class Sensor:
    def read(self):
        return [0] * 40
config = json.loads(CONFIG)
def board(path):
    try:
        os.mkdir(path)
    except OSError:
        pass
    return tern_board.Board(config, Sensor(), store_dir=path)
def show(name, b):
    s = b.stats
    print(name, b.model.run, b.model.model_version, s["accepted"], s["ignored"],
          json.dumps(s["rejected"]))
for name in NAMES:
    b = board("/tmp/" + name)
    b.on_message(b"m", read("current.bin"))
    b.on_message(b"m", read(name))
    show(name, b)
# A board that ran an old run and then a new one reboots and is replayed the old run's.
b = board("/tmp/reboot")
b.on_message(b"m", read("old_run.bin"))
b.on_message(b"m", read("new_run.bin"))
b = board("/tmp/reboot")
b.on_message(b"m", read("old_run_replay.bin"))
show("reboot", b)
"""


def test_micropython_board_accepts_only_a_model_newer_by_run_then_version(
    micropython: None, demo: tuple[mcu.McuModel, list[list[int]]]
) -> None:
    model, _ = demo
    config = {
        "fleet": FLEET,
        "device": DEVICE,
        "key": KEY.hex(),
        "broker": {"host": "gw"},
        "topics": {"model": "m", "telemetry": "t", "status": "s"},
    }
    files = {
        name: _sealed(_with_version(model, version, run))
        for name, ((run, version), _) in ORDER_CASES.items()
    }
    files["current.bin"] = _sealed(_with_version(model, CURRENT[1], CURRENT[0]))
    files["old_run.bin"] = _sealed(_with_version(model, 3, RUN - 1))
    files["new_run.bin"] = _sealed(_with_version(model, 0, RUN))
    files["old_run_replay.bin"] = _sealed(_with_version(model, 30, RUN - 1))
    files["tern_board.py"] = (ESP32 / "tern_board.py").read_bytes()
    source = f"CONFIG = {json.dumps(config)!r}\nNAMES = {sorted(ORDER_CASES)!r}\n"

    lines = _run(source + _ORDER_SOURCE, files)

    seen = {}
    for line in lines:
        name, run, version, accepted, ignored, rejected = line.split(" ", 5)
        seen[name] = ((int(run), int(version)), int(accepted), int(ignored), json.loads(rejected))
    for name, (offered, outcome) in ORDER_CASES.items():
        want = {
            "accepted": (offered, 2, 0, {}),
            "ignored": (CURRENT, 1, 1, {}),
            "stale": (CURRENT, 1, 0, {"stale": 1}),
        }[outcome]
        assert seen[name] == want, name
    # Rebooted: the stored (RUN, 0) is the mark, and the old run's replay is stale.
    assert seen["reboot"] == ((RUN, 0), 0, 0, {"stale": 1})


def test_board_app_runs_under_micropython_with_an_in_memory_client(
    micropython: None, demo: tuple[mcu.McuModel, list[list[int]]]
) -> None:
    model, windows = demo
    config = {
        "fleet": FLEET,
        "device": DEVICE,
        "key": KEY.hex(),
        "broker": {"host": "gw", "port": 1883, "user": DEVICE, "password": "pw", "keepalive": 60},
        "topics": {"model": "m", "telemetry": "t", "status": "s"},
        "rate_hz": 10,
        "sensor": {"kind": "replay", "path": "windows.txt"},
    }
    source = f"""
import json, tern_board, tern_sensors
published = []
class Client:
    def __init__(self, *args):
        self.cb = None
    def set_callback(self, cb):
        self.cb = cb
    def set_last_will(self, *args):
        pass
    def connect(self):
        return 0
    def publish(self, topic, msg, retain=False, qos=0):
        published.append((topic, msg))
    def subscribe(self, topic, qos=0):
        self.cb(topic, open("model.bin", "rb").read())
    def check_msg(self):
        pass
    def ping(self):
        pass
    def disconnect(self):
        pass
class Clock:
    ms = 0
    def ticks_ms(self):
        return self.ms
    def ticks_us(self):
        return self.ms * 1000
    def ticks_diff(self, a, b):
        return a - b
    def sleep_ms(self, ms):
        self.ms += ms
n = [0]
def stop():
    n[0] += 1
    return n[0] > 8
config = json.loads({json.dumps(config)!r})
sensor = tern_sensors.make_sensor(config["sensor"])
board = tern_board.Board(config, sensor, mqtt_factory=Client, clock=Clock(), store_dir="/tmp")
board.run(stop)
for topic, msg in published:
    print(topic.decode(), msg.decode())
"""
    files = {
        "tern_board.py": (ESP32 / "tern_board.py").read_bytes(),
        "tern_sensors.py": (ESP32 / "tern_sensors.py").read_bytes(),
        "model.bin": _sealed(model),
        "windows.txt": "".join(",".join(map(str, w)) + "\n" for w in windows[:3]).encode(),
    }

    lines = _run(source, files)

    sent = [line.split(" ", 1) for line in lines]
    telemetry = [Telemetry.from_json(p.encode()) for t, p in sent if t == "t"]
    statuses = [Status.from_json(p.encode()) for t, p in sent if t == "s"]
    assert [s.state for s in statuses] == [State.ONLINE, State.OFFLINE]
    assert telemetry and [t.seq for t in telemetry] == list(range(len(telemetry)))
    want = [mcu.infer(model, windows[i % 3]).label for i in range(len(telemetry))]
    assert [t.label for t in telemetry] == want
