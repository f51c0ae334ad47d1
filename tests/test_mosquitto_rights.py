"""A fleet's broker rights on real brokers: the embedded amqtt broker with
`broker_policy`, and Mosquitto with the config `tern mosquitto-config` writes.

Each attack runs against both (parametrized). Where Mosquitto cannot refuse what amqtt
refuses (a SUBSCRIBE beyond the read rights is granted, then nothing is delivered), the
test checks what matters on both: nothing reaches the attacker or the fleet.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from broker.access import AccessControl
from broker.acl import matches
from broker.embedded import EmbeddedBroker
from broker.errors import ConnectRefused, SubscribeError
from broker.fleet_access import broker_policy
from broker.mosquitto import MosquittoProcess, find_mosquitto
from broker.mosquitto_config import write_mosquitto_config
from broker.transport import MqttTransport
from gateway.boards import BoardEntry, Boards
from tern import topics
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER
from tests.fleet_fixtures import RIGHTS_LAYOUT, build_fleet
from tests.helpers import unavailable
from tests.mqtt_fixtures import Inbox, MakeTransport

F = "plant-7"
KIT = build_fleet(RIGHTS_LAYOUT, fleet_id=F)
FLEET = KIT.fleet
BOARDS = Boards(F, "gw-1", {"esp-1": BoardEntry(bytes(32), "esp-1", "board-password")})
WAIT = 10.0
KERNEL = topics.kernel(F, "ab" * 32)


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


@pytest.fixture(params=["amqtt", "mosquitto"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Serve]:
    """`serve(broker, boards=None)`: the `broker` (coordinator or a gateway id) of FLEET."""
    kind = str(request.param)
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


# -- members do what the table allows ----------------------------------------------------


def test_members_of_a_gateway_s_broker_do_their_jobs(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve("gw-1", BOARDS)
    gateway = member(make_transport, served, "gw-1", "tern-plant-7-gw-1-down")
    heard, board_data = Inbox(), Inbox()
    gateway.subscribe(topics.updates_to(F, "gw-1"), heard)
    gateway.subscribe(topics.partials_to(F, "gw-1"), heard)
    gateway.subscribe(topics.telemetry_all(F), board_data)
    device, child = (
        member(make_transport, served, "dev-01"),
        member(make_transport, served, "gw-1a"),
    )
    board = member(make_transport, served, "esp-1")
    models, mcu = Inbox(), Inbox()
    device.subscribe(topics.global_model(F), models)
    board.subscribe(topics.mcu_model(F, "esp-1"), mcu)

    gateway.publish(topics.global_model(F), b"model", retain=True, wait=True)
    gateway.publish(topics.mcu_model(F, "esp-1"), b"int8", retain=True, wait=True)
    device.publish(topics.update(F, "gw-1", "dev-01"), b"update", wait=True)
    child.publish(topics.partial(F, "gw-1", "gw-1a"), b"partial", wait=True)
    board.publish(topics.telemetry(F, "esp-1"), b"seen", qos=1, wait=True)

    models.wait_for(lambda m: m.payload == b"model", WAIT)
    mcu.wait_for(lambda m: m.payload == b"int8", WAIT)
    heard.wait_for(lambda m: m.payload == b"partial", WAIT)
    heard.wait_for(lambda m: m.payload == b"update", WAIT)
    board_data.wait_for(lambda m: m.payload == b"seen", WAIT)
    assert served.refused == Counter()


def test_members_of_the_coordinator_s_broker_do_their_jobs(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve(COORDINATOR)
    coordinator = member(make_transport, served, COORDINATOR)
    partials, models = Inbox(), Inbox()
    coordinator.subscribe(topics.partials_to(F, COORDINATOR), partials)
    gateway = member(make_transport, served, "gw-2")
    gateway.subscribe(topics.global_model(F), models)

    coordinator.publish(topics.global_model(F), b"model", retain=True, wait=True)
    gateway.publish(topics.partial(F, COORDINATOR, "gw-2"), b"partial", wait=True)
    gateway.publish(topics.status(F, "gw-2"), b"online", retain=True, wait=True)

    models.wait_for(lambda m: m.payload == b"model", WAIT)
    partials.wait_for(lambda m: m.payload == b"partial", WAIT)
    assert served.refused == Counter()


# -- strangers -------------------------------------------------------------------------


def test_strangers_anonymous_clients_and_wrong_passwords_are_refused(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve("gw-1", BOARDS)
    stranger = ("dev-01", KIT.logins["dev-02"].password)

    refused(make_transport, served, "tern-plant-7-dev-01")  # anonymous
    refused(make_transport, served, "x", login=("mallory", "pw"))
    refused(make_transport, served, "tern-plant-7-dev-01", login=stranger)
    refused(make_transport, served, "esp-1", login=("esp-1", "guess"))
    refused(make_transport, served, "coordinator", login=KIT.login(COORDINATOR))  # not here

    assert member(make_transport, served, "dev-01").connected
    if served.kind == "amqtt":
        assert served.refused == {"anonymous": 1, "unknown_user": 2, "bad_password": 2}


def test_anonymous_clients_get_nothing_on_the_coordinator_s_broker(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve(COORDINATOR)

    refused(make_transport, served, "coordinator")
    refused(make_transport, served, "dashboard")
    refused(make_transport, served, "x", login=("", ""))

    assert member(make_transport, served, COORDINATOR).connected


# -- a compromised device --------------------------------------------------------------


def test_a_device_cannot_publish_the_model_schedule_kernel_or_another_device_s_update(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve("gw-1", BOARDS)
    gateway = member(make_transport, served, "gw-1", "tern-plant-7-gw-1-down")
    gateway.publish(topics.global_model(F), b"genuine model", retain=True, wait=True)
    observer, heard = Inbox(), Inbox()
    member(make_transport, served, OBSERVER, "dashboard").subscribe(everything(), observer)
    gateway.subscribe(topics.updates_to(F, "gw-1"), heard)
    rogue = member(make_transport, served, "dev-01")

    forged = [
        (topics.global_model(F), True),
        (topics.round_schedule(F), True),
        (KERNEL, True),
        (topics.update(F, "gw-1", "dev-02"), False),
        (topics.partial(F, "gw-1", "dev-01"), False),
        (topics.status(F, "dev-02"), True),
        (topics.mcu_model(F, "esp-1"), True),
        (topics.telemetry(F, "esp-1"), False),
    ]
    for topic, retain in forged:
        rogue.publish(topic, b"forged", retain=retain, wait=True)
    rogue.publish(topics.update(F, "gw-1", "dev-01"), b"its own update", wait=True)

    heard.wait_for(lambda m: m.payload == b"its own update", WAIT)
    observer.wait_for(lambda m: m.payload == b"its own update", WAIT)
    assert [m for m in [*heard.messages, *observer.messages] if m.payload == b"forged"] == []
    fresh = Inbox()
    member(make_transport, served, "dev-02").subscribe(topics.global_model(F), fresh)
    assert fresh.wait_for(timeout=WAIT).payload == b"genuine model"  # the retained one stands
    if served.kind == "amqtt":
        assert served.refused == {"publish_denied": len(forged)}


def test_a_device_cannot_read_everything_or_another_device_s_update(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve("gw-1", BOARDS)
    gateway, spy = Inbox(), Inbox()
    member(make_transport, served, "gw-1", "tern-plant-7-gw-1-down").subscribe(
        topics.updates_to(F, "gw-1"), gateway
    )
    rogue = member(make_transport, served, "dev-01")
    wide = [
        raw("#"),
        everything(),
        topics.updates_to(F, "gw-1"),
        topics.update(F, "gw-1", "dev-02"),
    ]

    refusals = 0
    for topic_filter in wide:
        try:
            rogue.subscribe(topic_filter, spy)
        except SubscribeError:
            refusals += 1
    member(make_transport, served, "dev-02").publish(
        topics.update(F, "gw-1", "dev-02"), b"private", wait=True
    )

    gateway.wait_for(lambda m: m.payload == b"private", WAIT)
    assert spy.messages == []
    # Mosquitto grants a SUBSCRIBE and filters each delivery; amqtt refuses it outright.
    assert refusals == (len(wide) if served.kind == "amqtt" else 0)
    if served.kind == "amqtt":
        assert served.refused == {"subscribe_denied": len(wide)}


def test_a_last_will_on_someone_else_s_topic_never_reaches_anyone(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve("gw-1", BOARDS)
    observer = Inbox()
    member(make_transport, served, OBSERVER, "dashboard").subscribe(everything(), observer)
    login = KIT.login("dev-01")

    rc = raw_connect(served, "tern-plant-7-dev-01", login, (topics.global_model(F).path, True))
    rc_own = raw_connect(
        served, "tern-plant-7-dev-01", login, (topics.status(F, "dev-01").path, True)
    )
    device = member(make_transport, served, "dev-02")
    device.publish(topics.status(F, "dev-02"), b"marker", retain=True, wait=True)

    observer.wait_for(lambda m: m.payload == b"will", WAIT)  # its own will went through
    observer.wait_for(lambda m: m.payload == b"marker", WAIT)
    assert [m.topic for m in observer.messages if m.payload == b"will"] == [
        topics.status(F, "dev-01").path
    ]
    assert rc_own == 0
    if served.kind == "amqtt":
        assert rc == 5 and served.refused == {"will_denied": 1}


# -- the observer ----------------------------------------------------------------------


def test_the_observer_reads_everything_and_publishes_nothing(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve(COORDINATOR)
    coordinator = member(make_transport, served, COORDINATOR)
    partials = Inbox()
    coordinator.subscribe(topics.partials_to(F, COORDINATOR), partials)
    coordinator.publish(topics.global_model(F), b"model", retain=True, wait=True)
    seen = Inbox()
    observer = member(make_transport, served, OBSERVER, "dashboard")
    observer.subscribe(everything(), seen)
    gateway = member(make_transport, served, "gw-1")

    for topic in [topics.partial(F, COORDINATOR, "gw-1"), topics.global_model(F),
                  topics.status(F, "gw-1")]:  # fmt: skip
        observer.publish(topic, b"from the observer", retain=True, wait=True)
    gateway.publish(topics.partial(F, COORDINATOR, "gw-1"), b"partial", wait=True)
    gateway.publish(topics.metrics(F, "gw-1"), b"metrics", retain=True, wait=True)

    seen.wait_for(lambda m: m.payload == b"model", WAIT)  # retained, read on subscribing
    seen.wait_for(lambda m: m.payload == b"partial", WAIT)
    seen.wait_for(lambda m: m.payload == b"metrics", WAIT)
    partials.wait_for(lambda m: m.payload == b"partial", WAIT)
    assert [m for m in [*seen.messages, *partials.messages] if b"observer" in m.payload] == []
    if served.kind == "amqtt":
        assert served.refused == {"publish_denied": 3}


# -- client ids ------------------------------------------------------------------------


def test_a_stranger_using_a_member_s_client_id_is_refused(
    serve: Serve, make_transport: MakeTransport
) -> None:
    served = serve(COORDINATOR)

    refused(make_transport, served, "coordinator")
    refused(make_transport, served, "coordinator", login=(COORDINATOR, "guess"))
    refused(make_transport, served, "tern-plant-7-gw-1-up", login=("gw-1", "guess"))

    assert member(make_transport, served, COORDINATOR).connected
    if served.kind == "amqtt":  # with Mosquitto, a member's client id is its user name
        refused(make_transport, served, "coordinator", login=KIT.login("gw-1"))
        refused(make_transport, served, "coordinator", login=KIT.login(OBSERVER))
        assert served.refused["client_id_reserved"] == 2


@pytest.mark.parametrize(
    "intruder",
    [None, (COORDINATOR, "guess"), ("gw-1", "member-with-the-wrong-id")],
    ids=["anonymous", "bad-password", "another-member"],
)
def test_a_refused_connect_never_displaces_the_real_client(
    serve: Serve, make_transport: MakeTransport, intruder: tuple[str, str] | None
) -> None:
    """The issue's attack: even a refused CONNECT with the coordinator's client id
    dropped its subscriptions on amqtt (fixed in broker/embedded.py)."""
    served = serve(COORDINATOR)
    coordinator = member(make_transport, served, COORDINATOR)
    partials = Inbox()
    coordinator.subscribe(topics.partials_to(F, COORDINATOR), partials)
    login = None
    if intruder is not None:
        user, password = intruder
        login = KIT.login(user) if password == "member-with-the-wrong-id" else intruder

    with suppress(ConnectRefused):  # refused on both, but for a member on Mosquitto
        make_transport(served.url, "coordinator", login=login, backoff_max=0.05).close()
    gateway = member(make_transport, served, "gw-1")
    gateway.publish(topics.partial(F, COORDINATOR, "gw-1"), b"partial", wait=True)

    partials.wait_for(lambda m: m.payload == b"partial", WAIT)
    assert coordinator.connected and coordinator.stats.reconnects == 0


# -- raw MQTT, for what paho does not let a test do (drop without DISCONNECT) -----------


def raw_connect(
    served: Served, client_id: str, login: tuple[str, str], will: tuple[str, bool]
) -> int:
    """CONNECT with a last will (payload b"will", QoS 1), read the CONNACK's return code,
    then drop the connection without DISCONNECT, so the broker publishes the will."""
    will_topic, will_retain = will

    def text(value: str | bytes) -> bytes:
        data = value.encode() if isinstance(value, str) else value
        return struct.pack("!H", len(data)) + data

    flags = 0x80 | 0x40 | 0x08 | 0x04 | 0x02 | (0x20 if will_retain else 0)
    body = text("MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
    body += text(client_id) + text(will_topic) + text(b"will") + text(login[0]) + text(login[1])
    assert len(body) < 128
    with socket.create_connection((served.host, served.port), timeout=WAIT) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                break
            connack += chunk
    return connack[3] if len(connack) == 4 else -1
