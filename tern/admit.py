"""The trust boundary: the one place a receiver opens what a sender below it contributes.

A gateway receives its devices' updates and its child gateways' partials; the
coordinator, its gateways' partials. Whatever the receiver, one contribution is
admitted here, against what the receiver already trusts: the fleet file (who the
sender is, its role, its key, the devices below it, their weight bounds) and the
signed schedule of the open round (run, round, model version, codec, bounds). In
order, cheapest first (topics.md "Trust boundary"):

1. the topic's kind must be the sender's role's: a device sends on its update topic,
   a gateway on its partial topic (``wrong_topic``);
2. the size and CBOR items must fit the caps of what that role may send in this
   round (``oversize``), decoded by the strict whitelist (``malformed``, ...);
3. the envelope: fleet, kind (a device sends ``update`` or ``failure``, a gateway
   ``partial`` or ``failure``: ``wrong_kind``), the signer is the topic's sender
   (``wrong_sender``), the signature (``bad_signature``), the run and round
   (``stale_run``, ``stale_round``, ...) and the model version (``wrong_model``);
4. the body: the codec is the schedule's `codec` for a device and its `partials` for
   a partial (``wrong_codec``); counts (``count_bound``): a device counts 1 and reports no
   failures below it, a gateway counts at most the participating devices below it,
   failures included; weights (``weight_bound``): at least 1 per contributor, at most
   the device's bound (the fleet file's, else the schedule's), for a gateway the sum
   of its participating devices' bounds; every tensor against the spec
   (``wrong_shape``, ``invalid_trits``, ``non_finite``, ...); the L2 norm of the mean
   delta (sum / weight) at most the schedule's ``max_norm`` (``norm_bound``).

Pure: no clock, no I/O. `tern.collect.Collector` adds what depends on the round's
history (one contribution per sender, duplicates, redeliveries, attempts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from nacl.signing import VerifyKey

from tern.caps import contribution_caps
from tern.cbor import Caps
from tern.codecs import CodecName
from tern.envelope import Envelope, Kind, open_envelope
from tern.errors import UnexpectedMessage
from tern.fleet import Fleet
from tern.messages import MIN_WEIGHT, CheckedUpdate, Failure, RoundSchedule, Update
from tern.privacy.terms import Noise
from tern.secagg.graph import Cohort
from tern.secagg.wire import open_member_message
from tern.spec import ModelSpec
from tern.topics import Topic, TopicKind

__all__ = [
    "NORM_TOLERANCE",
    "Contribution",
    "Peer",
    "Refused",
    "Role",
    "Terms",
    "admit",
    "admit_stage",
    "peers_of",
    "weight_bound",
]

# Float32 folds round: a partial of updates that each keep to the bound may exceed it by
# a few ulps. Far below anything an attacker could use.
NORM_TOLERANCE = 1e-4


class Role(StrEnum):
    DEVICE = "device"
    GATEWAY = "gateway"


_TOPIC = {Role.DEVICE: TopicKind.UPDATE, Role.GATEWAY: TopicKind.PARTIAL}
_KINDS = {Role.DEVICE: (Kind.UPDATE, Kind.FAILURE), Role.GATEWAY: (Kind.PARTIAL, Kind.FAILURE)}


class Refused(UnexpectedMessage):
    """A well-formed, signed contribution that claims more than its sender may."""


@dataclass(frozen=True, slots=True)
class Peer:
    """A sender below a receiver in one round, as the fleet file and the schedule say.

    `devices`: the participating devices it stands for (1 for a device); `max_weight`:
    the most its contribution may weigh (a gateway: the sum over those devices).
    """

    id: str
    role: Role
    key: VerifyKey
    devices: int
    max_weight: float


@dataclass(frozen=True, slots=True)
class Terms:
    """What the open round accepts: from the signed schedule and the receiver's spec."""

    fleet: str
    run: int
    round: int
    model_version: int
    codec: CodecName  # the devices' codec
    spec: ModelSpec
    max_norm: float
    # Distributed DP: the standard deviation of the noise on one cohort's sum, per unit
    # weight (z * clip); honest contributions carry their share of it (0 otherwise).
    noise: float = 0.0
    partials: CodecName = CodecName.FLOAT32  # the gateways' codec
    density: float | None = None  # a sparse codec's share of entries kept

    @classmethod
    def of(cls, fleet: str, run: int, schedule: RoundSchedule, spec: ModelSpec) -> Terms:
        dp = schedule.dp
        noise = dp.sigma if dp is not None and dp.noise is Noise.DISTRIBUTED else 0.0
        return cls(
            fleet,
            run,
            schedule.round,
            schedule.model_version,
            schedule.codec,
            spec,
            schedule.bounds.max_norm,
            noise,
            schedule.partials,
            schedule.density,
        )

    def codec_of(self, role: Role) -> CodecName:
        """The codec a sender of `role` must use: the schedule's `codec` for a device's
        update, its `partials` for a gateway's partial."""
        return self.codec if role is Role.DEVICE else self.partials

    def norm_bound(self, count: int) -> float:
        """The largest mean-delta norm of a contribution of `count` devices: `max_norm`,
        plus, under distributed noise, what its noise can add: each device's share has
        norm at most noise * (sqrt(d) + 10) / sqrt(count) but with probability e^-50."""
        if not self.noise:
            return self.max_norm
        return self.max_norm + self.noise * (math.sqrt(self.spec.size) + 10) / math.sqrt(count)

    def caps(self, role: Role) -> Caps:
        partial = role is Role.GATEWAY
        return contribution_caps(
            self.spec, self.codec_of(role), partial=partial, density=self.density
        )


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one sender contributed to a round: an update (or partial), or a failure."""

    sender: str
    update: CheckedUpdate | None = None
    failure: Failure | None = None

    @property
    def failed(self) -> dict[str, int]:
        if self.failure is not None:
            return dict(self.failure.failed)
        return {} if self.update is None else dict(self.update.failed)


def weight_bound(fleet: Fleet, device: str, schedule: RoundSchedule) -> float:
    """The most a device's update may weigh: its own bound in the fleet file, else the
    schedule's default."""
    return float(fleet.max_weight.get(device, schedule.bounds.max_weight))


def peers_of(fleet: Fleet, receiver: str, schedule: RoundSchedule) -> dict[str, Peer]:
    """Who `receiver` (a gateway id, or ``coordinator``) waits for in `schedule`'s round:
    its own participating devices, and its child gateways with a participant below."""

    peers: dict[str, Peer] = {}
    entry = fleet.gateways.get(receiver)
    if entry is not None:
        for d in sorted(entry.devices):
            if schedule.takes_part(d):
                bound = weight_bound(fleet, d, schedule)
                peers[d] = Peer(d, Role.DEVICE, entry.devices[d], 1, bound)
    for child in fleet.children(receiver):
        below = [d for d in fleet.devices_below(child) if schedule.takes_part(d)]
        if below:
            bound = sum(weight_bound(fleet, d, schedule) for d in below)
            peers[child] = Peer(child, Role.GATEWAY, fleet.gateways[child].key, len(below), bound)
    return peers


def _refuse(reason: str, message: str) -> Refused:
    return Refused(message, reason)


def admit(data: bytes, topic: Topic, peer: Peer, terms: Terms) -> Contribution:
    """Open one contribution of `peer` that arrived on `topic`; a TernError with a
    reason (module docstring) when anything is wrong. `topic.sender` must be `peer.id`."""
    if topic.kind is not _TOPIC[peer.role] or topic.sender != peer.id:
        raise _refuse("wrong_topic", f"a {peer.role} sends on its own {_TOPIC[peer.role]} topic")
    env = open_envelope(
        data,
        {peer.id: peer.key},
        fleet=terms.fleet,
        kinds=_KINDS[peer.role],
        caps=terms.caps(peer.role),
        round=terms.round,
        run=terms.run,
        sender=peer.id,
    )
    if env.model_version != terms.model_version:
        raise _refuse(
            "wrong_model", f"made from model v{env.model_version}, the round is on another"
        )
    if env.kind is Kind.FAILURE:
        return Contribution(peer.id, failure=_admit_failure(env, peer))
    return Contribution(peer.id, update=_admit_update(env, peer, terms))


def admit_stage(data: bytes, topic: Topic, peer: Peer, cohort: Cohort) -> Contribution | Envelope:
    """Open one message of a member of `cohort` under secure aggregation: the topic as in
    `admit`, then the envelope as the protocol opens it (`tern.secagg.wire.open_member_message`:
    size and items within the cohort's caps of its kind, signature, fleet, run, round,
    model version), accepting a failure too (a member that could not train; it still
    helps unmask the others). A failure is checked here, a stage message's body by the
    protocol (`tern.secagg.server.SecAggServer.offer`), which gets the opened envelope."""
    if topic.kind is not _TOPIC[peer.role] or topic.sender != peer.id:
        raise _refuse("wrong_topic", f"a {peer.role} sends on its own {_TOPIC[peer.role]} topic")
    env = open_member_message(data, cohort, peer.id, failures=True)
    if env.kind is Kind.FAILURE:
        return Contribution(peer.id, failure=_admit_failure(env, peer))
    return env


def _admit_failure(env: Envelope, peer: Peer) -> Failure:
    failure = Failure.from_body(env.body)
    total = sum(failure.failed.values())
    if peer.role is Role.DEVICE and total != 1:
        raise _refuse("count_bound", "a device reports its own failure: a tally of one")
    if total > peer.devices:
        raise _refuse("count_bound", f"{total} failures where {peer.devices} devices take part")
    return failure


def _admit_update(env: Envelope, peer: Peer, terms: Terms) -> CheckedUpdate:
    update = Update.from_body(env.body)
    codec = terms.codec_of(peer.role)
    if update.codec != codec:
        raise _refuse("wrong_codec", f"a {peer.role}'s {update.codec} where {codec} is expected")
    failed = sum(update.failed.values())
    if peer.role is Role.DEVICE:
        if update.count != 1 or failed:
            raise _refuse("count_bound", "a device update counts one contributor, no failures")
    elif update.count + failed > peer.devices:
        raise _refuse(
            "count_bound",
            f"{update.count} contributors and {failed} failures where {peer.devices} take part",
        )
    if not update.count * MIN_WEIGHT <= update.weight <= peer.max_weight:
        raise _refuse(
            "weight_bound",
            f"weight {update.weight:.6g} outside [{update.count * MIN_WEIGHT:g}, "
            f"{peer.max_weight:g}] for {update.count} contributor(s)",
        )
    checked = update.check(terms.spec, density=terms.density)
    try:
        norm = math.sqrt(checked.sq_norm()) / update.weight
    except OverflowError:  # pragma: no cover - float64 holds any float32 tensor's norm
        norm = math.inf
    bound = terms.norm_bound(update.count)
    if not norm <= bound * (1 + NORM_TOLERANCE):
        raise _refuse("norm_bound", f"update norm {norm:.6g} above the bound {bound:.6g}")
    return checked
