"""The gateway's side of secure aggregation in its cohort (pure: no I/O, no clock).

Four stages, each closed by `advance` when every expected member has sent (`complete`)
or when the round machine's deadline passes. Closing a stage keeps only members whose
neighbourhood still holds enough live share holders (and prunes again until stable),
and fails the round (`SecAggFailed`) when fewer than the cohort's minimum are left: in
particular the survivors are checked before any reveal is asked for. The last stage
rebuilds each survivor's self-mask seed and each dropped member's mask key (checked
against the key it advertised), removes their masks and leaves exactly the sum of the
survivors' vectors modulo 2^bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

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
    SEED_BYTES,
    SecAggError,
    SecAggFailed,
    agree,
    derive,
    mask_key,
    pair_seed,
    prg,
    ring_dtype,
    self_seed,
)
from tern.secagg.graph import Cohort
from tern.secagg.ring import from_ring, unpack
from tern.secagg.wire import check_facts, seal_message

__all__ = ["SecAggServer", "Traffic"]

_STAGE_OF = {
    Kind.SA_KEYS: "keys",
    Kind.SA_SHARES: "shares",
    Kind.SA_MASKED: "masked",
    Kind.SA_REVEAL: "reveal",
}
# any scalar: X25519 clamps it to a multiple of 8, so a key of small order gives zero
_PROBE = derive(b"probe", bytes(32), b"key-probe")


@dataclass(slots=True)
class Traffic:
    """Bytes one member sent to the gateway and received from it in this round."""

    received: int = 0
    sent: int = 0


class SecAggServer:
    """The gateway `cohort.server` aggregating `cohort`, signing with `key`.

    `stage` is the open stage (``keys``, ``shares``, ``masked``, ``reveal``), then
    ``done`` or ``failed``; `traffic` counts each member's bytes both ways.
    """

    def __init__(self, cohort: Cohort, key: SigningKey) -> None:
        self.cohort, self._key = cohort, key
        self.stage = "keys"
        self.survivors: tuple[str, ...] = ()
        self.traffic = {m: Traffic() for m in cohort.members}
        self._got: dict[Kind, dict[str, tuple[Envelope, object]]] = {k: {} for k in _STAGE_OF}
        self._raw_keys: dict[str, bytes] = {}
        self._live: frozenset[str] = frozenset(cohort.members)  # expected in the open stage
        self._roster: dict[str, frozenset[str]] = {}  # member -> neighbours in its roster
        self._shared: frozenset[str] = frozenset()  # U2: completed sharing
        self._alive: dict[str, frozenset[str]] = {}  # member -> its survivor list
        self._result: npt.NDArray[np.int64] | None = None

    @property
    def expected(self) -> frozenset[str]:
        """Members whose message the open stage waits for."""
        return self._live if self.stage in _STAGE_OF.values() else frozenset()

    @property
    def complete(self) -> bool:
        if self.stage not in _STAGE_OF.values():
            return False
        kind = next(k for k, s in _STAGE_OF.items() if s == self.stage)
        return self._live <= self._got[kind].keys()

    @property
    def done(self) -> bool:
        return self._result is not None

    def result(self) -> npt.NDArray[np.int64]:
        """The survivors' sum, centered (int64), once the last stage closed."""
        if self._result is None:
            raise SecAggError("the cohort's sum is not known yet", "out_of_order")
        return self._result

    def offer(self, sender: str, env: Envelope, raw: bytes) -> None:
        """An opened member message and the bytes it was opened from; SecAggError when
        refused. The same envelope again is ignored."""
        if sender not in self.traffic:
            raise SecAggError("a message from outside the cohort", "not_member")
        check_facts(env, self.cohort, sender)
        if env.kind not in _STAGE_OF:
            raise SecAggError("not a message a member sends", "wrong_kind")
        got = self._got[env.kind]
        if sender in got:
            if got[sender][0] == env:
                return
            raise SecAggError(f"a second, different {env.kind}", "duplicate")
        if self.stage != _STAGE_OF[env.kind]:
            raise SecAggError(f"{env.kind} while the gateway is at {self.stage}", "out_of_order")
        if sender not in self._live:
            raise SecAggError(
                f"{env.kind} from a member the stage does not wait for", "not_expected"
            )
        got[sender] = (env, self._check(sender, env))
        if env.kind == Kind.SA_KEYS:
            self._raw_keys[sender] = raw
        self.traffic[sender].received += len(raw)

    def _check(self, sender: str, env: Envelope) -> object:
        cohort = self.cohort
        k = len(cohort.neighbours(sender))
        if env.kind == Kind.SA_KEYS:
            keys = KeysBody.from_body(env.body)
            agree(_PROBE, keys.c), agree(_PROBE, keys.s)  # refuse keys of small order
            return keys
        if env.kind == Kind.SA_SHARES:
            shares = SharesBody.from_body(env.body, k)
            if shares.to.keys() != self._roster[sender]:
                raise SecAggError("shares not for exactly the sender's roster", "wrong_recipients")
            return shares
        if env.kind == Kind.SA_MASKED:
            masked = MaskedBody.from_body(env.body, cohort.length, cohort.bits)
            try:
                return unpack(masked.data, cohort.length, cohort.bits)
            except TernError:
                raise SecAggError("a masked vector's padding is not zero", "malformed") from None
        reveal = RevealBody.from_body(env.body, k + 1)
        alive = self._alive[sender]
        dropped = (self._roster[sender] & self._shared) - alive
        if not reveal.b.keys() <= alive or not reveal.s.keys() <= dropped:
            raise SecAggError("shares of members not asked for", "bad_reveal")
        values = [shamir.from_bytes(v) for v in (*reveal.b.values(), *reveal.s.values())]
        if any(v is None for v in values):
            raise SecAggError("a share that is not a field element", "malformed")
        return reveal

    def _prune(self, live: Iterable[str]) -> frozenset[str]:
        """Drop members with fewer than t live holders, until none is left to drop."""
        left = set(live)
        changed = True
        while changed:
            changed = False
            for u in sorted(left):
                if len(left.intersection(self.cohort.neighbours(u))) + 1 < self.cohort.needed(u):
                    left.discard(u)
                    changed = True
        return frozenset(left)

    def _fail(self, message: str, reason: str) -> SecAggFailed:
        self.stage = "failed"
        self._live = frozenset()
        return SecAggFailed(message, reason)

    def _enough(self, live: frozenset[str], what: str) -> None:
        if len(live) < self.cohort.minimum:
            minimum = self.cohort.minimum
            raise self._fail(f"{len(live)} members {what}, below the minimum {minimum}", "too_few")

    def _send(self, kind: Kind, to: str, body: object) -> bytes:
        sealed = seal_message(self.cohort, kind, self.cohort.server, body, self._key)
        self.traffic[to].sent += len(sealed)
        return sealed

    def advance(self) -> dict[str, bytes]:
        """Close the open stage: the sealed server messages by recipient ({} once the
        sum is known); SecAggFailed when too few are left or a secret is unrecoverable."""
        if self.stage not in _STAGE_OF.values():
            return {}
        step: dict[str, Callable[[], dict[str, bytes]]] = {
            "keys": self._close_keys,
            "shares": self._close_shares,
            "masked": self._close_masked,
            "reveal": self._close_reveal,
        }
        return step[self.stage]()

    def _close_keys(self) -> dict[str, bytes]:
        live = self._prune(self._got[Kind.SA_KEYS])
        self._enough(live, "advertised keys")
        out = {}
        for u in sorted(live):
            peers = live.intersection(self.cohort.neighbours(u))
            self._roster[u] = frozenset(peers)
            keys = tuple(self._raw_keys[v] for v in sorted(peers))
            out[u] = self._send(Kind.SA_ROSTER, u, RosterBody(u, keys).to_body())
        self._live, self.stage = live, "shares"
        return out

    def _close_shares(self) -> dict[str, bytes]:
        live = self._prune(self._got[Kind.SA_SHARES])
        self._enough(live, "shared their secrets")
        shares = {u: self._shares(u) for u in live}
        out = {}
        for u in sorted(live):
            sources = {v: shares[v].to[u] for v in sorted(live & self._roster[u])}
            out[u] = self._send(Kind.SA_INBOX, u, InboxBody(u, sources).to_body())
        self._shared = self._live = live
        self.stage = "masked"
        return out

    def _shares(self, u: str) -> SharesBody:
        value = self._got[Kind.SA_SHARES][u][1]
        assert isinstance(value, SharesBody)
        return value

    def _close_masked(self) -> dict[str, bytes]:
        live = frozenset(self._got[Kind.SA_MASKED])
        self._enough(live, "sent their masked vectors")
        cohort = self.cohort
        for u in sorted(self._shared):
            holders = live & self._roster[u] & self._shared
            if len(holders) + (u in live) < cohort.needed(u):
                raise self._fail("a member's secrets would keep too few holders", "too_few")
        out = {}
        for u in sorted(live):
            alive = frozenset(live & self._roster[u]) | {u}
            self._alive[u] = alive
            out[u] = self._send(
                Kind.SA_SURVIVORS, u, SurvivorsBody(u, tuple(sorted(alive))).to_body()
            )
        self.survivors = tuple(sorted(live))
        self._live, self.stage = live, "reveal"
        return out

    def _secret(self, member: str, kind: str) -> bytes:
        x = {h: i + 1 for i, h in enumerate(self.cohort.holders(member))}
        points = []
        for h, (_, value) in self._got[Kind.SA_REVEAL].items():
            assert isinstance(value, RevealBody)
            share = (value.b if kind == "b" else value.s).get(member)
            if share is not None:
                y = shamir.from_bytes(share)
                assert y is not None  # checked when offered
                points.append((x[h], y))
        t = self.cohort.needed(member)
        if len(points) < t:
            raise self._fail(
                f"too few shares revealed to unmask a member ({len(points)} < {t})", "too_few"
            )
        secret = shamir.combine(points, t)
        if secret >> (8 * SEED_BYTES):
            raise self._fail("a rebuilt secret is not a seed: a share was wrong", "bad_reveal")
        return secret.to_bytes(SEED_BYTES, "big")

    def _close_reveal(self) -> dict[str, bytes]:
        cohort, context, bits = self.cohort, self.cohort.context, self.cohort.bits
        masked = self._got[Kind.SA_MASKED]
        total = np.zeros(cohort.length, dtype=ring_dtype(bits))
        for u in self.survivors:
            vector = masked[u][1]
            assert isinstance(vector, np.ndarray)
            total += vector.astype(total.dtype)
            total -= prg(self_seed(self._secret(u, "b"), context, u), cohort.length, bits)
        keys = {u: body for u, (_, body) in self._got[Kind.SA_KEYS].items()}
        for w in sorted(self._shared - set(self.survivors)):
            s_sk, s_pk = mask_key(self._secret(w, "s"), context, w)
            advertised = keys[w]
            assert isinstance(advertised, KeysBody)
            if s_pk != advertised.s:
                raise self._fail("a rebuilt mask key is not the one advertised", "bad_reveal")
            for v in sorted(self._roster[w] & set(self.survivors)):
                peer = keys[v]
                assert isinstance(peer, KeysBody)
                mask = prg(pair_seed(agree(s_sk, peer.s), context, w, v), cohort.length, bits)
                if w > v:  # v added this mask; take it out
                    total -= mask
                else:
                    total += mask
        total &= (1 << bits) - 1
        self._result = from_ring(total.astype(np.uint32), bits)
        self.stage = "done"
        self._live = frozenset()
        return {}
