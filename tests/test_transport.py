"""MqttTransport against real brokers (amqtt and mosquitto on free loopback ports)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.embedded import EmbeddedBroker
from broker.errors import ConnectTimeout, PublishError, SubscribeError, TransportError
from broker.transport import Message, MqttTransport, backoff_delay, format_url, parse_url
from tern import topics
from tern.reports import State, Status
from tests.mqtt_fixtures import AmqttBroker, Inbox, MakeTransport, RunningBroker

REPO = Path(__file__).resolve().parents[1]
FLEET = "plant-7"


def offline(component: str) -> Status:
    return Status(component, "device", State.OFFLINE, "0.1.0", "connection lost")


def status_of(component: str, state: State) -> Callable[[Message], bool]:
    """A predicate on messages: the status of `component` in `state`."""

    def matches(message: Message) -> bool:
        return (
            topics.status(FLEET, component).matches(message.topic)
            and Status.from_json(message.payload).state == state
        )

    return matches


# -- round trips ------------------------------------------------------------------------


def test_published_message_reaches_a_subscriber(
    any_broker: RunningBroker, make_transport: MakeTransport
) -> None:
    inbox = Inbox()
    subscriber = make_transport(any_broker.url, "gw-1")
    subscriber.subscribe(topics.updates_to(FLEET, "gw-1"), inbox)
    publisher = make_transport(any_broker.url, "dev-3")

    publisher.publish(topics.update(FLEET, "gw-1", "dev-3"), b"\x00delta\xff", wait=True)

    message = inbox.wait_for()
    assert message == Message(topics.update(FLEET, "gw-1", "dev-3").path, b"\x00delta\xff", False)
    assert publisher.stats.messages_out == 1 and publisher.stats.bytes_out == 7
    assert subscriber.stats.messages_in == 1 and subscriber.stats.bytes_in == 7


def test_retained_message_reaches_a_late_subscriber(
    any_broker: RunningBroker, make_transport: MakeTransport
) -> None:
    publisher = make_transport(any_broker.url, "coordinator")
    publisher.publish(topics.global_model(FLEET), b"model-v12", retain=True, wait=True)
    inbox = Inbox()
    late = make_transport(any_broker.url, "dev-9")

    late.subscribe(topics.global_model(FLEET), inbox)

    message = inbox.wait_for()
    assert (message.payload, message.retain) == (b"model-v12", True)


def test_subscription_made_before_connect_is_active_once_connect_returns(
    any_broker: RunningBroker, make_transport: MakeTransport
) -> None:
    inbox = Inbox()
    subscriber = MqttTransport(any_broker.url, "gw-2", backoff_min=0.05, backoff_max=0.5)
    subscriber.subscribe(topics.telemetry_all(FLEET), inbox)
    publisher = make_transport(any_broker.url, "esp-4")

    with subscriber.connect(timeout=5):
        publisher.publish(topics.telemetry(FLEET, "esp-4"), b"{}", qos=0)

        assert inbox.wait_for().topic == topics.telemetry(FLEET, "esp-4").path


def test_handler_that_raises_does_not_stop_later_deliveries(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport
) -> None:
    inbox = Inbox()

    def fragile(message: Message) -> None:
        if message.payload == b"bad":
            raise ValueError("cannot handle this one")
        inbox(message)

    subscriber = make_transport(amqtt_broker.url, "gw-1")
    subscriber.subscribe(topics.partials_to(FLEET, "coordinator"), fragile)
    publisher = make_transport(amqtt_broker.url, "gw-2")

    publisher.publish(topics.partial(FLEET, "coordinator", "gw-2"), b"bad", wait=True)
    publisher.publish(topics.partial(FLEET, "coordinator", "gw-2"), b"good", wait=True)

    assert inbox.wait_for().payload == b"good"
    assert subscriber.handler_errors == 1


def test_publishing_to_a_filter_is_refused(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport
) -> None:
    transport = make_transport(amqtt_broker.url, "gw-1")

    with pytest.raises(PublishError, match=r"\+"):
        transport.publish(topics.status_all(FLEET), b"{}")


def test_handler_cannot_wait_for_its_own_acknowledgement(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport
) -> None:
    errors = Inbox()
    transport = make_transport(amqtt_broker.url, "gw-1")

    def reply(message: Message) -> None:
        try:
            transport.publish(topics.status(FLEET, "gw-1"), b"{}", wait=True)
        except PublishError as exc:
            errors(Message(message.topic, str(exc).encode(), False))

    transport.subscribe(topics.round_schedule(FLEET), reply)
    transport.publish(topics.round_schedule(FLEET), b"schedule", wait=True)

    assert b"handler cannot wait" in errors.wait_for().payload


# -- last will --------------------------------------------------------------------------

CHILD = """
import sys, time
from broker.transport import MqttTransport
from tern import topics
from tern.reports import State, Status

url, fleet, me = sys.argv[1:4]
gone = Status(me, "device", State.OFFLINE, "0.1.0", "connection lost").to_json()
here = Status(me, "device", State.ONLINE, "0.1.0").to_json()
t = MqttTransport(url, me, will=(topics.status(fleet, me), gone)).connect(timeout=10)
t.publish(topics.status(fleet, me), here, retain=True, wait=True)
time.sleep(60)  # until the test kills us
"""


@pytest.fixture
def child_device(any_broker: RunningBroker) -> Iterator[subprocess.Popen[bytes]]:
    """A device in its own process: it connects with a will and says it is online."""
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, any_broker.url, FLEET, "dev-7"], cwd=REPO
    )
    try:
        yield process
    finally:
        process.kill()
        process.wait(timeout=5)


def test_will_is_published_when_a_client_dies_uncleanly(
    any_broker: RunningBroker,
    make_transport: MakeTransport,
    child_device: subprocess.Popen[bytes],
) -> None:
    inbox = Inbox()
    watcher = make_transport(any_broker.url, "dashboard")
    watcher.subscribe(topics.status_all(FLEET), inbox)
    inbox.wait_for(status_of("dev-7", State.ONLINE), timeout=15)

    child_device.send_signal(signal.SIGKILL)

    will = inbox.wait_for(status_of("dev-7", State.OFFLINE))
    assert Status.from_json(will.payload) == offline("dev-7")


def test_will_is_not_published_on_a_clean_close(
    any_broker: RunningBroker, make_transport: MakeTransport
) -> None:
    inbox = Inbox()
    watcher = make_transport(any_broker.url, "dashboard")
    watcher.subscribe(topics.status_all(FLEET), inbox)
    device = make_transport(
        any_broker.url, "dev-8", will=(topics.status(FLEET, "dev-8"), offline("dev-8").to_json())
    )

    device.close()
    # A marker published after the close: the broker has long handled the disconnect.
    marker = Status("marker", "device", State.ONLINE, "0.1.0").to_json()
    watcher.publish(topics.status(FLEET, "marker"), marker, wait=True)

    inbox.wait_for(status_of("marker", State.ONLINE))
    assert not any(topics.status(FLEET, "dev-8").matches(m.topic) for m in inbox.messages)
    assert not device.connected


# -- reconnects -------------------------------------------------------------------------


def test_subscription_survives_a_broker_restart(
    any_broker: RunningBroker, make_transport: MakeTransport
) -> None:
    inbox = Inbox()
    subscriber = make_transport(any_broker.url, "gw-1")
    subscriber.subscribe(topics.round_schedule(FLEET), inbox)
    publisher = make_transport(any_broker.url, "coordinator")

    any_broker.restart()
    # Retained, so it is delivered whenever the subscriber's re-subscription lands.
    publisher.publish(topics.round_schedule(FLEET), b"round-13", retain=True, wait=True)

    assert inbox.wait_for(timeout=10).payload == b"round-13"
    assert subscriber.stats.reconnects == 1 and publisher.stats.reconnects == 1


def test_reconnects_back_off_while_the_broker_turns_clients_away() -> None:
    # A listener that accepts and hangs up at once: every attempt fails right away,
    # so only the backoff spaces them out.
    attempts: list[float] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def turn_away() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            attempts.append(time.monotonic())
            conn.close()

    thread = threading.Thread(target=turn_away, daemon=True)
    thread.start()
    url = format_url("127.0.0.1", server.getsockname()[1])
    transport = MqttTransport(url, "dev-1", backoff_min=0.05, backoff_max=0.4)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectTimeout):
            transport.connect(timeout=1.5)
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()

    # Accept times lag the attempts a little when the machine is busy; the attempts
    # that count are those inside connect()'s deadline.
    gaps = np.diff([t for t in attempts if t < started + 1.5])
    assert 2 <= len(gaps) <= 15  # it retries, and not in a tight loop
    assert gaps.min() >= 0.02  # half of backoff_min, minus scheduling slack
    assert gaps.max() <= 0.4 + 0.3


def test_connect_to_a_port_with_no_broker_times_out_within_the_deadline() -> None:
    with socket.socket() as reserved:  # bound, never listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        url = format_url("127.0.0.1", reserved.getsockname()[1])
        transport = MqttTransport(url, "dev-1", backoff_min=0.05, backoff_max=0.2)
        started = time.monotonic()

        with pytest.raises(ConnectTimeout) as caught:
            transport.connect(timeout=0.5)

    assert isinstance(caught.value, TransportError)
    assert 0.5 <= time.monotonic() - started < 2.0
    assert not transport.connected


@pytest.mark.filterwarnings("ignore:The 'acl' option is deprecated:DeprecationWarning")
def test_subscription_refused_by_the_broker_raises(tmp_path: Path) -> None:
    config = tmp_path / "acl.yaml"
    config.write_text(
        "plugins:\n"
        "  - amqtt.plugins.topic_checking.TopicAccessControlListPlugin:\n"
        "      acl:\n"  # amqtt 0.12 rejects its own documented 'subscribe-acl' key
        f"        anonymous: ['{topics.status_all(FLEET).path}']\n"
    )
    with (
        EmbeddedBroker("127.0.0.1", 0, config=config) as embedded,
        MqttTransport(embedded.url, "dev-1").connect(timeout=5) as transport,
    ):
        transport.subscribe(topics.status_all(FLEET), Inbox())  # allowed

        with pytest.raises(SubscribeError, match="refused"):
            transport.subscribe(topics.global_model(FLEET), Inbox())


# -- pure helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1884", ("127.0.0.1", 1884, False)),
        ("mqtt://broker.local", ("broker.local", 1883, False)),
        ("mqtt://[::1]:2000", ("::1", 2000, False)),
        ("mqtts://broker.local", ("broker.local", 8883, True)),
        ("mqtts://[::1]:8884", ("::1", 8884, True)),
    ],
)
def test_parse_url_reads_host_port_and_tls(url: str, expected: tuple[str, int, bool]) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1",
        "mqtt://",
        "mqtt://h:99999",
        "h:1883",
        "mqtt://h:1/x",
        "ws://h:1",
        "mqtts://h:1?x",
    ],
)
def test_parse_url_rejects_what_is_not_a_broker_url(url: str) -> None:
    with pytest.raises(TransportError):
        parse_url(url)


def test_format_url_points_wildcard_listeners_at_loopback() -> None:
    assert format_url("0.0.0.0", 1883) == "mqtt://127.0.0.1:1883"
    assert format_url("::", 1) == "mqtt://[::1]:1"
    assert parse_url(format_url("::1", 8883)) == ("::1", 8883, False)
    assert format_url("0.0.0.0", 8883, tls=True) == "mqtts://127.0.0.1:8883"


@given(
    attempt=st.integers(0, 200),
    minimum=st.floats(0.01, 5.0),
    spread=st.floats(1.0, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_backoff_delay_is_capped_exponential_with_jitter(
    attempt: int, minimum: float, spread: float, seed: int
) -> None:
    maximum = minimum * spread
    ceiling = min(maximum, minimum * 2.0**attempt)

    delay = backoff_delay(attempt, minimum, maximum, np.random.default_rng(seed))

    assert ceiling / 2 <= delay <= ceiling


def test_backoff_delays_of_a_fleet_spread_out() -> None:
    delays = [backoff_delay(3, 0.5, 30.0, np.random.default_rng(seed)) for seed in range(50)]

    assert len(set(delays)) == 50
    assert max(delays) - min(delays) > 1.0  # the window is [2, 4] s
