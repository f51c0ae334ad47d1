"""A member's side of secure aggregation in its gateway's cohort (pure: no I/O, no clock).

The member advertises two X25519 keys, shares its two secrets with its neighbours once
the gateway relays their (re-verified) advertisements, masks its vector once it holds
its neighbours' shares, and reveals one share of each neighbour once told who
survived: the b-share of a survivor, the s-share of a member that dropped, never both
for one member, never for a list shorter than its threshold, never for two different
lists. The round machine feeds it opened server messages (`tern.secagg.wire`) and
publishes what it returns.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from tern.envelope import Envelope, Kind
from tern.errors import TernError
from tern.secagg import shamir
from tern.secagg.bodies import (
    InboxBody,
    KeysBody,
    MaskedBody,
    RevealBody,
    RosterBody,
    SharesBody,
    SurvivorsBody,
)
from tern.secagg.crypto import (
    KEY_BYTES,
    SEED_BYTES,
    Randomness,
    SecAggError,
    agree,
    mask_key,
    open_box,
    pair_seed,
    prg,
    public_key,
    ring_dtype,
    seal_box,
    self_seed,
    share_key,
)
from tern.secagg.graph import Cohort
from tern.secagg.ring import pack, to_ring
from tern.secagg.wire import SERVER_KINDS, KeysTemplate, check_facts, open_keys_advert, seal_message

__all__ = ["SecAggClient", "masked_vector"]

_NEEDS = {Kind.SA_ROSTER: "keys", Kind.SA_INBOX: "shares", Kind.SA_SURVIVORS: "masked"}


def masked_vector(
    x: npt.NDArray[np.int64], b_seed: bytes, pairs: Mapping[bytes, int], bits: int
) -> npt.NDArray[np.uint32]:
    """x + PRG(b) + sum of sign * PRG(pair seed), modulo 2^bits."""
    acc: npt.NDArray[np.unsignedinteger[Any]] = to_ring(x, bits).astype(ring_dtype(bits))
    acc += prg(b_seed, acc.size, bits)
    for seed, sign in pairs.items():
        if sign > 0:
            acc += prg(seed, acc.size, bits)
        else:
            acc -= prg(seed, acc.size, bits)
    acc &= (1 << bits) - 1
    return acc.astype(np.uint32)


class SecAggClient:
    """One member `me` of `cohort`; `randomness` draws its keys, secrets and nonces.

    `stage`: ``keys`` (waiting for the roster), ``shares`` (for the inbox), ``masking``
    (ready to mask), ``masked`` (waiting for the survivor list), ``revealed``. `last` is
    the last message it sealed (for resends); `bad_shares`, the neighbours whose shares
    did not decrypt (not held, not revealed).
    """

    def __init__(
        self, cohort: Cohort, me: str, key: SigningKey, *, randomness: Randomness = os.urandom
    ) -> None:
        if me not in cohort.graph:
            raise ValueError("the client is not a member of its cohort")
        self.cohort, self.me, self._key, self._randomness = cohort, me, key, randomness
        self._c_sk = randomness(KEY_BYTES)
        self._b_seed = randomness(SEED_BYTES)
        self._s_seed = randomness(SEED_BYTES)
        self._s_sk, self._s_pk = mask_key(self._s_seed, cohort.context, me)
        self._template = KeysTemplate(cohort)
        self._holders = cohort.holders(me)
        self._t = cohort.needed(me)
        self.stage = "keys"
        self.last: bytes | None = None
        self._advert: bytes | None = None
        self._answers: dict[Kind, tuple[Envelope, bytes | None]] = {}
        self._peers: dict[str, KeysBody] = {}
        self._pairs: dict[str, bytes] = {}  # neighbour -> pairwise mask seed
        self._boxes: dict[str, bytes] = {}  # neighbour -> X25519 point of the share keys
        self._mask_set: tuple[str, ...] = ()
        self._held: dict[str, tuple[int, int]] = {}  # neighbour -> (b-share, s-share) held
        self._own: tuple[int, int] = (0, 0)
        self.bad_shares: tuple[str, ...] = ()
        self._masked: tuple[bytes, bytes] | None = None

    @property
    def ready(self) -> bool:
        """The inbox is taken: `mask` may be called."""
        return self.stage in ("masking", "masked", "revealed")

    def _seal(self, kind: Kind, body: object) -> bytes:
        out = seal_message(self.cohort, kind, self.me, body, self._key)
        self.last = out
        return out

    def advertise(self) -> bytes:
        """The sealed SA_KEYS message (the same bytes on every call)."""
        if self._advert is None:
            keys = KeysBody(public_key(self._c_sk), self._s_pk)
            self._advert = self._seal(Kind.SA_KEYS, keys.to_body())
        return self._advert

    def take(self, env: Envelope) -> bytes | None:
        """An opened server message; the sealed answer (None after the inbox)."""
        check_facts(env, self.cohort, self.cohort.server)
        if env.kind not in SERVER_KINDS:
            raise SecAggError("not a message the gateway sends", "wrong_kind")
        if not isinstance(env.body, Mapping) or env.body.get("to") != self.me:
            raise SecAggError("a message addressed to another member", "not_addressed")
        seen = self._answers.get(env.kind)
        if seen is not None:
            if seen[0] == env:
                return seen[1]
            raise SecAggError(f"a second, different {env.kind}", "duplicate")
        if self._advert is None or self.stage != _NEEDS[env.kind]:
            raise SecAggError(f"{env.kind} while the client is at {self.stage}", "out_of_order")
        if env.kind == Kind.SA_ROSTER:
            answer: bytes | None = self._roster(env.body)
        elif env.kind == Kind.SA_INBOX:
            self._inbox(env.body)
            answer = None
        else:
            answer = self._survivors(env.body)
        self._answers[env.kind] = (env, answer)
        return answer

    def _roster(self, body: object) -> bytes:
        neighbours = set(self.cohort.neighbours(self.me))
        roster = RosterBody.from_body(body, len(neighbours))
        cohort = self.cohort
        peers: dict[str, KeysBody] = {}
        for raw in roster.keys:
            try:  # the neighbour's own signature: a gateway cannot forge keys
                sender, keys = open_keys_advert(raw, self._template)
            except TernError:
                raise SecAggError(
                    "a key advertisement in the roster is refused", "bad_roster"
                ) from None
            if sender not in neighbours or sender in peers:
                raise SecAggError(
                    "the roster names a member twice or not a neighbour", "bad_roster"
                )
            peers[sender] = keys
        if len(peers) + 1 < self._t:
            raise SecAggError("too few neighbours left to hold my shares", "too_few")
        pairs = {
            v: pair_seed(agree(self._s_sk, k.s), cohort.context, self.me, v)
            for v, k in peers.items()
        }
        boxes = {v: agree(self._c_sk, k.c) for v, k in peers.items()}
        holders = sorted((*peers, self.me))
        position = {h: i + 1 for i, h in enumerate(self._holders)}
        xs = [position[h] for h in holders]
        b = shamir.split(int.from_bytes(self._b_seed, "big"), self._t, xs, self._randomness)
        s = shamir.split(int.from_bytes(self._s_seed, "big"), self._t, xs, self._randomness)
        to: dict[str, bytes] = {}
        for h, bh, sh in zip(holders, b, s, strict=True):
            if h == self.me:
                self._own = (bh, sh)
                continue
            key = share_key(boxes[h], cohort.context, self.me, h)
            plain = shamir.to_bytes(bh) + shamir.to_bytes(sh)
            to[h] = seal_box(key, plain, self._randomness)
        self._peers, self._pairs, self._boxes = peers, pairs, boxes
        self.stage = "shares"
        return self._seal(Kind.SA_SHARES, SharesBody(to).to_body())

    def _inbox(self, body: object) -> None:
        inbox = InboxBody.from_body(body, len(self._peers))
        if not inbox.sources.keys() <= self._peers.keys():
            raise SecAggError("shares from a member outside my roster", "bad_inbox")
        if len(inbox.sources) + 1 < self._t:
            raise SecAggError("too few neighbours completed sharing", "too_few")
        held: dict[str, tuple[int, int]] = {}
        bad: list[str] = []
        for w, ciphertext in sorted(inbox.sources.items()):
            key = share_key(self._boxes[w], self.cohort.context, w, self.me)
            try:
                plain = open_box(key, ciphertext)
            except SecAggError:
                bad.append(w)  # its share is not used; it still masks with us
                continue
            bh = shamir.from_bytes(plain[: shamir.SHARE_BYTES])
            sh = shamir.from_bytes(plain[shamir.SHARE_BYTES :])
            if bh is None or sh is None:
                bad.append(w)
                continue
            held[w] = (bh, sh)
        self._mask_set = tuple(sorted(inbox.sources))
        self._held, self.bad_shares, self.stage = held, tuple(bad), "masking"

    def mask(self, x: npt.NDArray[np.int64]) -> bytes:
        """The sealed SA_MASKED of the integer vector `x` (centered, cohort.length long)."""
        if not self.ready:
            raise SecAggError(f"mask while the client is at {self.stage}", "out_of_order")
        x = np.asarray(x)
        if x.shape != (self.cohort.length,) or x.dtype.kind not in "iu":
            raise SecAggError(
                f"a vector of {x.size} values, not {self.cohort.length} integers", "wrong_length"
            )
        digest = hashlib.sha256(x.astype("<i8").tobytes()).digest()
        if self._masked is not None:
            if self._masked[0] != digest:
                raise SecAggError("a second, different vector to mask", "duplicate")
            return self._masked[1]
        context, bits = self.cohort.context, self.cohort.bits
        pairs = {self._pairs[v]: 1 if v > self.me else -1 for v in self._mask_set}
        y = masked_vector(x, self_seed(self._b_seed, context, self.me), pairs, bits)
        sealed = self._seal(Kind.SA_MASKED, MaskedBody(bits, pack(y, bits)).to_body())
        self._masked = (digest, sealed)
        if self.stage == "masking":
            self.stage = "masked"
        return sealed

    def _survivors(self, body: object) -> bytes:
        survivors = SurvivorsBody.from_body(body, len(self._mask_set) + 1)
        alive = set(survivors.alive)
        if self.me not in alive or not alive - {self.me} <= set(self._mask_set):
            raise SecAggError("a survivor list beyond my neighbours who shared", "bad_survivors")
        if len(alive) < self._t:
            raise SecAggError("a survivor list shorter than my threshold", "too_few")
        # one list only (a second one is a duplicate): never both shares of one member
        dropped = set(self._mask_set) - alive
        b = {a: shamir.to_bytes(self._held[a][0]) for a in alive if a in self._held}
        b[self.me] = shamir.to_bytes(self._own[0])
        s = {d: shamir.to_bytes(self._held[d][1]) for d in dropped if d in self._held}
        self.stage = "revealed"
        return self._seal(Kind.SA_REVEAL, RevealBody(b, s).to_body())
