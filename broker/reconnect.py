"""Waiting for a broker: jittered reconnect backoff, and the CONNACK wait that close() ends.

Used by `broker.transport.MqttTransport`. Its log lines go to the transport's logger
("broker.transport"), which is the one operators and tests listen to.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt

from broker.errors import ConnectTimeout, TransportError
from broker.paho_client import SocketErrors
from broker.transport_types import TlsClient

__all__ = ["Backoff", "await_connack", "backoff_delay", "hung_up"]

# The transport's logger, not this module's: a "waiting for" line belongs to the client.
log = logging.getLogger("broker.transport")

_SLICE = 0.25  # seconds between looks at close() while connect() waits
_WAIT_LOG_PERIOD = 30.0  # at most one "waiting for" line this often, after the first


def backoff_delay(attempt: int, minimum: float, maximum: float, rng: np.random.Generator) -> float:
    """Seconds before reconnect `attempt` (0 first): the capped exponential, jittered.

    Half the delay is kept and half drawn uniformly, so every client still backs off
    while a fleet that lost its broker together spreads out over the window.
    """
    ceiling = min(maximum, minimum * 2.0 ** min(attempt, 64))
    return float(ceiling * rng.uniform(0.5, 1.0))


class Backoff:
    """One client's reconnect attempts since its last CONNACK (paho's thread only)."""

    def __init__(
        self,
        client_id: str,
        url: str,
        minimum: float,
        maximum: float,
        rng: np.random.Generator,
    ) -> None:
        self.client_id, self.url = client_id, url
        self.minimum, self.maximum = minimum, maximum
        self._rng = rng
        self._attempt = 0
        self._waiting_logged = -math.inf  # when the last "waiting for" line was
        self.last_failure: str | None = None  # why the last attempt failed, in a few words
        self.socket_errors = SocketErrors()  # paho's error lines (broker.paho_client)

    def reset(self) -> None:
        """The broker answered: the next wait starts from the shortest delay."""
        self._attempt = 0
        self.last_failure = None
        self.socket_errors.last = None

    def failed(self, reason: str) -> None:
        """An attempt failed for `reason` (a TLS failure, a refused socket...): logged once
        per reason until the broker answers, and kept for ConnectTimeout to quote. A TLS
        failure (a wrong CA, host name or clock) does not pass by itself: the operator
        must see it, not a silent retry."""
        if reason != self.last_failure:
            log.warning("%s: cannot connect to %s: %s", self.client_id, self.url, reason)
        self.last_failure = reason

    def sleep(self, closing: threading.Event) -> None:
        """Sleep before the next attempt, or until `closing` is set."""
        delay = backoff_delay(self._attempt, self.minimum, self.maximum, self._rng)
        self._attempt += 1
        # The first line of a wait, then one now and then: the operator sees what it
        # waits for, and a broker down for a day costs a few lines an hour.
        now = time.monotonic()
        quiet = self._attempt > 1 and now - self._waiting_logged < _WAIT_LOG_PERIOD
        if not quiet:
            self._waiting_logged = now
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s: waiting for %s (attempt %d, next try in %.1f s)",
            self.client_id,
            self.url,
            self._attempt,
            delay,
        )
        closing.wait(delay)

    def before_retry(self, client: mqtt.Client, closing: threading.Event) -> None:
        """Sleep before paho's next reconnect (paho's thread), or end its loop if closing."""
        if not closing.is_set():
            self.sleep(closing)
        if closing.is_set():
            # From paho's own thread loop_stop() only flags the loop to end: without it
            # paho would reconnect at once, before close() gets to stop it.
            client.loop_stop()


def hung_up(tls: TlsClient | None) -> str:
    """Why a broker may have closed a connection before its CONNACK, with a hint."""
    if tls is None:
        hint = " (a TLS listener? its URL is mqtts://)"
    elif tls.cert_file is None:  # a TLS 1.3 broker refuses it after the handshake
        hint = " (does it require a client certificate? --cert-file)"
    else:
        hint = ""
    return f"the broker closed the connection before answering CONNECT{hint}"


def await_connack(
    connack: threading.Event,
    closing: threading.Event,
    started: float,
    timeout: float | None,
    backoff: Backoff,
) -> None:
    """Wait for the CONNACK in short slices, so that close() ends the wait; a
    ConnectTimeout quotes why the last attempt failed (`backoff.last_failure`)."""
    while True:
        left = math.inf if timeout is None else started + timeout - time.monotonic()
        if connack.wait(max(0.0, min(_SLICE, left))):
            return
        if closing.is_set():
            raise TransportError(f"{backoff.client_id}: closed while waiting for {backoff.url}")
        if timeout is not None and left <= 0:
            raise ConnectTimeout(backoff.url, timeout, backoff.last_failure)
