"""A fleet's broker rights on real brokers: the embedded amqtt broker with
`broker_policy`, and Mosquitto with the config `tern mosquitto-config` writes.

Each attack runs against both (parametrized). Where Mosquitto cannot refuse what amqtt
refuses (a SUBSCRIBE beyond the read rights is granted, then nothing is delivered), the
test checks what matters on both: nothing reaches the attacker or the fleet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from broker.errors import ConnectRefused
from tern import topics
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER
from tests.mqtt_fixtures import Inbox, MakeTransport
from tests.rights_helpers import BOARDS, KIT, WAIT, F, Serve, everything, member, refused, serving


@pytest.fixture(params=["amqtt", "mosquitto"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Serve]:
    """`serve(broker, boards=None)`: the `broker` (coordinator or a gateway id) of FLEET."""
    with serving(str(request.param), tmp_path) as start:
        yield start


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
