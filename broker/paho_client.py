"""Making and stopping the paho-mqtt client behind `broker.transport.MqttTransport`.

Its log lines go to the transport's logger ("broker.transport").
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker.errors import PublishError
from tern.topics import Topic

__all__ = [
    "SocketErrors",
    "capture_errors",
    "new_client",
    "no_delay",
    "require_concrete",
    "stop_loop",
]

# The transport's logger, not this module's: these lines belong to the client.
log = logging.getLogger("broker.transport")


def new_client(
    client_id: str,
    will: tuple[Topic, bytes] | None,
    login: tuple[str, str] | None,
    tls: ssl.SSLContext | None = None,
) -> mqtt.Client:
    """An MQTT 3.1.1 clean-session client with no callbacks but `on_socket_open`; over TLS
    with `tls` (`broker.tls.client_context`: it checks the broker's host name)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=True,
        protocol=mqtt.MQTTv311,
    )
    # paho's own backoff has no jitter: zero it and sleep in the callbacks instead,
    # which run on paho's thread right before it would wait and reconnect.
    client.reconnect_delay_set(0, 0)
    if will is not None:
        topic, payload = will
        require_concrete(topic)
        client.will_set(topic.path, payload, qos=1, retain=True)
    if login is not None:
        client.username_pw_set(*login)
    if tls is not None:
        client.tls_set_context(tls)
    client.on_socket_open = no_delay
    return client


class SocketErrors(logging.Handler):
    """The last of paho's error lines of one client, in a few words: why the broker ended
    a connection before its CONNACK (a TLS alert: no client certificate, an unknown CA)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        text = re.sub(r" \(_ssl\.c:\d+\)", "", record.getMessage())
        ssl_error = re.search(r"\[SSL(?:: \w+)?\] (.*)", text)
        self.last = (f"TLS: {ssl_error.group(1)}" if ssl_error else text)[:200]


def capture_errors(client: mqtt.Client, client_id: str, errors: SocketErrors) -> None:
    """Keep `client`'s error lines in `errors` (paho formats nothing below ERROR for it)."""
    logger = logging.Logger(f"paho.{client_id}", logging.ERROR)  # this client's alone
    logger.addHandler(errors)
    client.enable_logger(logger)


def stop_loop(client: mqtt.Client, client_id: str, timeout: float) -> None:
    """Stop paho's thread within `timeout` (not from that thread), saying goodbye if needed."""
    # loop_stop() joins paho's thread with no deadline; bound it from the outside.
    stopper = threading.Thread(target=client.loop_stop, daemon=True)
    stopper.start()
    stopper.join(timeout)
    if stopper.is_alive():
        log.warning("%s: paho's thread did not stop within %g s", client_id, timeout)
    elif client.socket() is not None:
        # The loop stopped in the middle of a reconnect: say goodbye on the open
        # socket ourselves, or the broker would publish the will when it drops.
        client.disconnect()
        client.loop_write()


def no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Send small MQTT packets at once: with Nagle's algorithm each waited ~40 ms per hop
    (bench/round.py: a 10-device round went from ~0.10 s to ~0.02 s on amqtt)."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def require_concrete(topic: Topic) -> None:
    if topic.is_filter:
        raise PublishError(topic.path, "a subscription filter is not a topic to publish to")
