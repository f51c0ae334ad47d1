"""amqtt's protocol handler of one client connection, with bounded deliveries and receipts.

`broker.amqtt_broker` gives every client it accepts one of these in place of amqtt's
`BrokerProtocolHandler`: at most `BrokerLimits.max_inflight` deliveries to the client
are under way (the rest wait in a `broker.limits.Window` or are dropped), and at most as
many incoming QoS 2 messages await their PUBREL. The class is built on first use by
`broker.amqtt_broker.amqtt_broker_class`, after `check_amqtt_internals` (which lists
the handler methods overridden here), so that a process that runs no broker never loads
amqtt.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

from broker.limits import BrokerLimits, Window
from broker.refusals import Reason, Refusals

__all__ = ["Connection", "amqtt_handler_class"]


@dataclass(slots=True)
class Connection:
    """One client connection as refusals name it: its address until its CONNECT is
    accepted, then its client id; its transport, to cut it; and when it was opened (the
    broker loop's clock), from which it has connect_timeout to send its CONNECT."""

    transport: asyncio.WriteTransport
    peer: str
    client_id: str | None = None
    opened: float = 0.0

    @property
    def name(self) -> str:
        return self.client_id if self.client_id is not None else self.peer


@functools.cache
def amqtt_handler_class() -> type[Any]:
    """amqtt's BrokerProtocolHandler with bounded deliveries and QoS 2 receipts (imported
    on first use, so that a process that runs no broker never loads amqtt)."""
    from amqtt.mqtt.constants import QOS_2
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    class _Handler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt ships untyped
        """amqtt's protocol handler of one client, with bounded deliveries and receipts."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.connection: Connection | None = None
            self.refusals: Refusals | None = None
            self.window: Window | None = None
            self.max_receipts = 0
            self.closing = False

        def bind(self, connection: Connection, limits: BrokerLimits, refusals: Refusals) -> None:
            self.connection, self.refusals = connection, refusals
            self.window = Window(limits.max_inflight, limits.max_queued, limits.max_queued_bytes)
            self.max_receipts = limits.max_inflight

        async def mqtt_publish(
            self,
            topic: str,
            data: bytes | bytearray,
            qos: int | None,
            retain: bool,
            ack_timeout: int | None = None,
        ) -> None:
            # Replaces amqtt's unbounded deliveries. amqtt starts a task per message to
            # a subscriber that holds the message until the subscriber acknowledges it
            # (or 5 s pass), however many there are: a subscriber that never
            # acknowledges (or never reads) grew the broker without bound. Here at most
            # max_inflight are under way, max_queued wait in all, and a delivery beyond
            # is dropped and counted. Retained messages sent for a new subscription
            # (`retain`) wait for a slot but are never dropped: the retained limits
            # bound them, and the subscriber asked for every one. Nothing is returned:
            # amqtt's broadcast loop keeps a finished task as long as an older one is
            # not finished, and a result holding the message would keep the message.
            window, connection, refusals = self.window, self.connection, self.refusals
            if window is None or connection is None or refusals is None:
                await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
                return
            if not retain and not window.admit(len(data)):
                refusals.add(Reason.INFLIGHT_FULL, connection.name, "a delivery to it dropped")
                return
            try:
                async with window.slots:
                    if self.session is None or not self.session.transitions.is_connected():
                        return  # it left while the message waited
                    await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
            except TimeoutError:  # no acknowledgement within amqtt's 5 s (amqtt logs it)
                return
            finally:
                if not retain:
                    window.release(len(data))

        async def handle_publish(self, publish_packet: Any) -> None:
            # Replaces amqtt's unbounded QoS 2 receipts: amqtt keeps every incoming QoS 2
            # message until its PUBREL comes, with no deadline and no bound. Beyond
            # max_inflight the client is disconnected (and counted once).
            session, connection = self.session, self.connection
            if publish_packet.qos == QOS_2 and session is not None and connection is not None:
                if self.closing:
                    return
                receipts = session.inflight_in
                packet_id = publish_packet.variable_header.packet_id
                if packet_id not in receipts and len(receipts) >= self.max_receipts:
                    self.closing = True
                    if self.refusals is not None:
                        self.refusals.add(Reason.INFLIGHT_FULL, connection.name, "QoS 2 receipts")
                    connection.transport.abort()
                    return
            await super().handle_publish(publish_packet)

    return _Handler
