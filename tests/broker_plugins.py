"""amqtt plugins that make the embedded broker's shutdown hang, as amqtt itself can.

amqtt's shutdown waits for each client's reader to end. A reader that misses its
cancellation (a PUBACK arriving just as it is cancelled, on Python 3.11) waits for its
client to hang up, and a client that never does holds the shutdown forever. That race
cannot be triggered on purpose, so these plugins hold the shutdown in the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any

from amqtt.plugins.base import BasePlugin


class WaitForClientsOnShutdown(BasePlugin[Any]):  # type: ignore[misc]  # amqtt ships untyped
    """Shutdown waits until every connected client has gone."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.clients: set[str] = set()
        self.changed = asyncio.Event()

    async def on_broker_client_connected(self, client_id: str, **_: Any) -> None:
        self.clients.add(client_id)

    async def on_broker_client_disconnected(self, client_id: str, **_: Any) -> None:
        self.clients.discard(client_id)
        self.changed.set()

    async def on_broker_pre_shutdown(self) -> None:
        while self.clients:
            self.changed.clear()
            await self.changed.wait()


class NeverShutDown(BasePlugin[Any]):  # type: ignore[misc]
    """Shutdown waits forever (it ends only when cancelled)."""

    async def on_broker_pre_shutdown(self) -> None:
        await asyncio.Event().wait()
