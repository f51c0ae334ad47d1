"""`tern demo --tls`: every link of the demo speaks TLS with the demo fleet's CA and a
login; every one of its brokers refuses a plaintext or an anonymous connection."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from broker.urls import parse_url
from demo.run import run_demo
from demo.watching import WatchPoints
from tern.logins import Login

REPO = Path(__file__).resolve().parent.parent


def _text(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def _connect(client_id: str, login: Login | None) -> bytes:
    """An MQTT 3.1.1 CONNECT, with a username and password when `login` is given."""
    flags = 0x02 | (0xC0 if login else 0)
    body = _text(b"MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + _text(client_id.encode())
    if login:
        body += _text(login.username.encode()) + _text(login.password.encode())
    return bytes([0x10, len(body)]) + body


def _answer(sock: socket.socket) -> bytes:
    """The first bytes the broker sends back, b"" when it hangs up without a word."""
    sock.settimeout(5.0)
    try:
        return sock.recv(4)
    except (ConnectionResetError, ssl.SSLError, TimeoutError):
        return b""


def _plain(url: str, login: Login) -> bytes:
    host, port, _ = parse_url(url)
    with socket.create_connection((host, port), timeout=5.0) as sock:
        sock.sendall(_connect("plain-probe", login))
        return _answer(sock)


def _secure(url: str, ca: Path, login: Login | None) -> bytes:
    host, port, _ = parse_url(url)
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, port), timeout=5.0) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        sock.sendall(_connect("tls-probe", login))
        return _answer(sock)


def test_tls_demo_refuses_plaintext_and_anonymous_clients_on_every_broker() -> None:
    seen: list[tuple[str, bytes, bytes, bytes]] = []

    def probe(points: WatchPoints) -> None:
        login = Login.from_json(points.login_file.read_text())  # the observer's
        ca = points.login_file.with_name("ca.crt")
        for url in points.brokers:
            seen.append((url, _plain(url, login), _secure(url, ca, None), _secure(url, ca, login)))

    result = run_demo(
        devices=4, gateways=2, rounds=2, boards=1, trainer="numpy", out=None, tls=True,
        on_ready=probe,
    )  # fmt: skip

    assert result.tls and result.to_json()["tls"] is True
    assert [r["contributors"] for r in result.rounds] == [4, 4]
    assert [b["tls"] for b in result.boards] == [True]
    assert result.boards[0]["model_version"] == 2
    # the top broker and both gateways' brokers, each an mqtts:// listener
    assert len(seen) == 3 and all(url.startswith("mqtts://") for url, *_ in seen)
    for url, plain, anonymous, member in seen:
        assert not plain.startswith(b"\x20"), (url, plain)  # no CONNACK over plaintext
        assert anonymous[:1] != b"\x20" or anonymous[3:4] != b"\x00", (url, anonymous)
        assert member == b"\x20\x02\x00\x00", (url, member)  # the observer's login is let in


def test_tls_demo_learns_the_same_model_as_the_plaintext_demo() -> None:
    """TLS changes the links, not the rounds: the same seed gives the same accuracies."""
    kwargs = {"devices": 4, "gateways": 2, "rounds": 2, "boards": 0, "trainer": "numpy"}
    plain = run_demo(**kwargs, out=None)  # type: ignore[arg-type]
    secure = run_demo(**kwargs, out=None, tls=True)  # type: ignore[arg-type]

    assert not plain.tls and secure.tls
    assert [r["accuracy"] for r in secure.rounds] == [r["accuracy"] for r in plain.rounds]
    assert [r["bytes_device_to_gateway"] for r in secure.rounds] == [
        r["bytes_device_to_gateway"] for r in plain.rounds
    ]


def test_tls_demo_command_says_so_in_its_json() -> None:
    args = [sys.executable, "-m", "demo", "--devices", "4", "--gateways", "2", "--rounds", "2"]
    done = subprocess.run(
        [*args, "--boards", "1", "--tls", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tls"] is True
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert "mqtts://" in done.stderr  # where to watch: the TLS broker
