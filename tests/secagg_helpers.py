"""A cohort's whole secure-aggregation round in memory: clients, server, bytes between.

Every message crosses as sealed bytes and is opened the way the round machines open
it (`open_member_message`, `open_server_message`). Members can drop at any stage.
Deterministic: keys and randomness come from fixed seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from tern.secagg import (
    Cohort,
    SecAggClient,
    SecAggServer,
    open_member_message,
    open_server_message,
)

FLEET, RUN, ROUND, MODEL, SERVER = "plant-7", 1764500000000, 12, 11, "gw-1"
GATEWAY_KEY = SigningKey(hashlib.sha256(b"gateway").digest())
# where a member can vanish: before sending its keys, before answering the roster (no
# shares), before masking (after its shares) and before revealing (after its masked vector)
STAGES = ("keys", "roster", "inbox", "survivors")


def member_ids(n: int) -> tuple[str, ...]:
    return tuple(f"dev-{i:03d}" for i in range(n))


def signing_key(member: str) -> SigningKey:
    return SigningKey(hashlib.sha256(member.encode()).digest())


def randomness(tag: str) -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom."""
    counter = [0]

    def draw(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += hashlib.sha256(f"{tag}/{counter[0]}".encode()).digest()
            counter[0] += 1
        return bytes(out[:n])

    return draw


def cohort_of(
    n: int,
    *,
    length: int = 33,
    bits: int = 12,
    threshold: float = 0.6,
    degree: int = 0,
    round: int = ROUND,
    run: int = RUN,
) -> Cohort:
    members = member_ids(n)
    keys = {m: signing_key(m).verify_key for m in members}
    return Cohort(
        FLEET, run, round, MODEL, SERVER, members, keys, GATEWAY_KEY.verify_key,
        threshold, degree, 3, length, bits,
    )  # fmt: skip


class Round:
    """One cohort's round; `xs` are the members' vectors (small centered integers)."""

    def __init__(self, cohort: Cohort, *, tag: str = "r") -> None:
        self.cohort = cohort
        self.clients = {
            m: SecAggClient(cohort, m, signing_key(m), randomness=randomness(f"{tag}/{m}"))
            for m in cohort.members
        }
        self.server = SecAggServer(cohort, GATEWAY_KEY)
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(tag.encode()).digest()[:4]))
        self.xs = {m: rng.integers(-8, 9, cohort.length).astype(np.int64) for m in cohort.members}
        self.sent: dict[str, list[bytes]] = {m: [] for m in cohort.members}

    def offer(self, messages: Mapping[str, bytes]) -> None:
        for m, data in sorted(messages.items()):
            self.sent[m].append(data)
            self.server.offer(m, open_member_message(data, self.cohort, m), data)

    def deliver(self, messages: Mapping[str, bytes], to: Collection[str]) -> dict[str, bytes]:
        """Server messages to the members in `to`; their answers (masked vectors after
        the inbox)."""
        answers = {}
        for m, data in sorted(messages.items()):
            if m not in to:
                continue
            client = self.clients[m]
            answer = client.take(open_server_message(data, self.cohort, m))
            if answer is None and client.ready:
                answer = client.mask(self.xs[m])
            if answer is not None:
                answers[m] = answer
        return answers

    def run(self, drop: Mapping[str, Collection[str]] | None = None) -> dict[str, bytes]:
        """The whole round; `drop[stage]` vanish after that stage (see STAGES): they
        send nothing more. Returns the last server messages (survivor lists)."""
        drop = drop or {}
        alive = set(self.cohort.members) - set(drop.get("keys", ()))
        self.offer({m: self.clients[m].advertise() for m in alive})
        out: dict[str, bytes] = {}
        for stage in STAGES[1:]:
            out = self.server.advance()
            alive -= set(drop.get(stage, ()))
            self.offer(self.deliver(out, alive))
        self.server.advance()
        return out

    def expected(self) -> npt.NDArray[np.int64]:
        total = np.zeros(self.cohort.length, dtype=np.int64)
        for m in self.server.survivors:
            total += self.xs[m]
        return total
