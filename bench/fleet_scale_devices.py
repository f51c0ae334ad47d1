"""One gateway's devices as real MQTT clients, in a process of their own (bench.fleet_scale).

    python -m bench.fleet_scale_devices SPEC.json

Every device is a gmqtt client with its own connection, its reserved client id and its
own login on the gateway's broker, subscribed (QoS 1) to the round schedule like a real
device, and answers a schedule once its gateway has passed down the model version the
schedule names, as a device must (it trains on that model): the first device of the
process also takes the model (retained, on the gateway's broker) and tells the others.
gmqtt is the lightest asyncio client measured here: about 20 KB and 0.3 ms of
CPU per connection, against 51 KB and 1.4 ms for amqtt's client, and no timer per
client (aiomqtt wakes every client once a second).

Before anything is timed, each device encodes one real ternary update of its own and
seals it with its own key for every round the run will hold (the coordinator's run,
rounds and model versions are in SPEC), so a schedule's arrival costs a device one
publish, not a signature. A schedule the guess does not match is sealed when it arrives
(counted: `live_seals`). The schedule's signature is checked once per distinct payload:
every device of the process receives the same bytes.

Protocol with the parent: one JSON line on stdout once every device is connected and
subscribed ({"ready": ...}), then, when stdin reads "quit" or closes, one JSON line with
the counts ({"final": ...}) after every device has disconnected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from gmqtt import Client  # type: ignore[import-untyped]
from gmqtt.mqtt.constants import MQTTv311  # type: ignore[import-untyped]
from gmqtt.storage import PersistentStorage  # type: ignore[import-untyped]

from kernels.reference import mlp_spec
from tern import topics
from tern.aggregate import Partial
from tern.caps import model_caps
from tern.codecs import TernaryCodec
from tern.envelope import Envelope, Kind, open_envelope, seal
from tern.errors import TernError
from tern.fleet import COORDINATOR, Fleet
from tern.keys import signing_key_from_text
from tern.messages import RoundSchedule, encode_update, open_schedule

__all__ = ["Tally", "main", "update_body"]

log = logging.getLogger(__name__)

CONNECTS_AT_ONCE = 64  # CONNECTs in flight from one process: a burst, not a stampede
SUBSCRIBE_TIMEOUT = 60.0


def update_body(layers: tuple[int, ...], seed: int, index: int) -> object:
    """Device `index`'s update: a random small delta times its sample count, ternary-coded."""
    spec = mlp_spec(layers)
    rng = np.random.default_rng([seed, index])
    delta = (rng.standard_normal(spec.size) * 0.01).astype(np.float32)
    weight = float(rng.integers(50, 200))
    update, _ = encode_update(TernaryCodec(), spec, Partial(delta * np.float32(weight), weight, 1))
    return update.to_body()


@dataclass
class Tally:
    """What this process's devices did, for the parent."""

    sent: Counter[int] = field(default_factory=Counter)  # round -> updates published
    acked: int = 0  # PUBACKs for them
    live_seals: int = 0
    waited_for_model: int = 0  # schedules that came before their model
    bad_schedules: int = 0
    bad_models: int = 0
    publish_errors: int = 0
    disconnects: int = 0
    subscribed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": {str(r): n for r, n in sorted(self.sent.items())},
            "acked": self.acked,
            "live_seals": self.live_seals,
            "waited_for_model": self.waited_for_model,
            "bad_schedules": self.bad_schedules,
            "bad_models": self.bad_models,
            "publish_errors": self.publish_errors,
            "disconnects": self.disconnects,
        }


class _CountingStorage(PersistentStorage):  # type: ignore[misc]
    """gmqtt's in-flight store (its `persistent_storage` hook): a removal is a PUBACK."""

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self._tally = tally

    def remove_message_by_mid(self, mid: int) -> None:
        if mid in self._messages:
            self._tally.acked += 1
        super().remove_message_by_mid(mid)


class Devices:
    """The devices of one gateway (SPEC's), their sealed updates and their clients."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.fleet = Fleet.from_json(Path(spec["fleet_file"]).read_text())
        self.gateway: str = spec["gateway"]
        url = urlsplit(spec["url"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 1883
        self.keys = {d: signing_key_from_text(v["key"]) for d, v in spec["devices"].items()}
        self.logins = {d: (v["username"], v["password"]) for d, v in spec["devices"].items()}
        self.devices = list(self.keys)
        self.run: int = spec["run"]
        layers = tuple(spec["layers"])
        self.bodies = {d: update_body(layers, spec["seed"], v["index"])
                       for d, v in spec["devices"].items()}  # fmt: skip
        self.sealed: dict[tuple[int, int], dict[str, bytes]] = {}
        for k in range(spec["rounds"]):
            r, version = spec["first_round"] + k, spec["first_version"] + k
            self.sealed[r, version] = {d: self._seal(d, r, version) for d in self.devices}
        self.tally = Tally()
        self.clients: dict[str, Any] = {}
        self._answered: dict[str, int] = dict.fromkeys(self.devices, -1)
        self._schedules: dict[bytes, RoundSchedule | None] = {}  # payload -> checked
        self._model = -1  # the newest model version of this run the gateway passed down
        self._waiting: dict[int, list[tuple[str, RoundSchedule]]] = {}  # version -> answers
        self._model_keys = {
            COORDINATOR: self.fleet.coordinator_key,
            self.gateway: self.fleet.key_of(self.gateway),
        }
        self._closing = False

    def _seal(self, device: str, r: int, version: int) -> bytes:
        f = self.fleet.fleet
        env = Envelope(Kind.UPDATE, f, r, version, device, self.bodies[device], run=self.run)
        return seal(env, self.keys[device])

    def _schedule(self, payload: bytes) -> RoundSchedule | None:
        """The schedule in `payload` if it is this run's and its signature holds (checked
        once: every device receives the same bytes), else None."""
        if payload not in self._schedules:
            checked: RoundSchedule | None = None
            try:
                env, schedule = open_schedule(payload, self.fleet)
                checked = schedule if env.run == self.run else None
            except TernError:
                pass
            if checked is None:
                self.tally.bad_schedules += 1
            self._schedules = {payload: checked}  # keep only the newest
        return self._schedules[payload]

    def _on_message(self, device: str, payload: bytes) -> int:
        s = self._schedule(payload)
        if s is None or s.round <= self._answered[device]:
            return 0  # refused, or a retained copy of a round already answered
        self._answered[device] = s.round
        if s.participants is not None and device not in s.participants:
            return 0
        if s.model_version > self._model:
            self.tally.waited_for_model += 1
            self._waiting.setdefault(s.model_version, []).append((device, s))
            return 0
        self._answer(device, s)
        return 0

    def _on_model(self, payload: bytes) -> int:
        """A full model on the gateway's broker (the coordinator's, or sealed by the
        gateway from the deltas it follows): its version is now held below."""
        try:
            env = open_envelope(
                payload, self._model_keys, fleet=self.fleet.fleet, kinds=(Kind.MODEL,),
                caps=model_caps(self.fleet.max_params), run=self.run,
            )  # fmt: skip
        except TernError:
            self.tally.bad_models += 1
            return 0
        self._model = max(self._model, env.model_version)
        for version in sorted(v for v in self._waiting if v <= self._model):
            for device, s in self._waiting.pop(version):
                self._answer(device, s)
        return 0

    def _answer(self, device: str, s: RoundSchedule) -> None:
        ready = self.sealed.get((s.round, s.model_version))
        if ready is None:
            self.tally.live_seals += 1
            data = self._seal(device, s.round, s.model_version)
        else:
            data = ready.pop(device)
        try:
            topic = topics.update(self.fleet.fleet, self.gateway, device).path
            self.clients[device].publish(topic, data, qos=1)
            self.tally.sent[s.round] += 1
        except Exception:  # a lost device is data, not the end of the bench
            self.tally.publish_errors += 1

    async def connect_all(self, deadline: float) -> None:
        gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
        subscribed = asyncio.Event()
        schedule_topic = topics.round_schedule(self.fleet.fleet).path

        def on_subscribe(client: Any, mid: int, qos: Any, properties: Any) -> None:
            self.tally.subscribed += 1
            if self.tally.subscribed == len(self.devices) + 1:
                subscribed.set()

        def on_disconnect(client: Any, packet: Any, exc: Any = None) -> None:
            if not self._closing:
                self.tally.disconnects += 1

        model_topic = topics.global_model(self.fleet.fleet).path
        tracker = self.devices[0]

        def on_message(device: str, topic: str, payload: bytes) -> int:
            if topic == model_topic:
                return self._on_model(payload)
            return self._on_message(device, payload)

        async def connect(device: str) -> None:
            client_id = sorted(self.fleet.client_ids(device))[0]
            client = Client(client_id, persistent_storage=_CountingStorage(self.tally))
            client.set_auth_credentials(*self.logins[device])
            client.on_message = lambda c, t, p, q, props: on_message(device, t, bytes(p))
            client.on_subscribe = on_subscribe
            client.on_disconnect = on_disconnect
            async with gate:
                await client.connect(self.host, self.port, version=MQTTv311, keepalive=120)
            self.clients[device] = client
            if device == tracker:
                client.subscribe(model_topic, qos=1)  # one more SUBACK: counted below
            client.subscribe(schedule_topic, qos=1)

        await asyncio.wait_for(
            asyncio.gather(*(connect(d) for d in self.devices)), deadline - time.monotonic()
        )
        await asyncio.wait_for(subscribed.wait(), max(1.0, deadline - time.monotonic()))

    async def disconnect_all(self) -> None:
        self._closing = True
        await asyncio.gather(
            *(c.disconnect() for c in self.clients.values()), return_exceptions=True
        )


def _emit(kind: str, body: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({kind: body}) + "\n")
    sys.stdout.flush()


async def _serve(devices: Devices, connect_timeout: float) -> None:
    started = time.monotonic()
    await devices.connect_all(started + connect_timeout)
    _emit("ready", {"devices": len(devices.clients), "connect_s": time.monotonic() - started})
    loop = asyncio.get_running_loop()
    while True:  # stdin: "quit", or end of file when the parent has gone
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "quit":
            break
    await devices.disconnect_all()
    _emit("final", devices.tally.to_json())


def raise_fd_limit(wanted: int) -> None:
    """Allow `wanted` open files (as root, past the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.fleet_scale_devices SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("gmqtt").setLevel(logging.CRITICAL)
    spec = json.loads(Path(args[0]).read_text())
    raise_fd_limit(len(spec["devices"]) + 256)
    devices = Devices(spec)
    try:
        asyncio.run(_serve(devices, float(spec["connect_timeout"])))
    except TimeoutError:
        _emit("failed", {"connected": len(devices.clients), "subscribed": devices.tally.subscribed})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
