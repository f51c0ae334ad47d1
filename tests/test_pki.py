"""The fleet's PKI (tern.pki): certificates that chain to the fleet CA, with the right names,
usages and dates, and that Python's ssl accepts for a real TLS handshake."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from tern.pki import (
    DEFAULT_HOSTS,
    Issued,
    PkiError,
    client_cert,
    client_files,
    der_of,
    load_ca,
    new_ca,
    server_cert,
    server_files,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return new_ca("plant-7", now=NOW)


def _verify_server(ca: Issued, leaf: Issued, host: str, at: datetime = NOW) -> None:
    store = Store([ca.cert])
    verifier = PolicyBuilder().store(store).time(at).build_server_verifier(_subject(host))
    verifier.verify(leaf.cert, [])


def _subject(host: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _verify_client(ca: Issued, leaf: Issued, at: datetime = NOW) -> None:
    PolicyBuilder().store(Store([ca.cert])).time(at).build_client_verifier().verify(leaf.cert, [])


def _sans(leaf: Issued) -> list[str]:
    ext = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in [*ext.get_values_for_type(x509.DNSName)]] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


def test_the_ca_is_a_p256_sha256_ca_limited_to_leaves(ca: Issued) -> None:
    cert = ca.cert

    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert constraints.ca is True and constraints.path_length == 0
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.issuer == cert.subject


def test_a_server_certificate_chains_to_the_ca_for_every_name_given(ca: Issued) -> None:
    leaf = server_cert(ca, "gw-1", ["edge-7.plant.example", "10.0.4.2"], now=NOW)

    for host in ["edge-7.plant.example", "10.0.4.2", "gw-1", *DEFAULT_HOSTS]:
        _verify_server(ca, leaf, host)
    assert set(_sans(leaf)) == {"edge-7.plant.example", "gw-1", "localhost", "10.0.4.2", "::1"} | {
        "127.0.0.1"
    }
    assert leaf.cert.subject.rfc4514_string() == "CN=gw-1"


def test_a_server_certificate_is_refused_for_a_name_it_does_not_carry(ca: Issued) -> None:
    leaf = server_cert(ca, "coordinator", ["broker.plant.example"], now=NOW)

    with pytest.raises(VerificationError):
        _verify_server(ca, leaf, "other.plant.example")


def test_a_certificate_from_another_ca_does_not_verify(ca: Issued) -> None:
    stranger = new_ca("plant-7", now=NOW)  # same fleet name, different key
    leaf = server_cert(stranger, "coordinator", [], now=NOW)

    with pytest.raises(VerificationError):
        _verify_server(ca, leaf, "localhost")


def test_server_and_client_certificates_carry_only_their_own_usage(ca: Issued) -> None:
    server = server_cert(ca, "coordinator", [], now=NOW)
    client = client_cert(ca, "dev-1", now=NOW)

    server_eku = server.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    client_eku = client.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(server_eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(client_eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    _verify_client(ca, client)
    with pytest.raises(VerificationError):
        _verify_client(ca, server)
    for leaf in (server, client):
        constraints = leaf.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca is False


def test_a_client_certificate_names_its_member(ca: Issued) -> None:
    leaf = client_cert(ca, "dev-1", now=NOW)

    assert leaf.cert.subject.rfc4514_string() == "CN=dev-1"


def test_certificates_start_a_little_in_the_past_and_end_after_their_days(ca: Issued) -> None:
    leaf = server_cert(ca, "coordinator", [], days=30, now=NOW)

    assert leaf.cert.not_valid_before_utc < NOW
    assert NOW - leaf.cert.not_valid_before_utc <= timedelta(minutes=10)
    assert leaf.cert.not_valid_after_utc == NOW + timedelta(days=30)
    assert ca.cert.not_valid_after_utc == NOW + timedelta(days=3650)


def test_an_expired_certificate_does_not_verify(ca: Issued) -> None:
    leaf = server_cert(ca, "coordinator", [], days=30, now=NOW)

    with pytest.raises(VerificationError):
        _verify_server(ca, leaf, "localhost", at=NOW + timedelta(days=31))


def test_the_ca_reloads_from_its_pem_files_and_still_signs(ca: Issued) -> None:
    again = load_ca(ca.cert_pem, ca.key_pem)

    _verify_client(ca, client_cert(again, "dev-9", now=NOW))


@pytest.mark.parametrize("which", ["mismatched key", "leaf as ca", "garbage"])
def test_loading_a_ca_refuses_what_is_not_a_matching_ca(ca: Issued, which: str) -> None:
    other = new_ca("x", now=NOW)
    leaf = server_cert(ca, "coordinator", [], now=NOW)
    cert, key = {
        "mismatched key": (ca.cert_pem, other.key_pem),
        "leaf as ca": (leaf.cert_pem, leaf.key_pem),
        "garbage": (b"not pem", ca.key_pem),
    }[which]

    with pytest.raises(PkiError):
        load_ca(cert, key)


@pytest.mark.parametrize("host", ["", "bad host", "a" * 300, "-x..y"])
def test_a_host_that_is_neither_a_name_nor_an_address_is_refused(ca: Issued, host: str) -> None:
    with pytest.raises(PkiError):
        server_cert(ca, "coordinator", [host], now=NOW)


def test_der_of_gives_the_same_certificate_in_der(ca: Issued) -> None:
    der = der_of(ca.cert_pem)

    assert x509.load_der_x509_certificate(der) == ca.cert
    with pytest.raises(PkiError):
        der_of(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_file_names_follow_the_broker_and_member_ids() -> None:
    assert server_files("gw-1") == ("gw-1.server.crt", "gw-1.server.key")
    assert client_files("dev-1") == ("dev-1.client.crt", "dev-1.client.key")


def test_python_ssl_completes_a_mutual_tls_handshake_with_hostname_checks(tmp_path: Path) -> None:
    ca = new_ca("plant-7")
    server = server_cert(ca, "coordinator", ["broker.plant.example"])
    client = client_cert(ca, "dev-1")
    paths = {}
    for name, data in {
        "ca.crt": ca.cert_pem,
        "s.crt": server.cert_pem,
        "s.key": server.key_pem,
        "c.crt": client.cert_pem,
        "c.key": client.key_pem,
    }.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = str(tmp_path / name)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    server_ctx.load_cert_chain(paths["s.crt"], paths["s.key"])
    server_ctx.load_verify_locations(paths["ca.crt"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=paths["ca.crt"])
    client_ctx.load_cert_chain(paths["c.crt"], paths["c.key"])
    peer: list[object] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                peer.append(tls.getpeercert())
                tls.sendall(b"ok")

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname="broker.plant.example") as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(5)

    assert peer and "dev-1" in str(peer[0])
    bad = ssl.create_default_context(cafile=paths["ca.crt"])
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=lambda: _accept_quietly(listener, server_ctx), daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            bad.wrap_socket(raw, server_hostname="elsewhere.example")
        thread.join(5)


def _accept_quietly(listener: socket.socket, ctx: ssl.SSLContext) -> None:
    conn, _ = listener.accept()
    try:
        ctx.wrap_socket(conn, server_side=True).close()
    except (ssl.SSLError, OSError):
        conn.close()
