"""TLS for tern's MQTT links: the ssl contexts of clients and brokers, where their files are
by default, and the flags that name them.

A fleet's certificates are files in its fleet directory (`tern fleet init`, tern.pki):
``ca.crt`` (the fleet CA), ``{broker}.server.crt``/``.key`` for each broker, and with mTLS
``{member}.client.crt``/``.key`` for each member. This module reads files only; it does not
import `tern.pki` (and `cryptography`), which a device install does not have: its file
names are repeated here, and a test keeps the two in step.

Clients (`TlsClient`, `client_context`) verify the broker's certificate against the CA and
its host name against the URL's, over TLS 1.2 or later. Brokers (`TlsServer`,
`server_context`) serve their certificate over TLS 1.2 or later and, with
`require_client_cert`, refuse a client without a certificate signed by the CA.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from pathlib import Path

from broker.errors import BrokerConfigError, TransportError
from broker.transport_types import TlsClient
from broker.urls import parse_url

__all__ = [
    "CA_FILE",
    "TlsClient",
    "TlsServer",
    "add_client_arguments",
    "add_server_arguments",
    "client_context",
    "client_files",
    "client_tls",
    "client_tls_from_args",
    "connect_failure",
    "context_for",
    "server_context",
    "server_files",
    "server_tls",
    "server_tls_from_args",
]

CA_FILE = "ca.crt"  # tern.pki.CA_CERT


def server_files(broker: str) -> tuple[str, str]:
    """`broker`'s server certificate and key file names (tern.pki.server_files)."""
    return f"{broker}.server.crt", f"{broker}.server.key"


def client_files(member: str) -> tuple[str, str]:
    """`member`'s client certificate and key file names (tern.pki.client_files)."""
    return f"{member}.client.crt", f"{member}.client.key"


@dataclass(frozen=True, slots=True)
class TlsServer:
    """How a broker's listeners speak TLS: its certificate and key, and the CA whose
    client certificates it accepts (needed for `require_client_cert`, mTLS)."""

    cert_file: str
    key_file: str
    ca_file: str | None = None
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        if self.require_client_cert and self.ca_file is None:
            raise BrokerConfigError("requiring client certificates needs the CA that signs them")


def client_context(tls: TlsClient) -> ssl.SSLContext:
    """The ssl context of a client: the CA's certificates only, host names checked, TLS 1.2
    or later, and its own certificate when it has one. TransportError naming the file
    that cannot be read."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=tls.ca_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise TransportError(f"cannot read the CA file {tls.ca_file}: {_brief(exc)}") from exc
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ValueError) as exc:
            raise TransportError(
                f"cannot read the client certificate {tls.cert_file} or its key"
                f" {tls.key_file}: {_brief(exc)}"
            ) from exc
    return context


def context_for(url: str, secure: bool, tls: TlsClient | None) -> ssl.SSLContext | None:
    """The ssl context a client of `url` (``mqtts://``: `secure`) needs: TransportError
    when the URL and the TLS settings disagree, or a file cannot be read."""
    if secure and tls is None:
        raise TransportError(f"{url} is a TLS URL: it needs the fleet CA (--ca-file)")
    if tls is not None and not secure:
        raise TransportError(
            f"{url} is a plaintext URL and TLS settings were given: use mqtts:// for TLS"
        )
    return None if tls is None else client_context(tls)


def server_context(tls: TlsServer) -> ssl.SSLContext:
    """The ssl context of a broker's listeners (TLS 1.2 or later); BrokerConfigError
    naming the file that cannot be read."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ValueError) as exc:
        raise BrokerConfigError(
            f"cannot read the server certificate {tls.cert_file} or its key {tls.key_file}:"
            f" {_brief(exc)}"
        ) from exc
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except (OSError, ValueError) as exc:
            raise BrokerConfigError(
                f"cannot read the CA file {tls.ca_file}: {_brief(exc)}"
            ) from exc
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _brief(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)[:200]


def connect_failure(exc: BaseException) -> str:
    """Why a connection attempt failed, in a few words: the TLS reason (``certificate
    verify failed: ...``) for a TLS failure, the system's words for a socket error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or ""
        return f"TLS: certificate verify failed: {detail}"[:200]
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {_brief(exc)}"[:200]
    if isinstance(exc, ssl.CertificateError):  # a host name mismatch found after the handshake
        return f"TLS: {exc}"[:200]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:200]
    return (str(exc) or type(exc).__name__)[:200]


def client_tls(
    url: str,
    fleet_file: str | Path,
    key_file: str | Path,
    member: str,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file_tls: str | Path | None = None,
) -> TlsClient | None:
    """The TLS settings of `member` for the broker at `url`: None for a plain ``mqtt://``
    URL. The CA is `ca_file`, by default ``ca.crt`` beside the fleet file; the client
    certificate is `cert_file` and `key_file_tls`, by default ``{member}.client.crt`` and
    ``.key`` beside the member's key file when both are there. TransportError for a file
    that is not there."""
    if not parse_url(url).tls:
        return None
    ca = Path(ca_file) if ca_file is not None else Path(fleet_file).parent / CA_FILE
    if not ca.is_file():
        raise TransportError(
            f"{url} is a TLS URL and there is no CA file {ca}"
            + ("" if ca_file is not None else " (tern fleet init writes it; or give --ca-file)")
        )
    if (cert_file is None) != (key_file_tls is None):
        raise TransportError("--cert-file and --cert-key-file go together")
    if cert_file is None or key_file_tls is None:
        crt, key = (Path(key_file).parent / name for name in client_files(member))
        if not (crt.is_file() and key.is_file()):
            return TlsClient(str(ca))
        cert_file, key_file_tls = crt, key
    for path in (cert_file, key_file_tls):
        if not Path(path).is_file():
            raise TransportError(f"no client certificate file {path}")
    return TlsClient(str(ca), str(cert_file), str(key_file_tls))


def server_tls(directory: str | Path, broker: str, require_client_cert: bool = False) -> TlsServer:
    """The TLS settings of `broker` (``coordinator`` or a gateway id) from a fleet
    directory: its ``{broker}.server.crt``/``.key``, and ``ca.crt`` for client
    certificates. BrokerConfigError for a file that is not there."""
    folder = Path(directory)
    cert, key = (folder / name for name in server_files(broker))
    ca = folder / CA_FILE
    for path in (cert, key):
        if not path.is_file():
            raise BrokerConfigError(
                f"no {path.name} in {folder} for broker {broker}'s TLS listener"
                " (tern fleet init writes it; --tls-dir names another directory)"
            )
    if require_client_cert and not ca.is_file():
        raise BrokerConfigError(f"--require-client-cert needs the fleet CA {ca}")
    return TlsServer(str(cert), str(key), str(ca) if ca.is_file() else None, require_client_cert)


# -- flags ------------------------------------------------------------------------------


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """--ca-file, --cert-file and --cert-key-file, for the mqtts:// URLs a component uses."""
    group = parser.add_argument_group("TLS (for mqtts:// URLs)")
    group.add_argument(
        "--ca-file", metavar="FILE", help="the fleet CA (default: ca.crt beside --fleet-file)"
    )
    group.add_argument(
        "--cert-file",
        metavar="FILE",
        help="client certificate for brokers that require one (default: ID.client.crt"
        " beside --key, when there)",
    )
    group.add_argument(
        "--cert-key-file", metavar="FILE", help="its key (default: ID.client.key beside --key)"
    )


def client_tls_from_args(args: argparse.Namespace, url: str, member: str) -> TlsClient | None:
    """`client_tls` for `url` from the flags of `add_client_arguments` (and --fleet-file,
    --key)."""
    return client_tls(
        url, args.fleet_file, args.key, member, args.ca_file, args.cert_file, args.cert_key_file
    )


def add_server_arguments(parser: argparse.ArgumentParser, broker: str, title: str) -> None:
    """--tls, --tls-dir, --require-client-cert and --ws-port, for an embedded broker whose
    certificate is `broker`.server.crt."""
    group = parser.add_argument_group(title)
    group.add_argument(
        "--tls",
        action="store_true",
        help=f"serve TLS (mqtts://) with {broker}.server.crt/.key from the fleet directory",
    )
    group.add_argument(
        "--tls-dir", metavar="DIR", help="where the certificates are (default: --fleet-file's)"
    )
    group.add_argument(
        "--require-client-cert",
        action="store_true",
        help="with --tls: refuse clients without a certificate of the fleet CA (mTLS)",
    )
    group.add_argument(
        "--ws-port",
        type=int,
        metavar="N",
        help="also serve MQTT over WebSockets on port N, path /mqtt (wss:// with --tls)",
    )


def server_tls_from_args(
    args: argparse.Namespace, broker: str, fleet_file: str | Path | None
) -> TlsServer | None:
    """`server_tls` from the flags of `add_server_arguments`: None without --tls."""
    if not args.tls:
        if args.require_client_cert or args.tls_dir is not None:
            raise BrokerConfigError("--tls-dir and --require-client-cert go with --tls")
        return None
    if args.tls_dir is not None:
        directory: str | Path = args.tls_dir
    elif fleet_file is not None:
        directory = Path(fleet_file).parent
    else:
        raise BrokerConfigError("--tls needs --tls-dir (or --fleet-file) to find the certificate")
    return server_tls(directory, broker, args.require_client_cert)
