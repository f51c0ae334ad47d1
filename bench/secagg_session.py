"""One gateway cohort's secure-aggregation round, run in this process, for bench.fuzz and
bench.hostile: the gateway's `tern.rounds.secagg_round.SecAggRound` (its one trust
boundary and the protocol behind it) and a `tern.secagg.SecAggClient` per member, with
deterministic randomness, so that every run makes the same messages.

A `Session` moves in three steps: the members' pending messages go up (`deliver_up`, to
`SecAggRound.offer` on each member's update topic), the gateway closes its open stage
(`close`), and its answers go down (`deliver_down`, through
`tern.secagg.wire.open_server_message`); the members' answers are then pending. A
session deep-copies (its randomness too), so a receiver can be snapshotted at any stage.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from tern import topics
from tern.admit import Peer, Terms, peers_of
from tern.codecs import CodecName
from tern.collect import Offer
from tern.errors import TernError
from tern.fleet import COORDINATOR, Fleet, GatewayEntry
from tern.messages import RoundSchedule, TrainConfig
from tern.rounds.cohorts import cohort_of
from tern.rounds.secagg_round import SecAggRound
from tern.secagg import Cohort, SecAggClient, open_server_message
from tern.secagg.terms import SecAggTerms
from tern.spec import ModelSpec

__all__ = ["CohortWorld", "Deterministic", "Session", "cohort_world", "derived_keys"]

IntArray = npt.NDArray[np.int64]


class Deterministic:
    """`randomness(n)` from a seed and a counter (BLAKE2b); copies carry their state."""

    def __init__(self, seed: bytes) -> None:
        self.seed, self.counter = seed, 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            block = self.counter.to_bytes(8, "little")
            out += hashlib.blake2b(block, key=self.seed[:64], digest_size=64).digest()
            self.counter += 1
        return out[:n]


def derived_keys(ids: Iterable[str]) -> dict[str, SigningKey]:
    return {i: SigningKey(hashlib.sha256(b"secagg-bench\0" + i.encode()).digest()) for i in ids}


@dataclass(frozen=True, slots=True)
class CohortWorld:
    """One gateway, its devices (its cohort), a round under secure aggregation, and the
    integer contribution each device masks."""

    fleet: Fleet
    keys: dict[str, SigningKey]
    gateway: str
    run: int
    spec: ModelSpec
    schedule: RoundSchedule
    cohort: Cohort
    terms: Terms
    peers: dict[str, Peer]
    xs: dict[str, IntArray]

    def topic(self, member: str) -> str:
        return topics.update(self.fleet.fleet, self.gateway, member).path


def cohort_world(
    fleet_id: str,
    gateway: str,
    devices: tuple[str, ...],
    spec: ModelSpec,
    *,
    run: int,
    rnd: int,
    seed: int = 0,
    keys: dict[str, SigningKey] | None = None,
) -> CohortWorld:
    """The world: keys derived from the ids unless given; contributions as a device
    encodes them (weight level times trits, then the level, then a count of one)."""
    keys = dict(keys) if keys is not None else derived_keys((COORDINATOR, gateway, *devices))
    entry = GatewayEntry(keys[gateway].verify_key, COORDINATOR,
                         {d: keys[d].verify_key for d in devices})  # fmt: skip
    fleet = Fleet(fleet_id, keys[COORDINATOR].verify_key, {gateway: entry})
    terms = SecAggTerms((0.05,) * len(spec.tensors), threshold=0.6)
    schedule = RoundSchedule(
        round=rnd, model_version=rnd, codec=CodecName.TERNARY, deadline=1.8e9,
        min_contributors=1, participants=tuple(sorted(devices)), seed=seed,
        train=TrainConfig(), secagg=terms,
    )  # fmt: skip
    cohort = cohort_of(fleet, gateway, schedule, run, spec)
    assert cohort is not None
    rng = np.random.default_rng(seed)
    xs = {}
    for d in sorted(devices):
        level = int(rng.integers(1, terms.weight_levels + 1))
        trits = rng.integers(-1, 2, spec.size)
        xs[d] = np.concatenate([level * trits, [level, 1]]).astype(np.int64)
    return CohortWorld(fleet, keys, gateway, run, spec, schedule, cohort,
                       Terms.of(fleet_id, run, schedule, spec),
                       peers_of(fleet, gateway, schedule), xs)  # fmt: skip


class Session:
    """The round at the gateway and at every member, driven step by step."""

    def __init__(self, world: CohortWorld) -> None:
        w = world
        self.world = w
        self.round = SecAggRound(
            run=w.run, schedule=w.schedule, terms=w.terms, peers=w.peers, cohort=w.cohort,
            key=w.keys[w.gateway], opened_at=0.0, close_at=100.0,
        )  # fmt: skip
        self.clients = {
            m: SecAggClient(w.cohort, m, w.keys[m], randomness=Deterministic(m.encode()))
            for m in w.cohort.members
        }
        self.up: dict[str, bytes] = {m: c.advertise() for m, c in self.clients.items()}
        self.down: dict[str, bytes] = {}
        self.offers: list[Offer] = []  # what the gateway said to each honest message
        self.refused: list[str] = []  # reasons a member refused its gateway's message
        self._masked: set[str] = set()

    def snapshot(self) -> Session:
        """A copy that shares only the world's immutable values (the fleet, the cohort,
        the schedule, the keys)."""
        w = self.world
        shared: list[object] = [w, w.fleet, w.cohort, w.schedule, w.terms, w.spec]
        shared += [*w.keys.values(), *(k.verify_key for k in w.keys.values())]
        shared += [*w.peers.values(), *(p.key for p in w.peers.values())]
        return copy.deepcopy(self, {id(x): x for x in shared})

    def deliver_up(self, only: Iterable[str] | None = None) -> None:
        chosen = set(self.up) if only is None else set(only) & set(self.up)
        for m in sorted(chosen):
            data = self.up.pop(m)
            self.offers.append(self.round.offer(data, self.world.topic(m), retained=False))

    def close(self) -> None:
        self.down = self.round.advance()

    def deliver_down(self) -> None:
        down, self.down = self.down, {}
        for m, data in sorted(down.items()):
            client = self.clients[m]
            try:
                answer = client.take(open_server_message(data, self.world.cohort, m))
            except TernError as exc:
                self.refused.append(exc.reason)
                continue
            if answer is not None:
                self.up[m] = answer
            if client.ready and m not in self._masked:
                self._masked.add(m)
                self.up[m] = client.mask(self.world.xs[m])

    def at_stage(self, stage: str) -> Session:
        """Run until the gateway's open stage is `stage`, its messages pending."""
        while self.round.stage != stage:
            if self.round.stage is None:
                raise RuntimeError(f"the round ended before stage {stage}")
            self.deliver_up()
            self.close()
            self.deliver_down()
        return self

    def awaiting(self, stage: str) -> Session:
        """Run until the gateway has closed `stage`: its answers pending, not delivered."""
        self.at_stage(stage)
        self.deliver_up()
        self.close()
        return self

    def finish(self) -> Session:
        """Deliver what is pending and run every stage left."""
        self.deliver_down()
        while self.round.stage is not None:
            self.deliver_up()
            self.close()
            self.deliver_down()
        return self

    def expected(self) -> IntArray:
        """The exact sum of the survivors' contributions."""
        survivors = self.round.server.survivors
        total = np.zeros(self.world.cohort.length, dtype=np.int64)
        for m in survivors:
            total += self.world.xs[m]
        return total

    @property
    def exact(self) -> bool:
        """The round closed with exactly the survivors' sum."""
        result = self.round.result
        return result is not None and np.array_equal(result, self.expected())
