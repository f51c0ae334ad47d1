"""amqtt's Broker, fixed to face a hostile network: `amqtt_broker_class()`.

amqtt 0.12 as it comes lets a refused CONNECT strip a connected client of its session,
hands every new client the retained messages matching every other client's
subscriptions, and bounds nothing a client sends or holds. The subclass built here
overrides a few of amqtt's methods, each saying which amqtt behaviour it replaces and
why: it authenticates a CONNECT before it touches any session, hands a retained message
only to the subscription that matches it, and enforces `broker.limits.BrokerLimits`
(with `broker.framing.PacketReader` between amqtt and each client's bytes, and
`broker.amqtt_handler` for each client's deliveries). `AMQTT_INTERNALS` lists every
amqtt method it overrides or calls; the broker refuses to start if an amqtt upgrade
moved one. amqtt is imported on first use only: `broker.embedded` runs this class.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import ssl
from collections.abc import Mapping
from typing import Any

from broker.access import AccessControl
from broker.amqtt_handler import Connection, amqtt_handler_class
from broker.errors import BrokerError
from broker.framing import PacketReader
from broker.limits import BrokerLimits, TokenBuckets
from broker.listeners import listeners_class
from broker.refusals import Reason, Refusals

__all__ = ["AMQTT_INTERNALS", "TAKEOVER_TIMEOUT", "amqtt_broker_class", "check_amqtt_internals"]

# The broker's log lines keep the name they had when this lived in broker.embedded.
log = logging.getLogger("broker.embedded")

# Every amqtt method the broker below and its protocol handler (broker.amqtt_handler)
# override or call, with its parameters. An amqtt upgrade that renames or reshapes one
# would silently drop a fix (an override nobody calls any more), so the broker refuses
# to start instead (check_amqtt_internals).
AMQTT_INTERNALS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "amqtt.broker.Broker": {
        # overridden (broker.listeners)
        "_create_server_instance": (
            "listener_name",
            "listener_type",
            "address",
            "port",
            "ssl_context",
        ),
        "stream_connected": ("reader", "writer", "listener_name"),
        "ws_connected": ("websocket", "listener_name"),
        # overridden (here)
        "_client_connected": ("listener_name", "reader", "writer"),
        "_handle_message_delivery": ("client_session", "handler", "wait_deliver"),
        "_topic_filtering": ("session", "topic", "action"),
        "retain_message": ("source_session", "topic_name", "data", "qos"),
        # called
        "_authenticate": ("session", "_"),
        "_delete_session": ("client_id",),
        "_publish_session_retained_messages": ("session",),
        "_client_message_loop": ("client_session", "handler"),
        "_broadcast_message": ("session", "topic", "data", "force_qos"),
    },
    "amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler": {
        # overridden
        "mqtt_publish": ("topic", "data", "qos", "retain", "ack_timeout"),
        "handle_publish": ("publish_packet",),
        # called
        "init_from_connect": ("reader", "writer", "plugins_manager", "loop"),
        "handle_connection_closed": (),
        "mqtt_connack_authorize": ("authorize",),
        "attach": ("session", "reader", "writer"),
        "start": (),
    },
}


def check_amqtt_internals() -> None:
    """BrokerError unless amqtt still has every method of AMQTT_INTERNALS, as listed."""
    for qualified, methods in AMQTT_INTERNALS.items():
        module_name, _, class_name = qualified.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        for name, parameters in methods.items():
            method = getattr(cls, name, None)
            found = None if method is None else tuple(inspect.signature(method).parameters)
            if found is not None and found[:1] in (("self",), ("cls",)):
                found = found[1:]
            if found != parameters:
                raise BrokerError(
                    f"amqtt's {class_name}.{name} is not what tern's broker overrides or calls"
                    f" (parameters {found}, expected {parameters}): this amqtt is not supported"
                    " (tern pins amqtt>=0.12,<0.13)"
                )


TAKEOVER_TIMEOUT = 5.0  # seconds an old connection has to let go of its client id


def _retained_size(topic: str, data: bytes | bytearray) -> int:
    return len(data) + len(topic.encode("utf-8", "surrogatepass"))


@functools.cache
def amqtt_broker_class() -> type[Any]:
    """amqtt's Broker with tern's fixes (imported on first use, so that a process that
    runs no broker never loads amqtt)."""
    from amqtt.broker import Broker, RetainedApplicationMessage
    from amqtt.contexts import Action
    from amqtt.errors import AMQTTError, MQTTError, NoDataError
    from amqtt.events import BrokerEvents
    from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
    from amqtt.utils import gen_client_id

    check_amqtt_internals()
    _Handler = amqtt_handler_class()

    async def refuse_connect(writer: Any, connection: Connection) -> None:
        """CONNACK 'not authorized', then close (cut after a second if it will not)."""
        try:
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await asyncio.wait_for(writer.close(), 1.0)
        except (OSError, TimeoutError):
            connection.transport.abort()

    class _Broker(listeners_class(), Broker):  # type: ignore[misc]  # amqtt ships untyped
        """amqtt's broker: authenticated sessions, matching retained messages, limits
        (on every listener: broker.listeners)."""

        def __init__(
            self,
            config: dict[str, Any],
            *,
            limits: BrokerLimits,
            refusals: Refusals,
            access: AccessControl | None,
            tls_contexts: Mapping[str, ssl.SSLContext] | None = None,
        ) -> None:
            super().__init__(config)
            self.limits, self.refusals, self.access = limits, refusals, access
            # the TLS of each listener that has one (amqtt's `ssl: true` ones are added)
            self.tls_contexts = dict(tls_contexts or {})
            self.buckets = TokenBuckets(limits.publish_rate, limits.publish_burst)
            self.retained_bytes = 0
            # every client: counted against max_connections, and each one's
            # transport cut by EmbeddedBroker._shutdown when amqtt cannot close it
            self.clients: set[asyncio.WriteTransport] = set()
            self.connections: dict[PacketReader, Connection] = {}

        async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
            # Replaces amqtt's _client_connected, _initialize_client_session and
            # _handle_client_session. amqtt dropped (clean session) or took over the
            # existing session of a CONNECT's client id *before* it authenticated the
            # CONNECT, so a refused CONNECT with a connected client's id silently
            # stripped that client of its subscriptions; it waited for a CONNECT without
            # a deadline; and it sent every new client the retained messages matching
            # every other client's subscriptions.
            server = self._servers[listener_name]
            await server.acquire_connection()
            try:
                accepted = await self._accept(listener_name, reader, writer)
                if accepted is not None:
                    await self._run_session(*accepted, reader, writer)
            except (AMQTTError, MQTTError, NoDataError) as exc:
                log.debug("a client's session ended: %s", type(exc).__name__)
            finally:
                server.release_connection()

        async def _accept(
            self, listener_name: str, reader: PacketReader, writer: Any
        ) -> tuple[Any, Any] | None:
            """The CONNECT read within connect_timeout and authenticated, and its session
            chosen: (handler, session); None when refused (answered and closed)."""
            connection = self.connections[reader]
            loop = asyncio.get_running_loop()
            try:
                # connect_timeout from the moment it connected (a TLS handshake included)
                left = connection.opened + self.limits.connect_timeout - loop.time()
                handler, session = await asyncio.wait_for(
                    _Handler.init_from_connect(reader, writer, self.plugins_manager),
                    max(0.0, left),
                )
            except TimeoutError:
                if not reader.closed:
                    self.refusals.add(Reason.CONNECT_TIMEOUT, connection.name, "disconnected")
                connection.transport.abort()
                return None
            except MQTTError:  # refused by amqtt itself (protocol level, flags) and answered
                self.refusals.add(Reason.PROTOCOL_ERROR, connection.name, "CONNECT refused")
                connection.transport.abort()
                return None
            except (AMQTTError, NoDataError):  # the stream ended, or the reader refused it
                connection.transport.abort()
                return None
            if not session.client_id:
                session.client_id = gen_client_id()
            # Authenticated once, and first: nothing below runs for a refused CONNECT.
            if not await self._authenticate(session, self.listeners_config[listener_name]):
                await refuse_connect(writer, connection)
                return None
            connection.client_id = session.client_id
            handler.bind(connection, self.limits, self.refusals)
            return handler, await self._choose_session(session)

        async def _choose_session(self, incoming: Any) -> Any:
            """amqtt's choice, made only once authenticated: a clean session replaces the
            old one, a persistent one resumes it with the new credentials and will."""
            client_id = incoming.client_id
            existing = self._sessions.get(client_id)
            if existing is not None and existing[0].transitions.is_connected():
                await self._take_over(*existing)
            if incoming.clean_session:
                await self._delete_session(client_id)
                incoming.parent = 0
                session = incoming
            elif existing is not None:
                session = existing[0]
                for name in ("will_flag", "will_message", "will_topic", "will_qos",
                             "will_retain", "keep_alive", "username", "password",
                             "is_anonymous"):  # fmt: skip
                    setattr(session, name, getattr(incoming, name))
                session.parent = 1
            else:
                incoming.parent = 0
                session = incoming
            delay = self.config.get("timeout-disconnect-delay", 0)
            if session.keep_alive > 0 and isinstance(delay, int):
                session.keep_alive += delay
            return session

        async def _take_over(self, session: Any, handler: Any) -> None:
            """Cut the connection still holding a client id that has just connected again
            (MQTT-3.1.4-2), without its will (the client is back), and wait until its
            loop has let go of the session. amqtt left a clean session's old connection
            running, session-less, to publish its will whenever it died; and the old
            loop of a persistent session, finishing late, marked the shared session
            disconnected under the new connection, which amqtt then closed."""
            session.will_flag = False
            if isinstance(handler, _Handler) and handler.connection is not None:
                handler.connection.transport.abort()
            else:
                await handler.handle_connection_closed()
            deadline = asyncio.get_running_loop().time() + TAKEOVER_TIMEOUT
            while session.transitions.is_connected():
                if asyncio.get_running_loop().time() > deadline:
                    log.warning("client %s: its old connection did not end", session.client_id)
                    session.transitions.disconnect()
                    return
                await asyncio.sleep(0.005)

        async def _run_session(self, handler: Any, session: Any, reader: Any, writer: Any) -> None:
            """amqtt's _handle_client_session once authenticated, without its replay of
            retained messages: MQTT sends those when a subscription is made, and amqtt
            sent each new client those of every client's filters (and duplicates)."""
            session.transitions.connect()
            handler.attach(session, reader, writer)
            self._sessions[session.client_id] = (session, handler)
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id, client_session=session
            )
            await handler.start()
            await self._publish_session_retained_messages(session)  # queued while it was away
            await self._client_message_loop(session, handler)

        async def _handle_message_delivery(
            self, client_session: Any, handler: Any, wait_deliver: asyncio.Future[Any]
        ) -> bool:
            # Replaces amqtt's: adds the publish rate limit and the retain right, and
            # never ends the client's loop (amqtt stopped serving a client whose topic it
            # disliked but left its connection open; the PacketReader drops those).
            message = wait_deliver.result()
            client = client_session.client_id or ""
            await self.plugins_manager.fire_event(
                BrokerEvents.MESSAGE_RECEIVED, client_id=client, message=message
            )
            if message is None:
                return True
            topic, user = message.topic, client_session.username
            if not topic or topic[0] == "$" or "+" in topic or "#" in topic:
                self.refusals.add(Reason.BAD_TOPIC, client, "a message dropped")
                return True
            if user not in self.limits.unlimited_users and not self.buckets.take(client):
                self.refusals.add(Reason.RATE_LIMITED, client, "a message dropped")
                return True
            if not await self._topic_filtering(client_session, topic, Action.PUBLISH):
                return True
            retain = message.publish_packet is not None and message.publish_packet.retain_flag
            if retain and self.access is not None and not self.access.retain(client, user, topic):
                return True  # dropped entirely: a retained message is for later subscribers too
            await self.plugins_manager.fire_event(
                BrokerEvents.MESSAGE_BROADCAST, client_id=client, message=message
            )
            await self._broadcast_message(client_session, topic, message.data)
            if retain:
                await self.retain_message(client_session, topic, message.data, message.qos)
            return True

        async def retain_message(
            self,
            source_session: Any,
            topic_name: str | None,
            data: bytes | bytearray | None,
            qos: int | None = None,
        ) -> None:
            # Replaces amqtt's: it kept any number of retained messages of any size.
            # Beyond max_retained or max_retained_bytes a new retained message is not
            # kept (it was still delivered); replacing and clearing always work.
            if topic_name is None:
                return
            store = self._retained_messages
            old = store.get(topic_name)
            old_size = 0 if old is None else _retained_size(topic_name, old.data)
            if data:
                total = self.retained_bytes - old_size + _retained_size(topic_name, data)
                count = len(store) + (old is None)
                if count > self.limits.max_retained or total > self.limits.max_retained_bytes:
                    client = getattr(source_session, "client_id", None) or "-"
                    self.refusals.add(Reason.RETAINED_FULL, client, "not retained")
                    return
                message = store[topic_name] = RetainedApplicationMessage(
                    source_session, topic_name, data, qos
                )
                self.retained_bytes = total
            elif old is not None:  # [MQTT-3.3.1-10] an empty retained message clears it
                del store[topic_name]
                self.retained_bytes -= old_size
                old.data = b""
                message = old
            else:
                return
            await self.plugins_manager.fire_event(
                BrokerEvents.RETAINED_MESSAGE, client_id=None, retained_message=message
            )

        async def _topic_filtering(self, session: Any, topic: str, action: Any) -> bool:
            # amqtt awaits this for each delivery inside its loop over the live
            # subscription map (_run_broadcast). Calling a topic plugin there yields
            # to the event loop, a SUBSCRIBE can then change the map, and the message
            # is lost to a RuntimeError. A delivery was allowed when its subscription
            # was, so it is answered here, without yielding.
            if action == Action.RECEIVE:
                return True
            return bool(await super()._topic_filtering(session, topic, action))

    return _Broker
