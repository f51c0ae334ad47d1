"""ESP32 boards over TLS: the real firmware under CPython, real TLS, a real NTP exchange.

Mosquitto serves the gateway's floor network with logins and a TLS listener whose
certificate comes from tern.pki; a real Gateway (plain loopback listener, its fleet login)
seals each board's int8 model there. The board is firmware/esp32 under CPython (ussl and
ntptime shims over CPython's ssl and a UDP socket): it sets its clock from an SNTP server
run by the test, then connects with TLS on the fleet CA, and accepts only HMAC-checked
models. The MicroPython WebAssembly port has no ssl: the same ordering runs there with
in-memory modules (test_firmware_tls_board.py).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from broker.mosquitto import MosquittoProcess, find_mosquitto, free_port
from broker.mosquitto_config import write_mosquitto_config
from broker.tls import TlsClient, TlsServer
from broker.urls import parse_url
from demo.boards import DemoBoards
from firmware.config import board_config, replay_sensor
from firmware.errors import DepsUnavailable
from firmware.sim import SimulatedBoard
from gateway import Gateway, GatewayConfig
from gateway.boards import Boards, new_board_entry, save_boards
from tern import pki, topics
from tern.logins import OBSERVER
from tern.mcu import open_mcu
from tern.reports import State, Status
from tests.boards_helpers import FLEET, KIT, start_gateway
from tests.helpers import unavailable, wait_until
from tests.mqtt_fixtures import AmqttBroker, MakeTransport, listen
from tests.test_gateway_boards import publish_model

BOARD = "esp-1"
GATEWAY = "gw-1"
WAIT = 15.0
NTP_DELTA = 2_208_988_800


class SntpServer:
    """A real (S)NTP server on a free UDP port of loopback, answering with the host's clock
    (RFC 4330 server mode); `queries` counts the requests it answered."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                request, addr = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            if len(request) < 48 or request[0] & 0x07 != 3:  # client mode only
                continue
            now = time.time() + NTP_DELTA
            seconds, fraction = int(now), int((now % 1) * 2**32)
            reply = bytearray(48)
            reply[0], reply[1] = 0x1C, 1  # version 3, server mode; stratum 1
            reply[24:32] = request[40:48]  # originate = the client's transmit time
            struct.pack_into("!II", reply, 32, seconds, fraction)  # receive
            struct.pack_into("!II", reply, 40, seconds, fraction)  # transmit
            self.queries += 1
            self.sock.sendto(reply, addr)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@dataclass
class Pki:
    """The fleet CA, the gateway broker's certificate files, and the board's registration."""

    ca: pki.Issued
    cert_file: Path
    key_file: Path
    boards_file: Path


@dataclass
class Floor(Pki):
    """The gateway's floor network on Mosquitto: a plain listener for the gateway, TLS
    listeners for the boards."""

    broker: MosquittoProcess
    tls_port: int
    other_tls_port: int  # the same listener on 127.0.0.2, a name not in the certificate


def _pki(tmp: Path) -> Pki:
    ca = pki.new_ca(FLEET)
    server = pki.server_cert(ca, GATEWAY, [GATEWAY])  # plus localhost, 127.0.0.1, ::1
    certs = tmp / "certs"
    certs.mkdir()
    cert_file, key_file = (certs / n for n in pki.server_files(GATEWAY))
    cert_file.write_bytes(server.cert_pem)
    key_file.write_bytes(server.key_pem)
    key_file.chmod(0o600)
    (certs / pki.CA_CERT).write_bytes(ca.cert_pem)
    boards_file = tmp / "boards.json"
    save_boards(boards_file, Boards(FLEET, GATEWAY, {BOARD: new_board_entry(BOARD)}))
    return Pki(ca, cert_file, key_file, boards_file)


def _floor(tmp: Path, stack: ExitStack) -> Floor:
    binary = find_mosquitto()
    if binary is None:
        unavailable("mosquitto is not installed (apt-get install mosquitto)")
    keys = _pki(tmp)
    boards = Boards.from_json(keys.boards_file.read_text())
    cert_file, key_file = keys.cert_file, keys.key_file
    tls_port, other_port = free_port(), free_port("127.0.0.2")

    def configure(workdir: Path, host: str, port: int) -> Path:
        files = write_mosquitto_config(
            KIT.fleet, workdir / "mosquitto", broker=GATEWAY, boards=boards, host=host, port=port
        )
        tls = "".join(
            f"\nlistener {p} {h}\ncertfile {cert_file}\nkeyfile {key_file}\n"
            for h, p in (("127.0.0.1", tls_port), ("127.0.0.2", other_port))
        )
        files.conf.write_text(files.conf.read_text() + tls)
        return files.conf

    broker = MosquittoProcess(binary, tmp / "mosquitto", configure=configure)
    stack.callback(broker.stop)
    return Floor(keys.ca, cert_file, key_file, keys.boards_file, broker, tls_port, other_port)


@pytest.fixture
def floor(tmp_path: Path, stack: ExitStack) -> Floor:
    return _floor(tmp_path, stack)


@pytest.fixture
def keys(tmp_path: Path) -> Pki:
    return _pki(tmp_path)


@pytest.fixture
def ntp() -> Iterator[SntpServer]:
    server = SntpServer()
    yield server
    server.stop()


def _board(
    floor: Pki,
    tmp: Path,
    stack: ExitStack,
    *,
    port: int,
    ntp_port: int,
    ca: pki.Issued | None = None,
    host: str = "127.0.0.1",
    ntp_tries: int = 3,
) -> SimulatedBoard:
    entry = Boards.from_json(floor.boards_file.read_text()).boards[BOARD]
    windows = tmp / "windows.txt"
    windows.write_text("".join(",".join(["1"] * 8) + "\n" for _ in range(4)))
    config = board_config(
        fleet=FLEET,
        device=BOARD,
        key=entry.key,
        host=host,
        port=port,
        mqtt_user=entry.mqtt_user,
        mqtt_password=entry.mqtt_password,
        sensor=replay_sensor(),
        rate_hz=20,
        tls=True,
        ntp_host="127.0.0.1",
    )
    config["tls"]["ntp_tries"] = ntp_tries
    der = pki.der_of((ca or floor.ca).cert_pem)
    try:
        sim = SimulatedBoard(config, windows, work_dir=tmp / "board", ca_der=der, ntp_port=ntp_port)
    except DepsUnavailable as exc:
        unavailable(f"umqtt.simple is not cached and PyPI is unreachable: {exc}")
    stack.callback(lambda: sim.stop() if sim.running else None)
    return sim.start()


def test_a_board_sets_its_clock_then_gets_its_sealed_model_over_tls(
    floor: Floor,
    ntp: SntpServer,
    amqtt_broker: AmqttBroker,
    make_transport: MakeTransport,
    tmp_path: Path,
    stack: ExitStack,
) -> None:
    start_gateway(stack, amqtt_broker.url, floor.boards_file, floor.broker.url)
    status = listen(make_transport, amqtt_broker.url, topics.status(FLEET, BOARD), "s")
    publish_model(amqtt_broker.url, make_transport, 3)

    board = _board(floor, tmp_path, stack, port=floor.tls_port, ntp_port=ntp.port)

    assert board.wait_until(lambda b: b.model_version == 3, WAIT), board.stats
    assert board.tls_version in ("TLSv1.2", "TLSv1.3")
    assert ntp.queries >= 1 and board.ntp.is_set
    assert abs(board.ntp.now() - time.time()) < 2.0
    assert board.stats["accepted"] == 1 and board.stats["rejected"] == {}
    assert board.wait_until(lambda b: b.stats["telemetry"] >= 2, WAIT)
    online = status.wait_for(lambda m: Status.from_json(m.payload).state == State.ONLINE, WAIT)
    assert Status.from_json(online.payload).id == BOARD  # relayed up by the gateway
    stored = (board.store_dir / "model.bin").read_bytes()
    key = Boards.from_json(floor.boards_file.read_text()).boards[BOARD].key
    assert open_mcu(stored, key, FLEET, BOARD).model_version == 3  # the HMAC-checked copy


def _refused(board: SimulatedBoard, text: str) -> bool:
    return board.stats["connect_failures"] >= 2 and text in board.board.last_error


def test_a_board_given_another_ca_is_refused_by_the_handshake(
    floor: Floor, ntp: SntpServer, make_transport: MakeTransport, tmp_path: Path, stack: ExitStack
) -> None:
    status = listen(
        make_transport, floor.broker.url, topics.status(FLEET, BOARD), "o", KIT.login(OBSERVER)
    )

    board = _board(
        floor, tmp_path, stack, port=floor.tls_port, ntp_port=ntp.port, ca=pki.new_ca(FLEET)
    )

    assert board.wait_until(lambda b: _refused(b, "CERTIFICATE_VERIFY_FAILED"), WAIT)
    assert board.ntp.is_set and board.clients_made >= 2  # it tried, TLS said no
    assert board.model_version is None and board.stats["accepted"] == 0
    assert board.tls_version is None and status.messages == []


def test_a_board_refuses_a_broker_whose_certificate_does_not_name_it(
    floor: Floor, ntp: SntpServer, tmp_path: Path, stack: ExitStack
) -> None:
    board = _board(
        floor, tmp_path, stack, ntp_port=ntp.port, host="127.0.0.2", port=floor.other_tls_port
    )

    assert board.wait_until(lambda b: _refused(b, "IP address mismatch"), WAIT), (
        board.board.last_error
    )
    assert board.model_version is None and board.tls_version is None


def test_a_board_without_a_clock_does_not_connect_until_ntp_answers(
    floor: Floor,
    amqtt_broker: AmqttBroker,
    make_transport: MakeTransport,
    tmp_path: Path,
    stack: ExitStack,
) -> None:
    start_gateway(stack, amqtt_broker.url, floor.boards_file, floor.broker.url)
    publish_model(amqtt_broker.url, make_transport, 3)
    ntp_port = free_port()  # nothing answers there yet (UDP)

    board = _board(floor, tmp_path, stack, port=floor.tls_port, ntp_port=ntp_port, ntp_tries=1)

    assert board.wait_until(lambda b: _refused(b, "clock_not_set"), WAIT), board.stats
    assert board.clients_made == 0  # no TCP, no TLS: refused before the broker is asked
    assert board.board.tls.refused["clock_not_set"] >= 2 and not board.ntp.is_set
    ntp = SntpServer(ntp_port)
    stack.callback(ntp.stop)
    assert board.wait_until(lambda b: b.model_version == 3, WAIT), board.stats
    assert board.ntp.is_set and board.clients_made >= 1 and board.tls_version is not None


def _tls_gateway(keys: Pki, upstream_url: str, boards_file: Path, stack: ExitStack) -> Gateway:
    """A gateway whose own (embedded) broker serves TLS with the gateway's certificate."""
    ca_file = str(keys.cert_file.with_name(pki.CA_CERT))
    config = GatewayConfig(
        GATEWAY,
        upstream_url,
        listen_port=0,
        backoff_min=0.05,
        backoff_max=0.3,
        boards_file=str(boards_file),
        login=KIT.logins[GATEWAY],
        listen_tls=TlsServer(str(keys.cert_file), str(keys.key_file)),
        downstream_tls=TlsClient(ca_file, None, None),
    )
    gateway = Gateway(config, KIT.fleet, KIT.keys[GATEWAY])
    stack.callback(gateway.stop)
    return gateway.start()


def test_a_board_gets_its_model_over_tls_from_the_gateways_own_tls_broker(
    keys: Pki,
    ntp: SntpServer,
    amqtt_broker: AmqttBroker,
    make_transport: MakeTransport,
    tmp_path: Path,
    stack: ExitStack,
) -> None:
    gateway = _tls_gateway(keys, amqtt_broker.url, keys.boards_file, stack)
    url = parse_url(gateway.downstream_url)
    publish_model(amqtt_broker.url, make_transport, 5)

    board = _board(keys, tmp_path, stack, port=url.port, ntp_port=ntp.port)

    assert url.tls
    assert board.wait_until(lambda b: b.model_version == 5, WAIT), board.stats
    assert board.tls_version is not None and board.stats["rejected"] == {}
    assert board.wait_until(lambda b: b.stats["telemetry"] >= 2, WAIT)


def test_the_demos_boards_run_over_tls_given_the_fleet_ca(
    keys: Pki,
    amqtt_broker: AmqttBroker,
    make_transport: MakeTransport,
    tmp_path: Path,
    stack: ExitStack,
) -> None:
    rng = np.random.default_rng(0)
    mcus = DemoBoards(FLEET, [GATEWAY], 2, tmp_path / "demo", rng)
    boards_file = mcus.boards_file(GATEWAY)
    assert boards_file is not None
    gateway = _tls_gateway(keys, amqtt_broker.url, Path(boards_file), stack)
    publish_model(amqtt_broker.url, make_transport, 4)
    x_test = rng.normal(0, 1, (256, 8)).astype(np.float32)
    y_test = rng.integers(0, 3, 256)
    stack.callback(mcus.stop)
    ca_file = keys.cert_file.with_name(pki.CA_CERT)

    mcus.start({GATEWAY: gateway.downstream_url}, amqtt_broker.url, x_test, y_test, ca_file=ca_file)

    assert mcus.skipped is None and len(mcus.boards) == 2
    for sim in mcus.boards:
        assert sim.wait_until(lambda b: b.model_version == 4 and b.tls_version is not None, WAIT)
    wait_until(lambda: all(r["predictions"] >= 2 for r in mcus.rows()), WAIT)
    assert all(r["tls"] and r["model_version"] == 4 for r in mcus.rows())
    with pytest.raises(ValueError, match="fleet CA"):
        DemoBoards(FLEET, [GATEWAY], 1, tmp_path / "d2", rng).start(
            {GATEWAY: gateway.downstream_url}, amqtt_broker.url, x_test, y_test
        )
