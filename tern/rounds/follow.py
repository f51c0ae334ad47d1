"""How a gateway or a device keeps the coordinator's model: by its deltas, and by a full
model only when it cannot (topics.md "model_delta").

A receiver subscribes to the coordinator's deltas and schedules (relayed down by every
gateway) and holds the current model and the one before. A delta whose base it holds
(same version, same hash) gives it the next version, whose hash the delta's signature
covers. When the latest schedule names a version it does not hold (it joined late,
missed a delta, or the coordinator sends full models), it subscribes to the full model
on its parent's broker, takes the retained copy and unsubscribes once it holds the
version. A full model comes from the coordinator (on its broker, signed by it) or from
the receiver's parent gateway (sealed by that gateway from the model it holds): the
latter is taken only when a coordinator-signed hash (a schedule's `model_hash` or a
delta's `hash`) names it, so a gateway can relay a model but never forge one.

Pure: messages in, adopted models and (un)subscriptions out.
"""

from __future__ import annotations

from dataclasses import dataclass

from tern import topics
from tern.caps import model_caps
from tern.downlink import CheckedDelta, delta_caps, model_hash
from tern.envelope import Envelope, Kind, open_envelope
from tern.errors import MalformedMessage, TernError, UnexpectedMessage
from tern.feed import CoordinatorFeed
from tern.fleet import COORDINATOR
from tern.freshness import Stamp, Watermarks
from tern.messages import GlobalModel, RoundSchedule
from tern.rounds.events import Link, Subscribe, Unsubscribe

__all__ = ["Adopted", "ModelFollower"]

_KEEP_NAMED = 8  # coordinator-signed hashes remembered (the latest rounds')
_KEEP_WAITING = 2  # full models from the parent waiting for a signed hash


@dataclass(frozen=True, slots=True)
class Adopted:
    """A model version now held: where it came from (the envelope that brought it)."""

    stamp: Stamp
    model: GlobalModel
    hash: bytes
    envelope: Envelope


class ModelFollower:
    """The models one receiver holds. `parent`: who may seal a full model for it besides
    the coordinator (a device's gateway, a gateway's parent); `link`: where they come."""

    def __init__(self, feed: CoordinatorFeed, parent: str, link: Link) -> None:
        self.feed = feed
        self.fleet = feed.fleet
        self.parent = parent
        self.link = link
        self.held: dict[Stamp, tuple[GlobalModel, bytes]] = {}  # current and previous
        self._named: dict[Stamp, bytes] = {}
        self._waiting: dict[Stamp, tuple[GlobalModel, bytes, Envelope]] = {}
        self._want: Stamp | None = None
        self._deltas = False  # the latest schedule says the coordinator sends deltas
        self.subscribed = True  # a receiver starts subscribed to the model and the deltas
        self.full_models = 0  # full models taken (the rest came as deltas)
        self.deltas = 0

    def model(self, stamp: Stamp) -> GlobalModel | None:
        got = self.held.get(stamp)
        return None if got is None else got[0]

    def latest(self) -> tuple[Stamp, GlobalModel] | None:
        if not self.held:
            return None
        stamp = max(self.held)
        return stamp, self.held[stamp][0]

    # -- messages -------------------------------------------------------------------------

    def on_schedule(self, run: int, schedule: RoundSchedule) -> list[Adopted]:
        """A schedule was taken: its version is the one to hold, its hash names it."""
        stamp = Stamp(run, schedule.model_version)
        self._deltas = schedule.downlink is not None
        self._wants(stamp)
        if schedule.model_hash is not None:
            return self._name(stamp, schedule.model_hash)
        return []

    def on_delta(self, data: bytes) -> tuple[Envelope, list[Adopted]]:
        """A coordinator's delta: the next version when this receiver holds its base. The
        envelope is returned for relaying (a gateway passes it on even when it cannot use
        it: its devices may hold the base). TernError (counted ``delta_<reason>``)."""
        try:
            latest = self.latest()
            caps = (
                model_caps(self.fleet.max_params) if latest is None else delta_caps(latest[1].spec)
            )
            env = open_envelope(
                data, {COORDINATOR: self.fleet.coordinator_key}, fleet=self.fleet.fleet,
                kinds=(Kind.MODEL_DELTA,), caps=caps,
            )  # fmt: skip
            stamp = Stamp(env.run, env.model_version)
            mark = self.feed.marks.model
            if mark is not None and stamp < mark:
                raise UnexpectedMessage(
                    f"delta to v{stamp.version} is older than the last", "stale"
                )
            if stamp in self.held:
                return env, []
            base = self.held.get(Stamp(env.run, _base_of(env.body)))
            if base is None:  # cannot apply: learn its hash, and fetch that version whole
                self._wants(stamp)
                return env, self._name(stamp, _hash_of(env.body))
            delta = CheckedDelta.from_body(env.body, base[0].spec)
            if delta.base_hash != base[1]:
                raise UnexpectedMessage("the delta's base is not the model held", "base_mismatch")
            model = delta.apply(base[0])
            digest = model_hash(model.spec, model.weights)
            if digest != delta.hash:
                raise UnexpectedMessage(
                    "the model after the delta has another hash", "hash_mismatch"
                )
        except TernError as exc:
            self.feed.rejected[f"delta_{exc.reason}"] += 1
            raise
        self.deltas += 1
        return env, [*self._name(stamp, delta.hash), *self._adopt(stamp, model, digest, env)]

    def on_full(self, data: bytes) -> list[Adopted]:
        """A full model, the coordinator's or one the parent sealed. TernError (counted
        ``model_<reason>``)."""
        try:
            keys = {COORDINATOR: self.fleet.coordinator_key}
            if self.parent != COORDINATOR:
                keys[self.parent] = self.fleet.key_of(self.parent)
            env = open_envelope(data, keys, fleet=self.fleet.fleet, kinds=(Kind.MODEL,),
                                caps=model_caps(self.fleet.max_params))  # fmt: skip
            stamp = Stamp(env.run, env.model_version)
            mark = self.feed.marks.model
            if mark is not None and stamp < mark:
                raise UnexpectedMessage(f"model v{stamp.version} is older than the last", "stale")
            if stamp in self.held:
                return []
            model = GlobalModel.from_body(env.body, max_params=self.fleet.max_params)
            digest = model_hash(model.spec, model.weights)
            named = self._named.get(stamp)
            if named is not None and named != digest:
                raise UnexpectedMessage(
                    "a model unlike the one its schedule names", "hash_mismatch"
                )
        except TernError as exc:
            self.feed.rejected[f"model_{exc.reason}"] += 1
            raise
        if env.sender == COORDINATOR or named is not None:
            return self._adopt(stamp, model, digest, env)
        self._waiting[stamp] = (model, digest, env)  # a gateway's: wait for a signed hash
        for old in sorted(self._waiting)[:-_KEEP_WAITING]:
            del self._waiting[old]
        return []

    def subscription(self) -> list[object]:
        """Subscribe to the full model while the coordinator sends no deltas (or before a
        schedule says it does), and while the wanted version is not held; unsubscribe
        once it is."""
        want = self._want
        mark = self.feed.marks.model
        missing = want is not None and want not in self.held and (mark is None or want >= mark)
        need = missing or not self._deltas
        if need == self.subscribed:
            return []
        self.subscribed = need
        topic = topics.global_model(self.fleet.fleet)
        return [Subscribe(self.link, topic) if need else Unsubscribe(self.link, topic)]

    # -- inside ---------------------------------------------------------------------------

    def _wants(self, stamp: Stamp) -> None:
        """The newest version a signed schedule or delta named is the one to hold."""
        if self._want is None or stamp > self._want:
            self._want = stamp

    def _name(self, stamp: Stamp, digest: bytes) -> list[Adopted]:
        self._named[stamp] = digest
        for old in sorted(self._named)[:-_KEEP_NAMED]:
            del self._named[old]
        waiting = self._waiting.pop(stamp, None)
        if waiting is None or waiting[1] != digest or stamp in self.held:
            return []
        return self._adopt(stamp, *waiting)

    def _adopt(
        self, stamp: Stamp, model: GlobalModel, digest: bytes, env: Envelope
    ) -> list[Adopted]:
        mark = self.feed.marks.model
        if mark is not None and stamp < mark:
            return []
        if env.kind is Kind.MODEL:
            self.full_models += 1
        self.held[stamp] = (model, digest)
        for old in sorted(self.held)[:-2]:
            del self.held[old]
        self._waiting = {s: w for s, w in self._waiting.items() if s > stamp}
        if mark is None or stamp > mark:
            self.feed.marks = Watermarks(stamp, self.feed.marks.schedule)
        return [Adopted(stamp, model, digest, env)]


def _base_of(body: object) -> int:
    if isinstance(body, dict):
        base = body.get("base")
        if isinstance(base, int) and not isinstance(base, bool) and base >= 0:
            return base
    raise MalformedMessage("a delta's base is not a version")


def _hash_of(body: object) -> bytes:
    if isinstance(body, dict):
        h = body.get("hash")
        if isinstance(h, bytes) and len(h) == 32:
            return h
    raise MalformedMessage("a delta's hash is not a SHA-256")
