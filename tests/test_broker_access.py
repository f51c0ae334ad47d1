"""An embedded broker enforcing an access policy (broker.access through broker.plugins).

Real amqtt on a free port, real paho clients: what the policy refuses never reaches a
subscriber, and every refusal is counted by reason (a fleet's whole policy runs in
tests/test_mosquitto_rights.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from broker.access import AccessControl
from broker.acl import AccessPolicy, Account, Rights
from broker.embedded import EmbeddedBroker
from broker.errors import BrokerError, ConnectRefused, SubscribeError
from broker.ratelog import LogLimiter
from tern import topics
from tern.logins import hash_password
from tests.mqtt_fixtures import Inbox, MakeTransport

FLEET = "plant-7"
BOARD_TOPIC = topics.telemetry(FLEET, "esp-1")
BOARD_STATUS = topics.status(FLEET, "esp-1")
OTHER = topics.telemetry(FLEET, "esp-2")


def policy(password: str = "pw") -> AccessPolicy:
    board = Rights(
        publish=(BOARD_TOPIC.path, BOARD_STATUS.path),
        retain=(BOARD_STATUS.path,),
        subscribe=(topics.mcu_model(FLEET, "esp-1").path,),
    )
    watcher = Rights(publish=(OTHER.path,), subscribe=(topics.telemetry_all(FLEET).path,))
    return AccessPolicy(
        accounts={
            "board": Account(hash_password(password), board, frozenset({"esp-1"})),
            "watcher": Account(hash_password("watch"), watcher),
        },
        reserved_client_ids={"esp-1": "board"},
    )


@pytest.fixture
def guarded() -> Iterator[tuple[EmbeddedBroker, AccessControl]]:
    control = AccessControl(policy())
    with EmbeddedBroker("127.0.0.1", 0, access=control) as broker:
        yield broker, control


def test_strangers_wrong_passwords_and_taken_client_ids_are_refused_and_counted(
    guarded: tuple[EmbeddedBroker, AccessControl], make_transport: MakeTransport
) -> None:
    broker, control = guarded

    with pytest.raises(ConnectRefused, match="Not authorized"):
        make_transport(broker.url, "esp-1", login=("board", "guess"), backoff_max=0.05)
    with pytest.raises(ConnectRefused):
        make_transport(broker.url, "esp-1", backoff_max=0.05)  # anonymous
    with pytest.raises(ConnectRefused):
        make_transport(broker.url, "x", login=("stranger", "pw"), backoff_max=0.05)
    with pytest.raises(ConnectRefused):
        make_transport(broker.url, "esp-1", login=("watcher", "watch"), backoff_max=0.05)

    assert make_transport(broker.url, "esp-1", login=("board", "pw")).connected
    assert make_transport(broker.url, "dashboard", login=("watcher", "watch")).connected
    assert control.refused == {
        "bad_password": 1,
        "anonymous": 1,
        "unknown_user": 1,
        "client_id_reserved": 1,
    }


def test_a_last_will_the_client_could_not_publish_or_retain_is_refused_at_connect(
    guarded: tuple[EmbeddedBroker, AccessControl], make_transport: MakeTransport
) -> None:
    """amqtt publishes a will without its topic check: it must not get that far."""
    broker, control = guarded

    with pytest.raises(ConnectRefused):
        make_transport(
            broker.url, "w", login=("watcher", "watch"), will=(BOARD_STATUS, b"x"), backoff_max=0.05
        )
    with pytest.raises(ConnectRefused):  # may publish there, but a will is retained
        make_transport(
            broker.url, "w", login=("watcher", "watch"), will=(OTHER, b"x"), backoff_max=0.05
        )
    board = make_transport(broker.url, "esp-1", login=("board", "pw"), will=(BOARD_STATUS, b"off"))

    assert board.connected
    assert control.refused == {"will_denied": 2}


def test_a_publish_the_policy_refuses_reaches_no_subscriber(
    guarded: tuple[EmbeddedBroker, AccessControl], make_transport: MakeTransport
) -> None:
    broker, control = guarded
    inbox = Inbox()
    watcher = make_transport(broker.url, "dashboard", login=("watcher", "watch"))
    watcher.subscribe(topics.telemetry_all(FLEET), inbox)
    board = make_transport(broker.url, "esp-1", login=("board", "pw"))

    watcher.publish(BOARD_TOPIC, b"forged", wait=True)
    board.publish(OTHER, b"not its topic", wait=True)
    board.publish(BOARD_TOPIC, b"genuine", wait=True)
    watcher.publish(OTHER, b"its own", wait=True)

    # each sender's refused message went before its allowed one: both in means all in
    inbox.wait_for(lambda m: m.payload == b"its own", 10.0)
    inbox.wait_for(lambda m: m.payload == b"genuine", 10.0)
    assert sorted(m.payload for m in inbox.messages) == [b"genuine", b"its own"]
    assert control.refused == {"publish_denied": 2}


def test_a_retained_publish_where_the_client_may_not_retain_is_dropped_whole(
    guarded: tuple[EmbeddedBroker, AccessControl], make_transport: MakeTransport
) -> None:
    broker, control = guarded
    inbox = Inbox()
    watcher = make_transport(broker.url, "dashboard", login=("watcher", "watch"))
    watcher.subscribe(topics.telemetry_all(FLEET), inbox)
    board = make_transport(broker.url, "esp-1", login=("board", "pw"))

    board.publish(BOARD_TOPIC, b"kept forever", retain=True, wait=True)
    board.publish(BOARD_TOPIC, b"live", wait=True)

    inbox.wait_for(lambda m: m.payload == b"live", 10.0)
    late = Inbox()  # a retained copy would reach it on subscribing, before the marker
    make_transport(broker.url, "late", login=("watcher", "watch")).subscribe(
        topics.telemetry_all(FLEET), late
    )
    watcher.publish(OTHER, b"marker", wait=True)
    late.wait_for(lambda m: m.payload == b"marker", 10.0)
    assert [m.payload for m in late.messages] == [b"marker"]
    assert [m.payload for m in inbox.messages][:1] == [b"live"]
    assert control.refused == {"retain_denied": 1}


def test_a_subscription_beyond_the_account_s_filters_is_refused(
    guarded: tuple[EmbeddedBroker, AccessControl], make_transport: MakeTransport
) -> None:
    broker, control = guarded
    board = make_transport(broker.url, "esp-1", login=("board", "pw"))

    board.subscribe(topics.mcu_model(FLEET, "esp-1"), Inbox())
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


def test_retain_answers_for_retained_publishes_and_counts_its_refusals() -> None:
    control = AccessControl(policy())

    assert control.retain("esp-1", "board", BOARD_STATUS.path)
    assert not control.retain("esp-1", "board", BOARD_TOPIC.path)  # publishable only
    assert not control.retain("x", None, BOARD_STATUS.path)
    assert control.refused == {"retain_denied": 1, "publish_denied": 1}


def test_a_flood_of_refusals_is_counted_exactly_and_logged_once_per_client_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [0.0]
    control = AccessControl(policy(), limiter=LogLimiter(60.0, clock=lambda: clock[0]))

    with caplog.at_level(logging.WARNING, logger="broker.access"):
        for _ in range(1000):
            control.publish("mallory", "watcher", BOARD_TOPIC.path)
        control.subscribe("mallory", "watcher", "#")
        control.publish("eve", "watcher", BOARD_TOPIC.path)
        clock[0] = 61.0
        control.publish("mallory", "watcher", BOARD_TOPIC.path)

    assert control.refused == {"publish_denied": 1002, "subscribe_denied": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert "999 more" in lines[-1]


def test_log_lines_never_carry_unbounded_input(caplog: pytest.LogCaptureFixture) -> None:
    control = AccessControl(policy())

    with caplog.at_level(logging.WARNING, logger="broker.access"):
        control.connect("c" * 100_000, "u" * 100_000, "p" * 100_000, "t" * 100_000)
        control.publish("id\nwith\nnewlines", "watcher", "x" * 100_000)

    assert caplog.records and all(len(r.getMessage()) < 500 for r in caplog.records)
    assert "p" * 20 not in caplog.text  # never a password
