"""MqttTransport over TLS (mqtts://, broker.tls) to real brokers with the fleet's real
certificates (`tern fleet init --mtls`): the embedded broker's TLS listener and Mosquitto's.
A wrong CA, a host name the certificate does not carry, an expired certificate, a
plaintext client and a client without a certificate where one is required are refused,
and the client says why in one line."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.embedded import EmbeddedBroker
from broker.errors import BrokerConfigError, ConnectTimeout, TransportError
from broker.limits import BrokerLimits
from broker.mosquitto import MosquittoProcess, find_mosquitto
from broker.tls import CA_FILE, TlsServer, client_files, client_tls, server_files, server_tls
from broker.transport import MqttTransport, TlsClient, format_url
from tern import pki, topics
from tern.cli import main
from tern.fleet import COORDINATOR
from tests.helpers import unavailable
from tests.mqtt_fixtures import Inbox, MakeTransport

F = "plant-7"
HOST = "127.0.0.1"
REFUSED_WITHIN = 1.0  # seconds a refused client tries before it gives up


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleet with its PKI: ca.crt, a server certificate per broker, client certificates."""
    directory = tmp_path_factory.mktemp("pki") / "fleet"
    init = ["fleet", "init", "--fleet", F, "--gateway", "gw-1=dev-01", "--mtls"]
    assert main([*init, "--out", str(directory)]) == 0
    return directory


def trusting(fleet_dir: Path, member: str | None = None) -> TlsClient:
    """The fleet CA, and `member`'s client certificate when given."""
    if member is None:
        return TlsClient(str(fleet_dir / CA_FILE))
    cert, key = client_files(member)
    return TlsClient(str(fleet_dir / CA_FILE), str(fleet_dir / cert), str(fleet_dir / key))


def refused(url: str, client_id: str, tls: TlsClient | None) -> ConnectTimeout:
    """The ConnectTimeout of a client the broker does not let in."""
    transport = MqttTransport(url, client_id, tls=tls, backoff_min=0.05, backoff_max=0.1)
    with pytest.raises(ConnectTimeout) as caught:
        transport.connect(REFUSED_WITHIN)
    return caught.value


@pytest.fixture
def tls_broker(fleet_dir: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(HOST, 0, tls=server_tls(fleet_dir, COORDINATOR)) as broker:
        yield broker


def exchange(make_transport: MakeTransport, url: str, tls: TlsClient, sub_tls: TlsClient) -> None:
    """A message published over TLS reaches a subscriber over TLS."""
    inbox = Inbox()
    make_transport(url, "watcher", tls=sub_tls).subscribe(topics.status_all(F), inbox)
    publisher = make_transport(url, "publisher", tls=tls)

    publisher.publish(topics.status(F, "gw-1"), b"over tls", wait=True)

    assert inbox.wait_for(lambda m: m.payload == b"over tls").topic == "tern/plant-7/status/gw-1"


def test_a_transport_exchanges_messages_over_tls_with_the_embedded_broker(
    tls_broker: EmbeddedBroker, fleet_dir: Path, make_transport: MakeTransport
) -> None:
    assert tls_broker.url.startswith("mqtts://127.0.0.1:")

    exchange(make_transport, tls_broker.url, trusting(fleet_dir), trusting(fleet_dir))


def mosquitto_tls(fleet_dir: Path, mtls: bool) -> Iterator[MosquittoProcess]:
    binary = find_mosquitto()
    if binary is None:
        unavailable("mosquitto is not installed (apt-get install mosquitto)")
    cert, key = server_files(COORDINATOR)

    def configure(workdir: Path, host: str, port: int) -> Path:
        config = workdir / "tls.conf"
        config.write_text(
            f"listener {port} {host}\n"
            f"cafile {fleet_dir / CA_FILE}\n"
            f"certfile {fleet_dir / cert}\nkeyfile {fleet_dir / key}\n"
            f"tls_version tlsv1.2\nrequire_certificate {'true' if mtls else 'false'}\n"
            "allow_anonymous true\n"
        )
        return config

    with MosquittoProcess(binary, fleet_dir.parent / f"mosquitto-{mtls}", configure=configure) as m:
        yield m


@pytest.fixture(scope="module")
def mosquitto(fleet_dir: Path) -> Iterator[MosquittoProcess]:
    yield from mosquitto_tls(fleet_dir, mtls=False)


def test_a_transport_exchanges_messages_over_tls_with_mosquitto(
    mosquitto: MosquittoProcess, fleet_dir: Path, make_transport: MakeTransport
) -> None:
    url = format_url(mosquitto.host, mosquitto.port, tls=True)

    exchange(make_transport, url, trusting(fleet_dir), trusting(fleet_dir))


def test_a_client_that_trusts_another_ca_is_refused_and_says_why_once(
    tls_broker: EmbeddedBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = tmp_path / "other-ca.crt"
    stranger.write_bytes(pki.new_ca(F).cert_pem)  # the same fleet name, another key

    with caplog.at_level(logging.WARNING, logger="broker.transport"):
        error = refused(tls_broker.url, "stranger", TlsClient(str(stranger)))

    assert error.reason is not None and "certificate verify failed" in error.reason
    assert "certificate verify failed" in str(error)
    said = [r for r in caplog.records if "certificate verify failed" in r.getMessage()]
    assert len(said) == 1  # however many attempts it made
    assert tls_broker.refused["tls_failed"] >= 1


def test_a_host_name_the_certificate_does_not_carry_is_refused(fleet_dir: Path) -> None:
    # 127.0.0.2 is this machine too, but not in the certificate (localhost, 127.0.0.1, ::1)
    broker = EmbeddedBroker("127.0.0.2", 0, tls=server_tls(fleet_dir, COORDINATOR)).start()
    try:
        error = refused(broker.url, "elsewhere", trusting(fleet_dir))
    finally:
        broker.stop()

    assert error.reason is not None and "mismatch" in error.reason, error.reason


def test_an_expired_server_certificate_is_refused(fleet_dir: Path, tmp_path: Path) -> None:
    ca_pem, ca_key = (fleet_dir / pki.CA_CERT).read_bytes(), (fleet_dir / pki.CA_KEY).read_bytes()
    long_ago = datetime.now(UTC) - timedelta(days=30)
    old = pki.server_cert(pki.load_ca(ca_pem, ca_key), COORDINATOR, [], days=1, now=long_ago)
    (tmp_path / "old.crt").write_bytes(old.cert_pem)
    (tmp_path / "old.key").write_bytes(old.key_pem)
    tls = TlsServer(str(tmp_path / "old.crt"), str(tmp_path / "old.key"))

    with EmbeddedBroker(HOST, 0, tls=tls) as broker:
        error = refused(broker.url, "on-time", trusting(fleet_dir))

    assert error.reason is not None and "expired" in error.reason, error.reason


def test_a_plaintext_client_is_refused_by_a_tls_listener(tls_broker: EmbeddedBroker) -> None:
    plain_url = tls_broker.url.replace("mqtts://", "mqtt://")

    error = refused(plain_url, "plain", None)

    assert error.reason is not None and "mqtts://" in error.reason  # the hint
    assert tls_broker.refused["tls_failed"] >= 1


def test_a_tls_client_is_refused_by_a_plaintext_listener(fleet_dir: Path) -> None:
    with EmbeddedBroker(HOST, 0) as plain:
        secure_url = plain.url.replace("mqtt://", "mqtts://")

        error = refused(secure_url, "secure", trusting(fleet_dir))

    assert error.reason is not None and error.reason.startswith("TLS"), error.reason


def test_a_client_without_a_certificate_is_refused_when_one_is_required(
    fleet_dir: Path, make_transport: MakeTransport
) -> None:
    tls = server_tls(fleet_dir, COORDINATOR, require_client_cert=True)
    with EmbeddedBroker(HOST, 0, tls=tls) as broker:
        error = refused(broker.url, "anonymous", trusting(fleet_dir))
        member = make_transport(broker.url, "dev-01", tls=trusting(fleet_dir, "dev-01"))

        assert member.connected
        assert error.reason is not None and "--cert-file" in error.reason, error.reason
        assert broker.refused["tls_failed"] >= 1
        member.close()


def test_a_client_without_a_certificate_is_refused_by_mosquitto_when_one_is_required(
    fleet_dir: Path, make_transport: MakeTransport
) -> None:
    for proc in mosquitto_tls(fleet_dir, mtls=True):
        url = format_url(proc.host, proc.port, tls=True)

        error = refused(url, "anonymous", trusting(fleet_dir))
        assert error.reason is not None and "certificate" in error.reason, error.reason
        assert make_transport(url, "dev-01", tls=trusting(fleet_dir, "dev-01")).connected


def test_a_tls_handshake_that_never_comes_is_cut_at_the_connect_timeout(
    fleet_dir: Path,
) -> None:
    limits = BrokerLimits(connect_timeout=0.3)
    with EmbeddedBroker(HOST, 0, tls=server_tls(fleet_dir, COORDINATOR), limits=limits) as broker:
        with socket.create_connection((HOST, broker.port), timeout=5) as silent:
            silent.settimeout(5)
            assert silent.recv(1) == b""  # closed by the broker, not by our timeout
        deadline = time.monotonic() + 5  # counted as the handshake's wait ends
        while not broker.refused["connect_timeout"] and time.monotonic() < deadline:
            time.sleep(0.01)

        assert broker.refused == {"connect_timeout": 1}


def test_tls_settings_must_match_the_url(fleet_dir: Path) -> None:
    with pytest.raises(TransportError, match="needs the fleet CA"):
        MqttTransport("mqtts://127.0.0.1:8883", "c")
    with pytest.raises(TransportError, match="plaintext"):
        MqttTransport("mqtt://127.0.0.1:1883", "c", tls=trusting(fleet_dir))
    with pytest.raises(TransportError, match="CA file"):
        MqttTransport("mqtts://127.0.0.1:8883", "c", tls=TlsClient(str(fleet_dir / "nope.crt")))


def test_client_tls_finds_the_fleet_ca_and_the_members_certificate(
    fleet_dir: Path, tmp_path: Path
) -> None:
    fleet_file, key = fleet_dir / "fleet.json", fleet_dir / "dev-01.key"

    assert client_tls("mqtt://h:1", fleet_file, key, "dev-01") is None
    assert client_tls("mqtts://h:1", fleet_file, key, "dev-01") == trusting(fleet_dir, "dev-01")
    lone_key = tmp_path / "dev-01.key"  # a key with no client certificate beside it
    assert client_tls("mqtts://h", fleet_file, lone_key, "dev-01") == trusting(fleet_dir)
    with pytest.raises(TransportError, match="no CA file"):
        client_tls("mqtts://h", tmp_path / "fleet.json", key, "dev-01")
    with pytest.raises(TransportError, match="go together"):
        client_tls("mqtts://h", fleet_file, key, "dev-01", cert_file=fleet_dir / "x.crt")


def test_server_tls_names_the_missing_certificate(fleet_dir: Path, tmp_path: Path) -> None:
    assert server_tls(fleet_dir, "gw-1").cert_file == str(fleet_dir / "gw-1.server.crt")
    with pytest.raises(BrokerConfigError, match=r"no gw-9\.server\.crt"):
        server_tls(fleet_dir, "gw-9")
    with pytest.raises(BrokerConfigError, match="fleet CA"):
        (tmp_path / "b.server.crt").write_text("")
        (tmp_path / "b.server.key").write_text("")
        server_tls(tmp_path, "b", require_client_cert=True)


def test_the_certificate_file_names_are_tern_pkis() -> None:
    assert CA_FILE == pki.CA_CERT
    assert server_files("gw-1") == pki.server_files("gw-1")
    assert client_files("dev-01") == pki.client_files("dev-01")
