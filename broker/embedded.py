"""The embedded MQTT broker: amqtt on its own event loop thread, driven synchronously.

`EmbeddedBroker` is what `tern broker`, the demo and the tests run. Its asyncio loop
lives in a daemon thread so the coordinator, gateways and tests stay plain synchronous
code; `start()` and `stop()` each wait with a deadline. Any MQTT 3.1.1 broker
(Mosquitto, EMQX) can stand in for it: components only ever see a URL.

amqtt 0.12 is not fit to face a hostile network as it comes, so the broker it runs is a
subclass (`broker.amqtt_broker.amqtt_broker_class`, built on first use so that a process
that runs no broker never loads amqtt) that overrides a few of its methods, each saying
which amqtt behaviour it replaces and why: it authenticates a CONNECT before it touches
any session, hands a retained message only to the subscription that matches it, and
enforces `broker.limits.BrokerLimits`. `AMQTT_INTERNALS` (re-exported here) lists every
amqtt method it overrides or calls; the broker refuses to start if an amqtt upgrade
moved one.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships untyped

from broker.access import AccessControl
from broker.amqtt_broker import AMQTT_INTERNALS, amqtt_broker_class, check_amqtt_internals
from broker.errors import BrokerConfigError, BrokerError, BrokerStartError, BrokerStopError
from broker.lifecycle import quiet_third_party_logs
from broker.limits import BrokerLimits
from broker.refusals import Refusals
from broker.tls import TlsServer, server_context
from broker.urls import format_url, format_ws_url

if TYPE_CHECKING:
    from amqtt.broker import Broker

__all__ = [
    "AMQTT_INTERNALS",
    "DEFAULT_CONFIG",
    "EmbeddedBroker",
    "TlsServer",
    "check_amqtt_internals",
    "load_config",
    "merge_config",
    "quiet_third_party_logs",
]

log = logging.getLogger(__name__)

ANONYMOUS = "amqtt.plugins.authentication.AnonymousAuthPlugin"
WS_LISTENER = "ws"  # the WebSockets listener's name (ws_port)
ACCESS_PLUGIN = "broker.plugins.AccessPlugin"  # named, not imported: that would load amqtt

# amqtt's own defaults add the $SYS plugin and two loggers that write one line per
# packet; an explicit plugin map replaces them. Anonymous access by default; an access
# policy (`access=`, broker.plugins.AccessPlugin) or a config file's plugins narrow it.
DEFAULT_CONFIG: Mapping[str, Any] = {
    "listeners": {"default": {"type": "tcp"}},
    "plugins": {ANONYMOUS: {"allow_anonymous": True}},
}


def merge_config(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` merged over `base`: mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key == "plugins":
            value = _plugins_as_mapping(value)
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _plugins_as_mapping(plugins: object) -> object:
    """amqtt also takes `plugins:` as a YAML list; make it a mapping so it merges."""
    if not isinstance(plugins, list):
        return plugins
    mapping: dict[str, Any] = {}
    for item in plugins:
        mapping.update({item: {}} if isinstance(item, str) else item)
    return mapping


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an amqtt config file: JSON for ``.json``, YAML (a superset) for anything else."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
        value = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise BrokerConfigError(str(exc), source) from exc
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BrokerConfigError("the top level must be a mapping", source)
    return value


class EmbeddedBroker:
    """An amqtt broker on `host`:`port` (port 0: a free port, read back from `.port`).

    `config` (a path to a YAML/JSON file, or a mapping) is merged over DEFAULT_CONFIG;
    the default listener's address always comes from `host` and `port`. `tls` makes
    it (and the WebSockets one) speak TLS (`broker.tls.TlsServer`: TLS 1.2+, client
    certificates required with `require_client_cert`), and `url` an ``mqtts://`` one.
    `ws_port` adds MQTT over WebSockets for browsers on `host`:`ws_port` (0: a free one),
    path /mqtt (`ws_url`). Listeners are TCP or WebSockets; every one is guarded by
    `limits` and `access` alike (broker.listeners). `access` enforces an access policy
    (broker.access; anonymous and open without it); `limits` bounds what any client may
    send or hold (`broker.limits.BrokerLimits`, its defaults without it), and `refused`
    counts every refusal. One instance runs once: to restart on the same port, make a
    new one with ``port=old.port``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        access: AccessControl | None = None,
        limits: BrokerLimits | None = None,
        tls: TlsServer | None = None,
        ws_port: int | None = None,
    ) -> None:
        for number in (port, ws_port):
            if number is not None and not 0 <= number <= 65535:
                raise BrokerConfigError(f"port {number} is not in 0..65535")
        override = load_config(config) if isinstance(config, str | os.PathLike) else config or {}
        bind: dict[str, Any] = {"default": {"bind": f"{_bind_host(host)}:{port}"}}
        if ws_port is not None:
            bind[WS_LISTENER] = {"type": "ws", "bind": f"{_bind_host(host)}:{ws_port}"}
        self.config = merge_config(merge_config(DEFAULT_CONFIG, override), {"listeners": bind})
        _check_listeners(self.config)
        self.tls = tls
        context = None if tls is None else server_context(tls)  # BrokerConfigError now
        self._tls_contexts = {} if context is None else dict.fromkeys(bind, context)
        if access is not None:  # added after the merge, which copies: the broker shares it
            self.config["plugins"][ACCESS_PLUGIN] = {"control": access}
        self.access = access
        self.limits = limits if limits is not None else BrokerLimits()
        self._refusals = Refusals()
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._ws_port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._started = threading.Event()
        self._abandoned = threading.Event()
        self._start_error: BaseException | None = None
        self._grace = 2.5  # set by stop(): each step of _shutdown waits this long at most
        self._amqtt: Any = None  # the running amqtt broker (amqtt_broker_class)

    @property
    def port(self) -> int:
        """The port the default listener is bound to (known once started)."""
        if self._port is None:
            raise BrokerError("the broker has not started: its port is not known yet")
        return self._port

    @property
    def url(self) -> str:
        """What clients connect to: ``mqtt://host:port`` (loopback for a wildcard host),
        ``mqtts://`` over TLS."""
        return format_url(self.host, self.port, self._secure("default"))

    @property
    def ws_url(self) -> str:
        """What browsers connect to: ``ws://host:port/mqtt``, ``wss://`` over TLS
        (BrokerError without a WebSockets listener)."""
        if self._ws_port is None:
            raise BrokerError("no WebSockets listener (ws_port), or not started yet")
        return format_ws_url(self.host, self._ws_port, self._secure(WS_LISTENER))

    def _secure(self, listener: str) -> bool:
        settings = self.config["listeners"].get(listener, {})
        return listener in self._tls_contexts or bool(settings.get("ssl", False))

    @property
    def running(self) -> bool:
        return self._port is not None and self._thread is not None and self._thread.is_alive()

    @property
    def connections(self) -> int:
        """Client connections open now (CONNECT sent or not)."""
        broker = self._amqtt
        return 0 if broker is None else len(broker.clients)

    @property
    def refused(self) -> Counter[str]:
        """Every refusal of this broker so far, by reason (a copy): its limits'
        (`broker.limits.Reason`) and its access policy's (`broker.acl.Refusal`)."""
        counts = self._refusals.counts
        if self.access is not None:
            counts.update(self.access.refused)
        return counts

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start serving; return once the listener accepts connections."""
        if self._thread is not None:
            raise BrokerError("an EmbeddedBroker starts once; make a new one to restart")
        self._thread = threading.Thread(
            target=self._thread_main, name=f"amqtt-{self.host}:{self._requested_port}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout):
            self._abandoned.set()
            self._request_stop()
            raise BrokerStartError(
                f"not accepting connections within {timeout:g} s", self.host, self._requested_port
            )
        if self._start_error is not None:
            self._thread.join(timeout)
            raise BrokerStartError(
                _describe(self._start_error), self.host, self._requested_port
            ) from self._start_error
        log.info("broker listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down: close the listeners, then the client sessions; end the loop thread.

        The port is free as soon as this starts. Clients that amqtt cannot close in
        time are disconnected hard (see `_shutdown`); BrokerStopError only if the loop
        thread still has not ended after `timeout`.
        """
        if self._thread is None or not self._thread.is_alive():
            return
        # amqtt gets a quarter of the time, another after its clients are aborted and
        # another once cancelled (see _shutdown); the rest is for the thread to end.
        self._grace = timeout / 4
        self._request_stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise BrokerStopError(f"the broker on {self.url} did not stop within {timeout:g} s")
        log.info("broker on %s stopped", self.url)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _request_stop(self) -> None:
        loop, stop = self._loop, self._stop_requested
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(stop.set)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); a daemon thread has no one else
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                log.exception("the broker loop failed")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        listening = False
        try:
            broker_class = amqtt_broker_class()
            broker = broker_class(
                self.config,
                limits=self.limits,
                refusals=self._refusals,
                access=self.access,
                tls_contexts=self._tls_contexts,
            )
            await broker.start()
            self._amqtt = broker
            listening = True
            self._port = _bound_port(broker, "default")
            if WS_LISTENER in self.config["listeners"]:
                self._ws_port = _bound_port(broker, WS_LISTENER)
        except Exception as exc:
            self._start_error = exc
            self._started.set()
            if listening:
                await broker.shutdown()
            return
        self._started.set()
        if not self._abandoned.is_set():  # start() gave up waiting: do not serve anyway
            await self._stop_requested.wait()
        await self._shutdown(broker, broker.clients)

    async def _shutdown(self, broker: Broker, clients: set[asyncio.WriteTransport]) -> None:
        """Stop listening at once, then give amqtt's shutdown a bounded time.

        The listeners close first, so the port is free for a restart right away and no
        client reconnects into a broker that is going away (amqtt itself closes them
        last). amqtt's shutdown waits for each client's reader to end, and a reader can
        miss its cancellation (a PUBACK arriving just as it is cancelled, on Python
        3.11) and wait for that client to hang up. After `grace` seconds the remaining
        client connections are aborted, which ends their readers; a shutdown still not
        done after that is cancelled, so the loop thread always ends.
        """
        for listener in _listeners(broker).values():
            listener.close()
        shutdown = asyncio.ensure_future(broker.shutdown())
        done, _ = await asyncio.wait({shutdown}, timeout=self._grace)
        if not done:
            log.warning(
                "broker on %s: amqtt had not shut down after %g s; aborting %d client(s)",
                self.url, self._grace, len(clients),
            )  # fmt: skip
            for transport in list(clients):
                transport.abort()
            done, _ = await asyncio.wait({shutdown}, timeout=self._grace)
        if not done:
            log.warning("broker on %s: amqtt's shutdown is stuck; cancelling it", self.url)
            shutdown.cancel()
            await asyncio.wait({shutdown}, timeout=self._grace)
        elif not shutdown.cancelled() and shutdown.exception() is not None:
            log.warning("broker on %s: amqtt's shutdown failed: %r", self.url, shutdown.exception())


def _describe(exc: BaseException) -> str:
    """The error and its causes: amqtt wraps the useful message (dacite's) in bare ones."""
    parts: list[str] = []
    cause: BaseException | None = exc
    while cause is not None and len(parts) < 5:
        parts.append(str(cause) or type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    return ": ".join(dict.fromkeys(parts))


def _bind_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _listeners(broker: Broker) -> dict[str, Any]:
    """amqtt's listening servers (asyncio's for TCP, websockets' for WebSockets: both have
    `close()` and `sockets`), by listener name.

    amqtt has no public accessor for them, so this is the one place we read its
    internals (`Broker._servers`); the port-0 and shutdown tests fail loudly if an amqtt
    upgrade moves them.
    """
    try:
        servers = {name: server.instance for name, server in broker._servers.items()}
    except (AttributeError, TypeError) as exc:
        raise BrokerError("cannot read amqtt's listeners (internals changed?)") from exc
    return {name: s for name, s in servers.items() if hasattr(s, "sockets")}


def _bound_port(broker: Broker, name: str) -> int:
    """The real port of listener `name`."""
    listener = _listeners(broker).get(name)
    if listener is None:
        raise BrokerError(f"amqtt has no listener {name!r} (internals changed?)")
    ports = {sock.getsockname()[1] for sock in listener.sockets}
    if len(ports) != 1:
        # asyncio binds one socket per address a host name resolves to, and port 0
        # gives each its own port: there would be no one port to report.
        raise BrokerError(f"the listener got several ports {sorted(ports)}; bind one address")
    return int(ports.pop())


def _check_listeners(config: Mapping[str, Any]) -> None:
    """Only TCP and WebSockets listeners: `stream_connected` and `ws_connected`
    (broker.listeners) are where every limit starts; amqtt's external listeners would
    bypass them."""
    listeners = config.get("listeners")
    if not isinstance(listeners, Mapping):
        raise BrokerConfigError("listeners must be a mapping of listener names")
    for name, listener in listeners.items():
        kind = listener.get("type", "tcp") if isinstance(listener, Mapping) else None
        if kind not in ("tcp", "ws"):
            raise BrokerConfigError(
                f"listener {name!s:.40}: only tcp and ws listeners are supported;"
                " the broker's limits do not guard the others"
            )
