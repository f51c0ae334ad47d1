"""A fleet's brokers and members for the broker-rights tests (tests/test_mosquitto_rights*.py).

`serving(kind, tmp_path)` starts the fleet's brokers on amqtt or Mosquitto; each test module
wraps it in its own parametrized `serve` fixture.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from broker.access import AccessControl
from broker.acl import matches
from broker.embedded import EmbeddedBroker
from broker.errors import ConnectRefused
from broker.fleet_access import broker_policy
from broker.mosquitto import MosquittoProcess, find_mosquitto
from broker.mosquitto_config import write_mosquitto_config
from broker.transport import MqttTransport
from gateway.boards import BoardEntry, Boards
from tern import topics
from tern.logins import OBSERVER
from tests.fleet_fixtures import RIGHTS_LAYOUT, build_fleet
from tests.helpers import unavailable
from tests.mqtt_fixtures import MakeTransport

__all__ = [
    "BOARDS",
    "FLEET",
    "KIT",
    "WAIT",
    "F",
    "RawFilter",
    "Serve",
    "Served",
    "everything",
    "member",
    "raw",
    "refused",
    "serving",
]

F = "plant-7"
KIT = build_fleet(RIGHTS_LAYOUT, fleet_id=F)
FLEET = KIT.fleet
BOARDS = Boards(F, "gw-1", {"esp-1": BoardEntry(bytes(32), "esp-1", "board-password")})
WAIT = 10.0


@dataclass
class Served:
    """One broker of the fleet, running."""

    kind: str  # "amqtt" or "mosquitto"
    url: str
    host: str
    port: int
    control: AccessControl | None  # amqtt only: its refusal counters

    @property
    def refused(self) -> Counter[str]:
        return Counter() if self.control is None else self.control.refused


Serve = Callable[..., Served]


@contextmanager
def serving(kind: str, tmp_path: Path) -> Iterator[Serve]:
    """`serve(broker, boards=None)`: the `broker` (coordinator or a gateway id) of FLEET,
    on `kind` ("amqtt" or "mosquitto"); stopped on leaving. Skips without mosquitto."""
    binary = find_mosquitto()
    if kind == "mosquitto" and binary is None:
        unavailable("mosquitto is not installed (apt-get install mosquitto)")

    with ExitStack() as stack:

        def start(broker: str, boards: Boards | None = None) -> Served:
            if kind == "amqtt":
                control = AccessControl(broker_policy(FLEET, broker, boards))
                amqtt = EmbeddedBroker("127.0.0.1", 0, access=control).start(WAIT)
                stack.callback(amqtt.stop)
                return Served(kind, amqtt.url, amqtt.host, amqtt.port, control)

            def configure(workdir: Path, host: str, port: int) -> Path:
                files = write_mosquitto_config(
                    FLEET, workdir / "config", broker=broker, boards=boards, host=host, port=port
                )
                return files.conf

            assert binary is not None
            process = MosquittoProcess(binary, tmp_path / broker, configure=configure)
            stack.callback(process.stop)
            return Served(kind, process.url, process.host, process.port, None)

        yield start


def member(
    make_transport: MakeTransport,
    served: Served,
    user: str,
    client_id: str | None = None,
    **kw: object,
) -> MqttTransport:
    """`user` connected to `served` with its login and its own client id (or `client_id`)."""
    login = ("esp-1", "board-password") if user == "esp-1" else KIT.login(user)
    if client_id is None:
        client_id = user if user in (OBSERVER, "esp-1") else _own_client_id(user, served)
    return make_transport(served.url, client_id, login=login, **kw)


def _own_client_id(user: str, served: Served) -> str:
    return sorted(FLEET.client_ids(user))[-1]  # a gateway's "-up": it is a child here


def refused(make_transport: MakeTransport, served: Served, client_id: str, **kw: object) -> None:
    with pytest.raises(ConnectRefused):
        make_transport(served.url, client_id, backoff_max=0.05, **kw)


@dataclass(frozen=True)
class RawFilter:
    """A filter string where the transport takes a Topic (path and matches are all it
    uses): the observer's fleet-wide filter, and filters an attacker tries."""

    path: str

    def matches(self, topic: str) -> bool:
        return matches(self.path, topic)


def raw(path: str) -> topics.Topic:
    return cast(topics.Topic, RawFilter(path))


def everything() -> topics.Topic:
    """The observer's filter: every topic of the fleet (tern.topics builds one kind)."""
    return raw(f"{topics.ROOT}/{F}/#")
