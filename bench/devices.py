"""Many simulated devices in one process, each on its own MQTT connection with its login.

paho's network loop waits with select(), which cannot watch a descriptor numbered 1024
or above: one process holds about 250 paho clients (each takes a socket and a
socketpair), not a thousand. These devices are amqtt's asyncio client instead, all on
one event loop in one thread (epoll: no such bound). Each device is a real session on
its gateway's broker, with its own client id and login, so the broker enforces its
rights exactly as for a real device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlsplit

from tern import topics
from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.members import Members
from tern.messages import RoundSchedule, open_schedule

__all__ = ["DevicePool"]

log = logging.getLogger(__name__)

_CONNECTS_AT_ONCE = 32  # a burst of CONNECTs is what a restarted broker sees; keep it sane


class DevicePool:
    """The simulated devices of one gateway: on each new schedule (verified with the
    coordinator's key) every participating device seals its precomputed update body for
    that round with its own key and publishes it, QoS 1, on its own update topic, over
    its own connection. The first device also receives what a real device follows, the
    model's deltas and the schedule (the others do not train, so one copy per pool is
    enough): `bytes_in` counts its deliveries' payloads, what every device of the pool
    would receive, and `bytes_out` the payloads of every update sent."""

    def __init__(
        self,
        url: str,
        members: Members,
        gateway: str,
        devices: Sequence[str],
        bodies: Mapping[str, object],
    ) -> None:
        self.fleet, self.gateway, self.members = members.fleet, gateway, members
        self.devices = list(devices)
        self.bodies = bodies
        parts = urlsplit(url)
        self._host, self._port = parts.hostname, parts.port
        self.errors = 0
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0  # the first device's deliveries (payload bytes)
        self.bytes_out = 0  # every device's updates (payload bytes)
        self._last_round = -1
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"devices-{gateway}", daemon=True
        )
        self._clients: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, timeout: float) -> DevicePool:
        """Connect every device; TimeoutError if they are not all connected in `timeout`."""
        self._thread.start()
        done: Future[None] = asyncio.run_coroutine_threadsafe(self._connect_all(), self._loop)
        try:
            done.result(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._disconnect_all(), self._loop).result(10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)

    async def _connect_all(self) -> None:
        from amqtt.client import MQTTClient  # imported here: amqtt only where used

        gate = asyncio.Semaphore(_CONNECTS_AT_ONCE)

        async def connect(device: str) -> None:
            user, password = self.members.login(device)
            client = MQTTClient(
                client_id=sorted(self.fleet.client_ids(device))[0],
                config={"auto_reconnect": False, "keep_alive": 60},
            )
            async with gate:
                await client.connect(f"mqtt://{user}:{password}@{self._host}:{self._port}")
            self._clients[device] = client

        await asyncio.gather(*(connect(d) for d in self.devices))
        first = self._clients[self.devices[0]]
        f = self.fleet.fleet
        await first.subscribe([(topics.model_delta(f).path, 1), (topics.round_schedule(f).path, 1)])
        self._tasks.append(asyncio.create_task(self._listen(first)))

    async def _disconnect_all(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(
            *(client.disconnect() for client in self._clients.values()), return_exceptions=True
        )

    async def _listen(self, client: Any) -> None:
        schedule_topic = topics.round_schedule(self.fleet.fleet).path
        while True:
            message = await client.deliver_message()
            if message is None:
                continue
            self.messages_in += 1
            self.bytes_in += len(message.data)
            if message.topic != schedule_topic:
                continue  # a delta: nothing to do, its delivery is counted
            try:
                env, schedule = open_schedule(bytes(message.data), self.fleet)
            except TernError:
                self.errors += 1
                continue
            if schedule.round > self._last_round:  # a retained copy of an old round: ignored
                self._last_round = schedule.round
                self._tasks.append(asyncio.create_task(self._answer(env.run, schedule)))

    async def _answer(self, run: int, s: RoundSchedule) -> None:
        f = self.fleet.fleet

        async def send(device: str) -> None:
            body = self.bodies[device]
            env = Envelope(Kind.UPDATE, f, s.round, s.model_version, device, body, run=run)
            data = seal(env, self.members.keys[device])
            topic = topics.update(f, self.gateway, device).path
            try:
                await self._clients[device].publish(topic, data, qos=1)
                self.messages_out += 1
                self.bytes_out += len(data)
            except Exception:  # a lost device is data here, not the end of the bench
                log.exception("device %s: publish failed", device)
                self.errors += 1

        taking_part = [d for d in self.devices if s.participants is None or d in s.participants]
        await asyncio.gather(*(send(d) for d in taking_part))
