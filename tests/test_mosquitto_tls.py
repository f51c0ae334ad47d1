"""`tern mosquitto-config --tls --ws-port --plain-port` on a real Mosquitto: TLS with the
fleet CA, MQTT over WebSockets and a loopback plaintext listener, one set of logins and
rights on every listener, and mutual TLS when client certificates are required."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.mosquitto import MosquittoProcess, find_mosquitto, free_port, wait_until_accepting
from tern import topics
from tern.cli import main
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER, Login, is_observer
from tern.pki import new_ca, server_files
from tests.helpers import unavailable

F = "plant-7"
INIT = f"fleet init --fleet {F} --gateway gw-1=dev-01,dev-02 --gateway gw-1a@gw-1=dev-03"
WAIT = 5.0


class Broker:
    """A Mosquitto with the config `tern mosquitto-config` wrote, and the fleet beside it."""

    def __init__(self, fleet_dir: Path, proc: MosquittoProcess, ports: dict[str, int]) -> None:
        self.fleet_dir, self.proc, self.ports = fleet_dir, proc, ports
        self.ca = str(fleet_dir / "ca.crt")
        self.conf = (proc.workdir / "mosquitto" / "mosquitto.conf").read_text()

    def login(self, user: str) -> tuple[str, str]:
        name = f"{user}.json" if is_observer(user) else f"{user}.login"
        login = Login.from_json((self.fleet_dir / name).read_text())
        return login.username, login.password


class Client:
    """A paho client connected (or refused) on a port: the CONNACK's reason, messages."""

    def __init__(
        self,
        port: int,
        *,
        ca: str | None = None,
        login: tuple[str, str] | None = None,
        ws: bool = False,
        cert: tuple[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, transport="websockets" if ws else "tcp"
        )
        if ws:
            self.client.ws_set_options(path="/mqtt")
        if ca is not None:  # hostname verification on: paho's default
            certfile, keyfile = cert if cert is not None else (None, None)
            self.client.tls_set(ca_certs=ca, certfile=certfile, keyfile=keyfile)
        if login is not None:
            self.client.username_pw_set(*login)
        self.answered = threading.Event()
        self.reason: str | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.received = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.answered.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        self.answered.wait(WAIT)

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        self.reason = str(reason)
        self.answered.set()

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with self.received:
            self.messages.append((message.topic, bytes(message.payload)))
            self.received.notify_all()

    @property
    def accepted(self) -> bool:
        return self.reason == "Success" and self.client.is_connected()

    def publish(self, topic: topics.Topic, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic.path, payload, qos=1, retain=retain).wait_for_publish(WAIT)

    def subscribe(self, topic: topics.Topic) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe(topic.path, qos=1)
        assert done.wait(WAIT)

    def wait_for(self, payload: bytes, timeout: float = WAIT) -> bool:
        with self.received:
            return self.received.wait_for(
                lambda: any(p == payload for _, p in self.messages), timeout
            )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _start(
    tmp: Path,
    *init_extra: str,
    mtls: bool = False,
    ws: bool = True,
    plain: bool = True,
    observers: tuple[str, ...] = (),
) -> Iterator[Broker]:
    binary = find_mosquitto()
    if binary is None:
        unavailable("mosquitto is not installed (apt-get install mosquitto)")
    fleet_dir = tmp / "fleet"
    assert main([*INIT.split(), "--out", str(fleet_dir), *init_extra]) == 0
    for name in observers:  # one more read-only login each (tern fleet add-observer)
        assert main(["fleet", "add-observer", "--fleet-dir", str(fleet_dir), name]) == 0
    ports: dict[str, int] = {}

    def configure(workdir: Path, host: str, port: int) -> Path:
        ports.update(tls=port, ws=free_port(host), plain=free_port(host))
        args = ["mosquitto-config", "--fleet-file", str(fleet_dir / "fleet.json")]
        args += ["--host", host, "--port", str(port), "--out", str(workdir / "mosquitto")]
        args += ["--tls", *(["--require-client-cert"] if mtls else [])]
        args += ["--ws-port", str(ports["ws"])] if ws else []
        args += ["--plain-port", str(ports["plain"])] if plain else []
        assert main(args) == 0
        return workdir / "mosquitto" / "mosquitto.conf"

    with MosquittoProcess(binary, tmp / "run", configure=configure) as proc:
        for name in ("ws", "plain") if ws and plain else ():
            wait_until_accepting("127.0.0.1", ports[name], WAIT)
        yield Broker(fleet_dir, proc, ports)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    yield from _start(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def viewers_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    tmp = tmp_path_factory.mktemp("viewers")
    yield from _start(tmp, ws=False, plain=False, observers=("wall",))


@pytest.fixture(scope="module")
def mtls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    yield from _start(tmp_path_factory.mktemp("mtls"), "--mtls", mtls=True, ws=False, plain=False)


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def test_the_tls_listener_serves_members_that_trust_the_fleet_ca(
    broker: Broker, clients: list[Client]
) -> None:
    coordinator = Client(broker.ports["tls"], ca=broker.ca, login=broker.login(COORDINATOR))
    observer = Client(
        broker.ports["tls"], ca=broker.ca, login=broker.login(OBSERVER), host="localhost"
    )
    clients += [coordinator, observer]
    assert coordinator.accepted and observer.accepted
    observer.subscribe(topics.global_model(F))

    coordinator.publish(topics.global_model(F), b"model over tls", retain=True)

    assert observer.wait_for(b"model over tls")


def test_a_plaintext_client_is_refused_by_the_tls_listener(
    broker: Broker, clients: list[Client]
) -> None:
    plain = Client(broker.ports["tls"], login=broker.login(COORDINATOR))
    clients.append(plain)

    assert not plain.accepted
    assert plain.reason is None  # no CONNACK at all: the broker hung up


def test_a_client_that_trusts_another_ca_is_refused(broker: Broker, tmp_path: Path) -> None:
    stranger = new_ca(F)  # the same fleet name, another key
    (tmp_path / "other-ca.crt").write_bytes(stranger.cert_pem)

    with pytest.raises(ssl.SSLCertVerificationError):
        Client(broker.ports["tls"], ca=str(tmp_path / "other-ca.crt"), login=broker.login(OBSERVER))


def test_a_server_name_the_certificate_does_not_carry_is_refused(broker: Broker) -> None:
    context = ssl.create_default_context(cafile=broker.ca)

    with (
        socket.create_connection(("127.0.0.1", broker.ports["tls"]), timeout=WAIT) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        # the certificate names localhost, 127.0.0.1, ::1 and coordinator only
        context.wrap_socket(raw, server_hostname="elsewhere.plant.example")


def test_an_anonymous_client_is_refused_by_the_tls_listener(
    broker: Broker, clients: list[Client]
) -> None:
    anonymous = Client(broker.ports["tls"], ca=broker.ca)
    clients.append(anonymous)

    assert not anonymous.accepted
    assert anonymous.reason is not None and anonymous.reason != "Success"


def test_the_websockets_listener_takes_the_logins_and_enforces_the_same_rights(
    broker: Broker, clients: list[Client]
) -> None:
    port = broker.ports["ws"]
    coordinator = Client(broker.ports["tls"], ca=broker.ca, login=broker.login(COORDINATOR))
    gateway = Client(port, ca=broker.ca, login=broker.login("gw-1"), ws=True)
    observer = Client(port, ca=broker.ca, login=broker.login(OBSERVER), ws=True)
    anonymous = Client(port, ca=broker.ca, ws=True)
    clients += [coordinator, gateway, observer, anonymous]
    assert coordinator.accepted and gateway.accepted and observer.accepted
    assert not anonymous.accepted
    coordinator.subscribe(topics.partials_to(F, COORDINATOR))
    gateway.subscribe(topics.partials_to(F, COORDINATOR))  # it may write there, not read
    observer.subscribe(topics.global_model(F))

    gateway.publish(topics.partial(F, COORDINATOR, "gw-1"), b"partial over ws")
    observer.publish(topics.global_model(F), b"forged by the observer", retain=True)
    coordinator.publish(topics.global_model(F), b"model after", retain=True)

    assert coordinator.wait_for(b"partial over ws")
    assert observer.wait_for(b"model after")
    assert not gateway.wait_for(b"partial over ws", timeout=0.5)
    assert all(p != b"forged by the observer" for _, p in observer.messages)


def test_the_plaintext_listener_is_on_loopback_only_and_takes_logins(
    broker: Broker, clients: list[Client]
) -> None:
    member = Client(broker.ports["plain"], login=broker.login(OBSERVER))
    anonymous = Client(broker.ports["plain"])
    clients += [member, anonymous]

    assert member.accepted and not anonymous.accepted
    assert f"listener {broker.ports['plain']} 127.0.0.1\n" in broker.conf


def test_the_config_sets_tls_1_2_and_client_ids_on_every_listener(broker: Broker) -> None:
    conf = broker.conf

    assert conf.count("\nlistener ") == 3
    assert conf.count("use_username_as_clientid true") == 3
    assert conf.count("max_connections ") == 3
    assert conf.count("tls_version tlsv1.2") == 2  # the TLS and WebSockets listeners
    assert "per_listener_settings false" in conf
    assert "protocol websockets" in conf
    assert "require_certificate" not in conf
    assert conf.index("allow_anonymous false") < conf.index("\nlistener ")
    out = broker.proc.workdir / "mosquitto"
    key = out / server_files(COORDINATOR)[1]
    assert key.stat().st_mode & 0o777 == 0o600
    assert (out / "ca.crt").read_bytes() == (broker.fleet_dir / "ca.crt").read_bytes()


def test_with_client_certificates_required_a_login_alone_is_not_enough(
    mtls_broker: Broker, clients: list[Client]
) -> None:
    port, fleet_dir = mtls_broker.ports["tls"], mtls_broker.fleet_dir
    cert = (str(fleet_dir / "gw-1.client.crt"), str(fleet_dir / "gw-1.client.key"))
    with_cert = Client(port, ca=mtls_broker.ca, login=mtls_broker.login("gw-1"), cert=cert)
    cert_no_login = Client(port, ca=mtls_broker.ca, cert=cert)
    clients += [with_cert, cert_no_login]

    assert with_cert.accepted
    assert not cert_no_login.accepted  # the certificate does not replace the login
    try:  # TLS 1.2 refuses in the handshake; TLS 1.3 reports it after the handshake
        no_cert = Client(port, ca=mtls_broker.ca, login=mtls_broker.login("gw-1"))
    except (ssl.SSLError, OSError):
        return
    clients.append(no_cert)
    assert not no_cert.accepted


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--require-client-cert"], "client certificates need TLS"),
        (["--tls", "--broker", "gw-1a", "--tls-dir", "{empty}"], "is missing"),
        (["--tls", "--ws-port", "{port}"], "its own port"),
    ],
)
def test_mosquitto_config_refuses_tls_it_cannot_serve(
    tmp_path: Path, extra: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet_dir = tmp_path / "fleet"
    assert main([*INIT.split(), "--out", str(fleet_dir)]) == 0
    (tmp_path / "empty").mkdir()
    words = [w.format(empty=tmp_path / "empty", port=8883) for w in extra]

    rc = main(
        [
            *["mosquitto-config", "--fleet-file", str(fleet_dir / "fleet.json")],
            *["--out", str(tmp_path / "out"), *words],
        ]
    )

    assert rc == 2
    assert expected in capsys.readouterr().err


def test_a_gateway_broker_serves_its_own_certificate(tmp_path: Path) -> None:
    fleet_dir = tmp_path / "fleet"
    assert main([*INIT.split(), "--out", str(fleet_dir)]) == 0

    rc = main(
        [
            *["mosquitto-config", "--fleet-file", str(fleet_dir / "fleet.json")],
            *["--broker", "gw-1", "--tls", "--out", str(tmp_path / "out")],
        ]
    )

    assert rc == 0
    copied = (tmp_path / "out" / "gw-1.server.crt").read_bytes()
    assert copied == (fleet_dir / "gw-1.server.crt").read_bytes()
    assert "listener 8884 0.0.0.0" in (tmp_path / "out" / "mosquitto.conf").read_text()


def test_two_viewers_sharing_the_observer_login_knock_each_other_off(
    viewers_broker: Broker, clients: list[Client]
) -> None:
    """Why `tern fleet add-observer` exists: Mosquitto binds a client id to its login."""
    port, ca = viewers_broker.ports["tls"], viewers_broker.ca
    first = Client(port, ca=ca, login=viewers_broker.login(OBSERVER))
    clients.append(first)
    assert first.accepted
    second = Client(port, ca=ca, login=viewers_broker.login(OBSERVER))
    clients.append(second)

    assert second.accepted
    deadline = time.monotonic() + WAIT
    while first.client.is_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not first.client.is_connected()


def test_each_viewer_with_its_own_observer_login_reads_the_fleet_at_once(
    viewers_broker: Broker, clients: list[Client]
) -> None:
    port, ca = viewers_broker.ports["tls"], viewers_broker.ca
    coordinator = Client(port, ca=ca, login=viewers_broker.login(COORDINATOR))
    shared = Client(port, ca=ca, login=viewers_broker.login(OBSERVER))
    wall = Client(port, ca=ca, login=viewers_broker.login("observer-wall"))
    clients += [coordinator, shared, wall]
    assert coordinator.accepted and shared.accepted and wall.accepted
    shared.subscribe(topics.metrics(F, COORDINATOR))
    wall.subscribe(topics.metrics(F, COORDINATOR))
    wall.subscribe(topics.global_model(F))

    wall.publish(topics.global_model(F), b"forged by a viewer")  # read-only: dropped
    coordinator.publish(topics.metrics(F, COORDINATOR), b"round 1")

    assert shared.wait_for(b"round 1") and wall.wait_for(b"round 1")
    assert shared.client.is_connected() and wall.client.is_connected()
    assert not wall.wait_for(b"forged by a viewer", timeout=0.5)
