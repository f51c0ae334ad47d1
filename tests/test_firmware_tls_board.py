"""A TLS board's configuration and control flow: `tern firmware provision` for an mqtts://
gateway, and (under real MicroPython, WebAssembly port: it has no ssl) the board setting its
clock by NTP before any TLS, refusing TLS while it cannot, and refusing a CA that is not one
DER certificate. The real TLS connections are in test_firmware_tls.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from firmware.config import CA_NAME, adc_sensor, board_config
from firmware.micropython import MicroPythonUnavailable, find_node, npm_install, run_micropython
from gateway.boards import load_boards
from tern import pki
from tern.cli import main
from tests.helpers import unavailable

FLEET, BOARD, GATEWAY = "demo", "esp-1", "gw-1"
ESP32 = Path(__file__).resolve().parents[1] / "firmware" / "esp32"


_ORDER_SOURCE = """
import json, tern_board, tern_tls
calls = []
class Ntp:
    host = None
    def __init__(self, answers):
        self.answers = answers
    def settime(self):
        calls.append("ntp " + self.host)
        if not self.answers.pop(0):
            raise OSError(110)
class Context:
    def __init__(self, protocol):
        calls.append("context " + str(protocol))
    def load_verify_locations(self, cadata):
        calls.append("ca " + str(len(cadata)))
class Ssl:
    PROTOCOL_TLS_CLIENT = 16
    CERT_REQUIRED = 2
    SSLContext = Context
class Client:
    def __init__(self, *args, ssl=None):
        calls.append("client " + str(args[2]) + " " + str(ssl.verify_mode))
        raise OSError(104)
class Clock:
    def sleep_ms(self, ms):
        calls.append("sleep " + str(ms))
    def ticks_ms(self):
        return 0
def run(answers):
    del calls[:]
    board = tern_board.Board(json.loads(CONFIG), None, mqtt_factory=Client, clock=Clock(),
                             store_dir="", ssl=Ssl(), ntp=Ntp(answers), log=calls.append)
    for _ in range(2):
        try:
            board.connect()
        except OSError as exc:
            board._connect_failed(exc)
    print(json.dumps([calls, board.tls.refused, board.stats["connect_failures"]]))
run([False, False, False, False, False, False])
run([False, True])
for bad in ["PEM", "short", "two"]:
    try:
        tern_tls.read_ca(bad)
        print(bad, "accepted")
    except tern_tls.TlsError as exc:
        print(bad, exc.reason)
"""


def test_micropython_board_sets_its_clock_before_tls_and_refuses_tls_without_it() -> None:
    try:
        find_node()
        npm_install()
    except MicroPythonUnavailable as exc:
        unavailable(str(exc))
    der = pki.der_of(pki.new_ca(FLEET).cert_pem)
    config = {
        "fleet": FLEET,
        "device": BOARD,
        "key": "00" * 32,
        "broker": {"host": "gw", "user": BOARD, "password": "pw"},
        "topics": {"model": "m", "telemetry": "t", "status": "s"},
        "tls": {"ca": CA_NAME, "ntp": "time.example", "ntp_tries": 3},
    }
    files = {
        name: (ESP32 / name).read_bytes()
        for name in ("tern_board.py", "tern_tls.py", "tern_model.py")
    }
    files |= {CA_NAME: der, "PEM": pki.new_ca(FLEET).cert_pem, "short": der[:-1], "two": der + der}
    source = f"CONFIG = {json.dumps(config)!r}\n" + _ORDER_SOURCE

    lines = run_micropython(source, timeout=120.0, files=files).splitlines()

    (calls, refused, failures), (calls2, refused2, failures2) = map(json.loads, lines[:2])
    ntp = "ntp time.example"
    # No answer: three queries, 1 s then 2 s apart, and no TLS, no broker, on each attempt.
    assert calls[:5] == [ntp, "sleep 1000", ntp, "sleep 2000", ntp]
    assert not any(c.startswith(("context", "client")) for c in calls)
    assert refused == {"clock_not_set": 2} and failures == 2
    assert (
        sum(
            c.startswith("tern: not connected: TlsError: clock_not_set: no time from NTP")
            for c in calls
        )
        == 1
    )
    # An answer on the second query: then the context, the CA, the client with it, port 8883.
    assert calls2[:6] == [ntp, "sleep 1000", ntp, "context 16", f"ca {len(der)}", "client 8883 2"]
    assert calls2.count(ntp) == 2  # the clock is set once per boot, not per connection
    assert refused2 == {} and failures2 == 2
    assert dict(line.split() for line in lines[2:]) == {
        "PEM": "bad_ca",
        "short": "bad_ca",
        "two": "bad_ca",
    }


def _provision(tmp: Path, gateway: str, *extra: str) -> int:
    return main(
        [
            "firmware", "provision", "--device", BOARD, "--fleet", FLEET, "--gateway", gateway,
            "--port", "/dev/ttyUSB0", "--boards", str(tmp / "boards.json"),
            "--gateway-id", GATEWAY, "--dry-run", "--out", str(tmp / "bundle"), *extra,
        ]
    )  # fmt: skip


def test_provisioning_for_an_mqtts_gateway_puts_the_fleet_ca_and_ntp_host_in_the_bundle(
    tmp_path: Path,
) -> None:
    ca = pki.new_ca(FLEET)
    (tmp_path / pki.CA_CERT).write_bytes(ca.cert_pem)

    rc = _provision(
        tmp_path, "mqtts://gw-1.plant", "--fleet-dir", str(tmp_path), "--ntp-host", "ntp.plant"
    )

    bundle = tmp_path / "bundle"
    config = json.loads((bundle / "config.json").read_text())
    assert rc == 0
    assert (bundle / CA_NAME).read_bytes() == pki.der_of(ca.cert_pem)
    assert config["tls"] == {"ca": CA_NAME, "ntp": "ntp.plant"}
    assert (config["broker"]["host"], config["broker"]["port"]) == ("gw-1.plant", 8883)
    assert (bundle / "tern_tls.py").is_file()
    assert load_boards(tmp_path / "boards.json").boards.keys() == {BOARD}


def test_provisioning_for_a_plain_gateway_gives_no_ca_and_no_tls(tmp_path: Path) -> None:
    rc = _provision(tmp_path, "mqtt://10.0.0.5:1884", "--fleet-dir", str(tmp_path))

    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert rc == 0 and "tls" not in config and config["broker"]["port"] == 1884
    assert not (tmp_path / "bundle" / CA_NAME).exists()


@pytest.mark.parametrize("ca_file", ["missing", "server", "garbage"])
def test_provisioning_for_tls_without_a_readable_ca_registers_nothing(
    tmp_path: Path, ca_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = pki.new_ca(FLEET)
    (tmp_path / "server").write_bytes(pki.server_cert(ca, GATEWAY, [GATEWAY]).cert_pem)
    (tmp_path / "garbage").write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")

    rc = _provision(tmp_path, "mqtts://gw-1.plant:8884", "--ca-file", str(tmp_path / ca_file))

    assert rc == 1 and "CA" in capsys.readouterr().err
    assert not (tmp_path / "boards.json").exists() and not (tmp_path / "bundle").exists()


def test_the_example_config_has_the_keys_provisioning_writes_for_a_tls_board() -> None:
    example = json.loads((ESP32 / "config.example.json").read_text())

    config = board_config(
        fleet=FLEET, device=BOARD, key=bytes(32), host="gw", port=8883, mqtt_user=BOARD,
        mqtt_password="pw", sensor=adc_sensor(), tls=True,
    )  # fmt: skip

    assert example.keys() == config.keys()
    for part in ("broker", "tls", "topics", "sensor", "wifi"):
        assert example[part].keys() == config[part].keys(), part
