"""amqtt plugins for the embedded broker's tests.

`WaitForClientsOnShutdown` and `NeverShutDown` make the shutdown hang, as amqtt itself
can: its shutdown waits for each client's reader to end, and a reader that misses its
cancellation (a PUBACK arriving just as it is cancelled, on Python 3.11) waits for its
client to hang up; a client that never does holds the shutdown forever. That race cannot
be triggered on purpose, so these plugins hold the shutdown in the same way.

`RefuseUser` refuses one user name at CONNECT, whatever the client id, and counts how
often it was asked: the smallest authentication there is, independent of tern's policy.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from amqtt.plugins.base import BaseAuthPlugin, BasePlugin


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


class RefuseUser(BaseAuthPlugin):  # type: ignore[misc]
    """Authentication: refuses the configured `user`, lets anyone else in.

    `asked` counts the authentications by user name ("" for none), over every broker of
    the test process: reset it before use.
    """

    asked: ClassVar[Counter[str]] = Counter()

    @dataclass
    class Config:
        user: str = ""

    async def authenticate(self, *, session: Any) -> bool:
        user = session.username or ""
        RefuseUser.asked[user] += 1
        refused: str = self.config.user
        return user != refused
