"""An embedded broker enforcing an access policy (broker.access through broker.plugins).

Real amqtt on a free port, real paho clients: what the policy refuses never reaches a
subscriber, and every refusal is counted by reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from broker.access import AccessControl
from broker.acl import AccessPolicy, Account
from broker.embedded import EmbeddedBroker
from broker.errors import BrokerError, ConnectRefused, SubscribeError
from tern import topics
from tests.mqtt_fixtures import Inbox, MakeTransport

FLEET = "plant-7"
SECRET = topics.telemetry(FLEET, "esp-1")  # reserved to user "board"
OPEN = topics.telemetry(FLEET, "dev-01")
QUIET = 0.5


def policy(password: str = "pw") -> AccessPolicy:
    return AccessPolicy(
        accounts={"board": Account(password, publish=frozenset({SECRET.path}), subscribe=None)},
        reserved={SECRET.path: frozenset({"board"})},
        client_ids={"esp-1": "board"},
    )


@pytest.fixture
def guarded() -> Iterator[tuple[EmbeddedBroker, AccessControl]]:
    control = AccessControl(policy())
    with EmbeddedBroker("127.0.0.1", 0, access=control) as broker:
        yield broker, control


def test_a_wrong_password_or_a_taken_client_id_is_refused_and_counted(
    guarded: tuple[EmbeddedBroker, AccessControl], make_transport: MakeTransport
) -> None:
    broker, control = guarded

    with pytest.raises(ConnectRefused, match="Not authorized"):
        make_transport(broker.url, "esp-1", login=("board", "guess"), backoff_max=0.05)
    with pytest.raises(ConnectRefused):
        make_transport(broker.url, "esp-1", backoff_max=0.05)  # anonymous, the board's id
    with pytest.raises(ConnectRefused):
        make_transport(broker.url, "x", login=("stranger", "pw"), backoff_max=0.05)

    assert make_transport(broker.url, "esp-1", login=("board", "pw")).connected
    assert make_transport(broker.url, "dev-01").connected  # anonymous, its own id
    refused = control.refused
    assert (refused["bad_password"], refused["client_id_reserved"]) == (1, 1)
    assert refused["unknown_user"] == 1


def test_a_last_will_on_a_reserved_topic_is_refused_at_connect(
    guarded: tuple[EmbeddedBroker, AccessControl], make_transport: MakeTransport
) -> None:
    """amqtt publishes a will without its topic check: it must not get that far."""
    broker, control = guarded

    with pytest.raises(ConnectRefused):
        make_transport(broker.url, "intruder", will=(SECRET, b"offline"), backoff_max=0.05)
    board = make_transport(broker.url, "esp-1", login=("board", "pw"), will=(SECRET, b"offline"))

    assert board.connected
    assert control.refused == {"will_denied": 1}


def test_a_publish_the_policy_refuses_reaches_no_subscriber(
    guarded: tuple[EmbeddedBroker, AccessControl], make_transport: MakeTransport
) -> None:
    broker, control = guarded
    inbox = Inbox()
    make_transport(broker.url, "watcher").subscribe(topics.telemetry_all(FLEET), inbox)
    stranger = make_transport(broker.url, "stranger")
    board = make_transport(broker.url, "esp-1", login=("board", "pw"))

    stranger.publish(SECRET, b"forged", wait=True)
    stranger.publish(OPEN, b"open", wait=True)
    board.publish(OPEN, b"not its topic", wait=True)
    board.publish(SECRET, b"genuine", wait=True)

    inbox.wait_for(lambda m: m.payload == b"genuine", 10.0)
    time.sleep(QUIET)
    assert sorted(m.payload for m in inbox.messages) == [b"genuine", b"open"]
    assert control.refused == {"publish_denied": 2}


def test_an_account_with_listed_subscriptions_gets_only_those(
    make_transport: MakeTransport,
) -> None:
    listed = AccessPolicy({"board": Account("pw", subscribe=frozenset({SECRET.path}))})
    control = AccessControl(listed)
    with EmbeddedBroker("127.0.0.1", 0, access=control) as broker:
        board = make_transport(broker.url, "esp-1", login=("board", "pw"))

        board.subscribe(SECRET, Inbox())
        with pytest.raises(SubscribeError, match="refused"):
            board.subscribe(topics.telemetry_all(FLEET), Inbox())

    assert control.refused == {"subscribe_denied": 1}


def test_a_new_policy_applies_to_the_next_connection(
    guarded: tuple[EmbeddedBroker, AccessControl], make_transport: MakeTransport
) -> None:
    broker, control = guarded
    control.set_policy(policy(password="rotated"))

    with pytest.raises(ConnectRefused):
        make_transport(broker.url, "esp-1", login=("board", "pw"), backoff_max=0.05)
    assert make_transport(broker.url, "esp-1", login=("board", "rotated")).connected


def test_the_plugin_refuses_to_start_without_an_access_control() -> None:
    config = {"plugins": {"broker.plugins.AccessPlugin": {"control": "not one"}}}
    with pytest.raises(BrokerError, match="AccessControl"):
        EmbeddedBroker("127.0.0.1", 0, config=config).start(timeout=5)
