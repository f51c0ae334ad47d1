"""TLS for `tern demo --tls`: the demo fleet's own CA and a server certificate for each of
its brokers (the coordinator's and every gateway's), made with tern.pki exactly as
`tern fleet init` makes them, written into the demo's state directory.

Every link of the demo then speaks TLS 1.2+ with the fleet CA and a login: a client
without TLS, or without a login, is refused by every one of its brokers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.tls import TlsClient, TlsServer
from tern.pki import CA_CERT, DEFAULT_HOSTS, new_ca, server_cert, server_files

__all__ = ["DemoTls", "make_demo_tls", "write_file"]


@dataclass(frozen=True, slots=True)
class DemoTls:
    """Where the demo's certificates are, and the TLS settings made of them."""

    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / CA_CERT

    @property
    def client(self) -> TlsClient:
        """What every client of the demo trusts: the demo fleet's CA, nothing else."""
        return TlsClient(str(self.ca_file))

    def server(self, broker: str) -> TlsServer:
        """`broker`'s listener: its own certificate, signed by the demo fleet's CA."""
        cert, key = server_files(broker)
        return TlsServer(str(self.directory / cert), str(self.directory / key))


def make_demo_tls(directory: Path, fleet: str, brokers: Sequence[str]) -> DemoTls:
    """A new CA for `fleet` and a server certificate for each of `brokers` (valid for
    loopback: localhost, 127.0.0.1, ::1 and the broker's id), in `directory`. The CA's key
    stays in memory: the demo issues nothing later."""
    ca = new_ca(fleet)
    write_file(directory / CA_CERT, ca.cert_pem, 0o644)
    for broker in brokers:
        issued = server_cert(ca, broker, DEFAULT_HOSTS)
        cert, key = server_files(broker)
        write_file(directory / cert, issued.cert_pem, 0o644)
        write_file(directory / key, issued.key_pem, 0o600)
    return DemoTls(directory)


def write_file(path: Path, data: bytes, mode: int) -> None:
    """`data` in a new file at `path`, created with `mode` (0600 for a secret: never
    readable by others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
