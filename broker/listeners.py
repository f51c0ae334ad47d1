"""How a client's connection reaches the embedded broker: TCP, TLS and WebSockets listeners,
each through the same limits and the same access policy.

`listeners_class()` is a mixin of `broker.amqtt_broker`'s broker. It replaces amqtt's
listener servers (`_create_server_instance`) and the two entries of a connection
(`stream_connected` for TCP, `ws_connected` for WebSockets), so that every connection,
whatever its listener, is counted against `max_connections`, has `connect_timeout` to
finish its TLS handshake and send its CONNECT, and reaches amqtt only through a
`broker.framing.PacketReader` (packet size, framing, the first packet a CONNECT), before
the access policy sees its CONNECT. amqtt's own TLS listeners did the handshake before
any of this (an unbounded wait, uncounted), and its WebSockets listener had no limit at
all. Built on first use, like the broker, so that a process running no broker never
loads amqtt or websockets.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from broker.amqtt_handler import Connection
from broker.errors import BrokerError
from broker.framing import PacketReader
from broker.limits import BrokerLimits
from broker.refusals import Reason, Refusals, shown
from broker.tls import connect_failure
from broker.urls import WS_PATH

__all__ = ["WS_MAX_QUEUE", "WsStream", "listeners_class"]

# WebSocket messages websockets reads ahead of amqtt per connection, each at most
# max_packet_bytes: with its default (16) a client could make the broker hold 16 packets.
WS_MAX_QUEUE = 2


class WsStream:
    """A WebSocket connection read as a byte stream, which is what `PacketReader` reads
    (`readexactly`, `feed_eof`): MQTT over WebSockets is a byte stream cut into binary
    messages anywhere. A text message breaks MQTT's rule (binary messages only): it ends
    the stream and is counted through `refuse`, and so is a message larger than a packet
    may be (websockets' `max_size` closes the connection before the PacketReader can see
    the packet's header). Holds at most one message beyond what was asked for; safe to
    cancel (nothing is lost from what was received)."""

    def __init__(self, websocket: Any, refuse: Callable[[Reason], None]) -> None:
        self._websocket = websocket
        self._refuse = refuse
        self._buffer = bytearray()
        self._eof = False

    def feed_eof(self) -> None:
        self._eof = True

    async def readexactly(self, n: int) -> bytes:
        from websockets.exceptions import ConnectionClosed
        from websockets.frames import CloseCode

        while len(self._buffer) < n:
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(self._buffer), n)
            try:
                message = await self._websocket.recv()
            except ConnectionClosed as exc:
                self._eof = True
                if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                    self._refuse(Reason.PACKET_TOO_LARGE)  # closed by websockets' max_size
                continue
            if isinstance(message, str):
                self._eof = True
                self._refuse(Reason.PROTOCOL_ERROR)
                continue
            self._buffer += message
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data


class _PausedProtocol(asyncio.StreamReaderProtocol):
    """A TCP connection that reads nothing until its TLS handshake begins: a client's
    ClientHello read before `StreamWriter.start_tls` would land in the plain stream's
    buffer, lost to TLS, and the handshake would stall (start_tls resumes reading)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.ReadTransport):
            transport.pause_reading()
            # Python before 3.11.4 (Debian bookworm's 3.11.2) starts reading after
            # connection_made even so: pause again once it has, before the handshake's
            # task runs (scheduled by super().connection_made, so after this).
            asyncio.get_running_loop().call_soon(_pause_again, transport)
        super().connection_made(transport)


def _pause_again(transport: asyncio.ReadTransport) -> None:
    if not transport.is_closing():
        transport.resume_reading()  # a no-op where the first pause held
        transport.pause_reading()  # removes the reader, and cancels a read already queued


@functools.cache
def listeners_class() -> type[Any]:
    """The mixin of the embedded broker's listeners (imports amqtt and websockets)."""
    import websockets
    from amqtt.adapters import StreamWriterAdapter, WebSocketsWriter
    from amqtt.contexts import ListenerType
    from websockets.asyncio.server import ServerConnection

    class Listeners:
        """The listeners of `broker.amqtt_broker`'s broker, and their connections' entry.

        Needs from the broker: `limits`, `refusals`, `clients` (every connection's
        transport), `connections` (by PacketReader), `tls_contexts` (by listener name)
        and amqtt's `_client_connected`.
        """

        limits: BrokerLimits
        refusals: Refusals
        clients: set[asyncio.WriteTransport]
        connections: dict[PacketReader, Connection]
        tls_contexts: dict[str, ssl.SSLContext]
        _client_connected: Callable[..., Any]

        async def _create_server_instance(
            self,
            listener_name: str,
            listener_type: str,
            address: str | None,
            port: int,
            ssl_context: ssl.SSLContext | None,
        ) -> Any:
            # Replaces amqtt's. TCP: a TLS handshake is done in stream_connected, under
            # the limits (amqtt had asyncio do it first, with no bound on how many or
            # how long). WebSockets: on path /mqtt only, subprotocol "mqtt", messages no
            # larger than a packet may be, and few of them read ahead.
            context = self.tls_contexts.get(listener_name, ssl_context)
            if context is not None:
                self.tls_contexts[listener_name] = context
            if listener_type == ListenerType.TCP:
                entry = partial(self.stream_connected, listener_name=listener_name)
                if context is None:
                    return await asyncio.start_server(entry, address, port, reuse_address=True)
                loop = asyncio.get_running_loop()
                return await loop.create_server(
                    lambda: _PausedProtocol(asyncio.StreamReader(), entry),
                    address,
                    port,
                    reuse_address=True,
                )
            if listener_type == ListenerType.WS:
                # (passed to create_server, which refuses a handshake timeout without TLS)
                timeout: dict[str, Any] = (
                    {} if context is None else {"ssl_handshake_timeout": self._timeout}
                )
                return await websockets.serve(
                    partial(self.ws_connected, listener_name=listener_name),
                    address,
                    port,
                    create_connection=self._ws_connection_class(),
                    ssl=context,
                    subprotocols=[websockets.Subprotocol("mqtt")],
                    process_request=self._ws_request,
                    max_size=self.limits.max_packet_bytes,
                    max_queue=WS_MAX_QUEUE,
                    open_timeout=self._timeout,
                    **timeout,
                )
            raise BrokerError(f"listener {shown(listener_name)}: {listener_type} is not served")

        @property
        def _timeout(self) -> float:
            return self.limits.connect_timeout

        def _ws_connection_class(self) -> type[ServerConnection]:
            """websockets' connection, its failed opening handshakes counted: websockets
            logged each one as an error with a traceback, and counted none."""
            refusals = self.refusals

            class Counted(ServerConnection):
                async def handshake(self, *args: Any, **kwargs: Any) -> None:
                    peer = self.remote_address
                    name = str(peer[0]) if peer else "-"
                    try:
                        await super().handshake(*args, **kwargs)
                    except asyncio.CancelledError:  # open_timeout (= connect_timeout)
                        refusals.add(Reason.CONNECT_TIMEOUT, name, "WebSocket handshake")
                        raise
                    except Exception:  # websockets then cuts the connection: not OPEN
                        refusals.add(Reason.PROTOCOL_ERROR, name, "WebSocket handshake")

            return Counted

        def _ws_request(self, websocket: Any, request: Any) -> Any:
            """Only MQTT's path: anything else is answered 404 and counted."""
            if urlsplit(request.path).path == WS_PATH:
                return None
            peer = websocket.remote_address
            self.refusals.add(Reason.PROTOCOL_ERROR, str(peer[0]) if peer else "-", "ws path")
            return websocket.respond(HTTPStatus.NOT_FOUND, f"MQTT is served on {WS_PATH}\n")

        def _admit(self, connection: Connection) -> bool:
            """Whether there is room for one more connection (closed at once if not)."""
            if len(self.clients) < self.limits.max_connections:
                return True
            self.refusals.add(Reason.TOO_MANY_CONNECTIONS, connection.name)
            connection.transport.abort()
            return False

        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            # Replaces amqtt's: past max_connections a new connection is closed at once
            # (amqtt's own listener limit queued it, holding its socket); a TLS
            # handshake gets connect_timeout and its failure is counted; and a client's
            # bytes reach amqtt only through a PacketReader (broker.framing).
            peer = writer.get_extra_info("peername")
            loop = asyncio.get_running_loop()
            connection = Connection(
                writer.transport, str(peer[0]) if peer else "-", opened=loop.time()
            )
            if not self._admit(connection):
                return
            context = self.tls_contexts.get(listener_name)
            if context is not None and not await self._handshake(writer, connection, context):
                return
            await self._serve(connection, reader, StreamWriterAdapter(writer), listener_name)

        async def _handshake(
            self, writer: asyncio.StreamWriter, connection: Connection, context: ssl.SSLContext
        ) -> bool:
            """The TLS handshake within connect_timeout; False (counted, cut) if it fails."""
            raw = connection.transport
            self.clients.add(raw)  # it counts while it shakes hands
            try:
                await asyncio.wait_for(writer.start_tls(context), self._timeout)
            except TimeoutError:
                self.refusals.add(Reason.CONNECT_TIMEOUT, connection.name, "TLS handshake")
            except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
                self.refusals.add(Reason.TLS_FAILED, connection.name, connect_failure(exc))
            else:
                connection.transport = writer.transport  # TLS over the same socket
                return True
            finally:
                self.clients.discard(raw)
            raw.close()  # not abort(): the TLS alert saying why goes out first
            return False

        async def ws_connected(self, websocket: Any, listener_name: str) -> None:
            # Replaces amqtt's, which handed the connection to amqtt with no limit.
            peer = websocket.remote_address
            loop = asyncio.get_running_loop()
            connection = Connection(
                websocket.transport, str(peer[0]) if peer else "-", opened=loop.time()
            )
            if not self._admit(connection):
                return

            def refuse(reason: Reason) -> None:
                self.refusals.add(reason, connection.name, "disconnected")
                connection.transport.abort()

            stream = WsStream(websocket, refuse)
            await self._serve(connection, stream, WebSocketsWriter(websocket), listener_name)

        async def _serve(
            self, connection: Connection, stream: Any, writer: Any, listener_name: str
        ) -> None:
            """Serve one connection through a PacketReader, counted in `clients`."""
            transport = connection.transport

            def refuse(reason: Reason) -> None:
                self.refusals.add(reason, connection.name, "disconnected")
                transport.abort()

            def drop(reason: Reason) -> None:
                self.refusals.add(reason, connection.name, "a message dropped")

            packets = PacketReader(stream, self.limits.max_packet_bytes, refuse, drop)
            self.clients.add(transport)
            self.connections[packets] = connection
            try:
                await self._client_connected(listener_name, packets, writer)
            finally:
                self.clients.discard(transport)
                del self.connections[packets]
                if not transport.is_closing():
                    transport.close()

    return Listeners
