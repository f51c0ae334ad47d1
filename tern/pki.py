"""The fleet's public-key infrastructure: a fleet CA, a server certificate per broker and,
for mutual TLS, a client certificate per member.

Pure: everything is built in memory with `cryptography` and returned as PEM bytes;
`tern fleet` writes them to disk. The choices keep to what every TLS stack of the fleet
speaks, Python's ssl and Mosquitto (OpenSSL) as well as the boards' mbedTLS: ECDSA keys on
P-256, SHA-256 signatures, PEM (and DER for the boards).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tern.errors import TernError, brief

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "DEFAULT_HOSTS",
    "Issued",
    "PkiError",
    "ca_der",
    "client_cert",
    "client_files",
    "der_of",
    "load_ca",
    "new_ca",
    "server_cert",
    "server_files",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")  # always in a server certificate

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity browsers and Apple's TLS still accept for a server
SKEW = timedelta(minutes=5)  # not_valid_before lies this far back, for clocks a little behind
MAX_HOST = 253  # a DNS name's longest text form


class PkiError(TernError):
    """A certificate that cannot be issued or a CA that cannot be loaded, with the reason."""

    reason = "bad_pki"


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, both PEM (the key unencrypted PKCS#8)."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def server_files(broker: str) -> tuple[str, str]:
    """The file names of `broker`'s server certificate and key in the fleet directory."""
    return f"{broker}.server.crt", f"{broker}.server.key"


def client_files(member: str) -> tuple[str, str]:
    """The file names of `member`'s client certificate and key in the fleet directory."""
    return f"{member}.client.crt", f"{member}.client.key"


def der_of(pem: bytes) -> bytes:
    """The DER form of a PEM certificate (what a board's mbedTLS loads most cheaply)."""
    try:
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise PkiError("not a PEM certificate") from exc


def ca_der(data: bytes) -> bytes:
    """`data`, one CA certificate in PEM (as ca.crt is written) or DER, as DER (what a
    board's bundle carries); PkiError unless it is a certificate that may sign others."""
    try:
        pem = data.lstrip().startswith(b"-----BEGIN")
        cert = x509.load_pem_x509_certificate(data) if pem else x509.load_der_x509_certificate(data)
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise PkiError("not a CA certificate (PEM or DER)") from exc
    if not ca:
        raise PkiError("not a CA certificate: it cannot sign others")
    return cert.public_bytes(serialization.Encoding.DER)


def new_ca(fleet: str, *, days: int = CA_DAYS, now: datetime | None = None) -> Issued:
    """A self-signed CA for `fleet` that signs only leaf certificates (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"tern fleet {fleet}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"tern fleet {fleet} CA"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _dated(x509.CertificateBuilder(), days, now)
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return Issued(_pem(builder.sign(key, hashes.SHA256())), _key_pem(key))


def load_ca(cert_pem: bytes, key_pem: bytes) -> Issued:
    """A fleet CA read back from its two PEM files, checked to be a CA whose key matches."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError("the CA certificate or key is not readable PEM") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the CA key is not an EC key")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise PkiError("the CA certificate has no basic constraints") from exc
    if not constraints.ca:
        raise PkiError("the CA certificate is not a CA")
    if cert.public_key() != key.public_key():
        raise PkiError("the CA key does not match the CA certificate")
    return Issued(cert_pem, key_pem)


def server_cert(
    ca: Issued,
    broker: str,
    hosts: Sequence[str],
    *,
    days: int = LEAF_DAYS,
    now: datetime | None = None,
) -> Issued:
    """`broker`'s server certificate (CN = broker id), valid for every name and address in
    `hosts`, the broker id and DEFAULT_HOSTS."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*hosts, broker, *DEFAULT_HOSTS]:
        general = _general_name(host)
        if str(general.value) not in seen:
            seen.add(str(general.value))
            names.append(general)
    extra = x509.SubjectAlternativeName(names)
    return _leaf(ca, broker, ExtendedKeyUsageOID.SERVER_AUTH, days, now, extra)


def client_cert(
    ca: Issued, member: str, *, days: int = LEAF_DAYS, now: datetime | None = None
) -> Issued:
    """`member`'s client certificate for mutual TLS (CN = member id, clientAuth only).

    It also names the member in a DNS subject alternative name: RFC 5280 profiles (and
    `cryptography`'s verifier) expect one, and the clientAuth-only usage keeps it from
    ever passing as a server."""
    sans = x509.SubjectAlternativeName([_general_name(member)])
    return _leaf(ca, member, ExtendedKeyUsageOID.CLIENT_AUTH, days, now, sans)


def _leaf(
    ca: Issued,
    subject: str,
    usage: x509.ObjectIdentifier,
    days: int,
    now: datetime | None,
    sans: x509.SubjectAlternativeName,
) -> Issued:
    if not subject or len(subject) > 64:  # X.520 caps a common name at 64 characters
        raise PkiError("a certificate's subject must be 1 to 64 characters")
    ca_cert = ca.cert
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PkiError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _dated(x509.CertificateBuilder(), days, now)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(sans, critical=False)
    )
    return Issued(_pem(builder.sign(ca_key, hashes.SHA256())), _key_pem(key))


def _general_name(host: str) -> x509.GeneralName:
    if not host or len(host) > MAX_HOST:
        raise PkiError("a host name must be 1 to 253 characters")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    label_ok = all(
        # underscores are not in the DNS grammar, but fleet ids may hold them and TLS
        # stacks match them as plain characters
        0 < len(label) <= 63
        and label.replace("-", "").replace("_", "").isalnum()
        and label.isascii()
        for label in host.split(".")
    )
    if not label_ok:
        raise PkiError(f"not a DNS name or IP address: {brief(host)}")
    return x509.DNSName(host.lower())


def _dated(
    builder: x509.CertificateBuilder, days: int, now: datetime | None
) -> x509.CertificateBuilder:
    if days < 1:
        raise PkiError("a certificate must be valid for at least a day")
    start = (now or datetime.now(UTC)) - SKEW
    return (
        builder.serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + SKEW + timedelta(days=days))
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
