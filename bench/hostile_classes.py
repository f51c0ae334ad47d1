"""The attack classes of bench.hostile: the fleet, the round, and valid and hostile messages.

`Scenario` holds one gateway's fleet and its open round (the demo's model,
`mlp_spec((40, 100, 100, 10))`), makes valid models, schedules and device updates, and
builds every attack class of issue 9 at the size of a valid device update (about 3.4 KB):
malformed CBOR of every hostile shape, oversize, bad signatures, a device claiming a
partial, weights and norms past the bounds, NaN, wrong shapes, stale rounds and runs,
another device's topic, retained contributions, duplicates, floods past the attempt
budget, and replayed, old-run and forged models and schedules (a replayed schedule
also with a policy this build cannot run); and for the gateway's view of its members
(tern.fleetview), hostile statuses from a device and hostile views from a child gateway.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
from nacl.signing import SigningKey

from kernels.reference import init_weights, mlp_spec
from tern.admit import Role, Terms
from tern.aggregate import Partial
from tern.cbor import head
from tern.codecs import CodecName, TernaryCodec
from tern.envelope import Envelope, Kind, canonical, seal
from tern.fleet import COORDINATOR, Fleet, GatewayEntry
from tern.messages import (
    GlobalModel,
    Policy,
    RoundSchedule,
    StrategySpec,
    TrainConfig,
    encode_update,
)
from tern.reports import (
    MAX_STATUS_BYTES,
    MAX_VIEW_MEMBERS,
    Activity,
    FleetView,
    MemberView,
    State,
    Status,
    ViewState,
)
from tern.reports import Role as MemberRole
from tern.spec import ModelSpec

__all__ = [
    "ATTACKER",
    "CHILD",
    "DEVICES",
    "FLEET",
    "GATEWAY",
    "RUN",
    "AttackClass",
    "Receiver",
    "Scenario",
    "demo_fleet",
    "flip_signature",
]

FLEET = "hostile"
GATEWAY = "gw-1"
DEVICES = ("dev-01", "dev-02", "dev-03", "dev-04")
ATTACKER = "dev-01"
CHILD = "gw-1a"  # a child gateway of GATEWAY with no devices: it sends views
LAYERS = (40, 100, 100, 10)
RUN = 1_764_000_000_000
WEIGHT = 300.0  # an honest device's samples (the demo's hold 145-708)
NORM = 4.0  # an honest update's norm per unit weight (the demo's: 2.9-6.6)

DEFAULT_POLICY = Policy()
# "update" (a Collector), "model" or "schedule" (a CoordinatorFeed), "status" (from a
# device) or "view" (from a child gateway) (a tern.fleetview.ViewMachine)
Receiver = str


@dataclass(frozen=True)
class AttackClass:
    """One kind of hostile message: `make(i)` is the i-th one (each different)."""

    name: str
    receiver: Receiver
    reason: str  # the refusal reason expected
    make: Callable[[int], bytes]
    topic: str = ATTACKER  # the topic's sender (a device id, CHILD for a view)
    retained: bool = False
    history: str = ""  # "accepted": an update of the sender is in; "spent": its budget is


class Scenario:
    """The fleet, the round and the valid and hostile messages both parts send."""

    def __init__(self, keys: dict[str, SigningKey], fleet: Fleet, seed: int = 0) -> None:
        self.keys, self.fleet = keys, fleet
        self.spec: ModelSpec = mlp_spec(LAYERS)
        self.rng = np.random.default_rng(seed)
        self.round = 5
        self.schedule = self.make_schedule(self.round, time.time() + 3600)
        self.honest = self.update_body()
        self.size = len(self.update(0))

    # -- valid messages ---------------------------------------------------------------

    def make_schedule(
        self,
        rnd: int,
        deadline: float,
        participants: Sequence[str] | None = None,
        *,
        policy: Policy = DEFAULT_POLICY,
    ) -> RoundSchedule:
        return RoundSchedule(
            round=rnd,
            model_version=rnd,
            codec=CodecName.TERNARY,
            deadline=deadline,
            min_contributors=1,
            participants=None if participants is None else tuple(sorted(participants)),
            seed=rnd,
            train=TrainConfig(),
            policy=policy,
        )  # the demo's default bounds (--max-weight 10000, --max-norm 20)

    def model(self, version: int, *, key: SigningKey | None = None, run: int = RUN) -> bytes:
        weights = init_weights(self.spec, np.random.default_rng(version))
        body = GlobalModel(self.spec, weights).to_body()
        env = Envelope(Kind.MODEL, FLEET, version, version, COORDINATOR, body, run=run)
        return seal(env, key or self.keys[COORDINATOR])

    def schedule_message(self, schedule: RoundSchedule, *, run: int = RUN) -> bytes:
        env = Envelope(
            Kind.SCHEDULE,
            FLEET,
            schedule.round,
            schedule.model_version,
            COORDINATOR,
            schedule.to_body(),
            run=run,
        )
        return seal(env, self.keys[COORDINATOR])

    def update_body(self, scale: float = 1.0) -> dict[str, Any]:
        d = self.rng.standard_normal(self.spec.size).astype(np.float32)
        d = (d / np.linalg.norm(d) * NORM * WEIGHT * scale).astype(np.float32)
        update, _ = encode_update(TernaryCodec(), self.spec, Partial(d, WEIGHT, 1))
        body: dict[str, Any] = update.to_body()
        return body

    def update(
        self,
        i: int,
        body: dict[str, Any] | None = None,
        *,
        sender: str = ATTACKER,
        rnd: int | None = None,
        **fields: Any,
    ) -> bytes:
        """A sealed update of `sender`, the i-th: its last tensor's scale grows by i * 1e-12
        (relative), so that no two are the same bytes; `fields` replace envelope fields."""
        b = dict(self.honest if body is None else body)
        tensors = [dict(t) for t in b["tensors"]]
        tensors[-1]["scale"] = float(tensors[-1]["scale"]) * (1 + i * 1e-12)
        b["tensors"] = tensors
        r = self.round if rnd is None else rnd
        env = Envelope(Kind.UPDATE, FLEET, r, r, sender, b, run=RUN)
        return seal(replace(env, **fields), self.keys[sender])

    # -- hostile messages -------------------------------------------------------------

    def framed(self, i: int, bomb: Callable[[int], bytes]) -> bytes:
        """The attacker's envelope, `i` in its signature bytes, whose body is a valid body
        but for its tensors: `bomb(n)`, raw CBOR of about n bytes, sized so the message is
        as large as a valid update. The decoder walks all the rest before it meets it."""
        fields: dict[str, object] = {
            "v": 2,
            "kind": "update",
            "fleet": FLEET,
            "run": RUN,
            "round": self.round,
            "model": self.round,
            "sender": ATTACKER,
            "sig": i.to_bytes(8, "big") * 8,
        }
        marker = canonical("tensors") + canonical(0)
        body = canonical({**self.honest, "tensors": 0})
        entries = [(canonical(k), canonical(v)) for k, v in fields.items()]
        entries.append((canonical("body"), body))
        entries.sort(key=lambda e: (len(e[0]), e[0]))
        empty = head(5, len(entries)) + b"".join(k + v for k, v in entries)
        raw = bomb(max(16, self.size - len(empty)))
        return empty.replace(marker, canonical("tensors") + raw, 1)

    def classes(self) -> list[AttackClass]:
        """Every attack class of issue 9, each built at the size of a valid update."""
        size, rng_seed = self.size, 1234
        cap = Terms.of(FLEET, RUN, self.schedule, self.spec).caps(Role.DEVICE).max_bytes

        def bignum(n: int) -> bytes:
            return b"\xc2" + head(2, n) + b"\xff" * n

        def edited(**changes: Any) -> dict[str, Any]:
            return {**self.honest, **changes}

        def tensor0(**changes: Any) -> dict[str, Any]:
            tensors = [dict(t) for t in self.honest["tensors"]]
            tensors[0].update(changes)
            return edited(tensors=tensors)

        partial_body = edited(count=1000, weight=WEIGHT * 1000)
        f = self.framed
        return [
            AttackClass("random bytes", "update", "malformed",
                        lambda i: np.random.default_rng([rng_seed, i]).bytes(size)),
            AttackClass("shared references (tags 28/29)", "update", "malformed",
                        lambda i: f(i, lambda n: b"\xd8\x1c" + head(4, n // 3)
                                    + b"\xd8\x1d\x00" * (n // 3))),
            AttackClass("decimal fraction (tag 4), huge mantissa", "update", "malformed",
                        lambda i: f(i, lambda n: b"\xc4\x82\x3a\x7f\xff\xff\xff" + bignum(n))),
            AttackClass("bigfloat (tag 5), huge mantissa", "update", "malformed",
                        lambda i: f(i, lambda n: b"\xc5\x82\x1b\x7f" + b"\xff" * 7 + bignum(n))),
            AttackClass("rational (tag 30), huge parts", "update", "malformed",
                        lambda i: f(i, lambda n: b"\xd8\x1e\x82" + bignum(n // 2) * 2)),
            AttackClass("bignum (tag 2)", "update", "malformed", lambda i: f(i, bignum)),
            AttackClass("deep nesting", "update", "malformed",
                        lambda i: b"\x81" * (size - 8) + i.to_bytes(8, "big")),
            AttackClass("huge declared length", "update", "malformed",
                        lambda i: f(i, lambda n: b"\x5b\x7f" + b"\xff" * 7 + bytes(n))),
            AttackClass("oversize (past the cap)", "update", "oversize",
                        lambda i: b"\xa9" + bytes(cap) + i.to_bytes(8, "big")),
            AttackClass("unknown tag", "update", "malformed",
                        lambda i: f(i, lambda n: b"\xd9\x03\xe8" + head(2, n) + bytes(n))),
            AttackClass("indefinite length", "update", "malformed",
                        lambda i: f(i, lambda n: b"\x9f" + b"\x01" * n + b"\xff")),
            AttackClass("bad signature", "update", "bad_signature",
                        lambda i: flip_signature(self.update(i))),
            AttackClass("device signs kind=partial, count 1000", "update", "wrong_kind",
                        lambda i: self.update(i, partial_body, kind=Kind.PARTIAL)),
            AttackClass("weight 1e30", "update", "weight_bound",
                        lambda i: self.update(i, edited(weight=1e30))),
            AttackClass("weight 5e-324", "update", "weight_bound",
                        lambda i: self.update(i, edited(weight=5e-324))),
            AttackClass("update scaled by 100 (norm)", "update", "norm_bound",
                        lambda i: self.update(i, self.scaled)),
            AttackClass("NaN tensor", "update", "non_finite",
                        lambda i: self.update(i, tensor0(scale=math.nan))),
            AttackClass("wrong shape", "update", "wrong_shape",
                        lambda i: self.update(i, tensor0(shape=[LAYERS[1], LAYERS[0]]))),
            AttackClass("stale round (replay)", "update", "stale_round",
                        lambda i: self.update(i, rnd=self.round - 1)),
            AttackClass("wrong run", "update", "stale_run",
                        lambda i: self.update(i, run=RUN - 1)),
            AttackClass("on another device's topic", "update", "wrong_sender",
                        lambda i: self.update(i), topic=DEVICES[1]),
            AttackClass("retained contribution", "update", "retained",
                        lambda i: self.update(i), retained=True),
            AttackClass("duplicate (sender settled)", "update", "duplicate",
                        lambda i: self.update(i + 1), history="accepted"),
            AttackClass("flood past the attempt budget", "update", "rate_limited",
                        lambda i: self.update(i), history="spent"),
            AttackClass("replayed old model", "model", "stale", lambda i: self.old_model),
            AttackClass("model of an old run", "model", "stale", lambda i: self.old_run_model),
            AttackClass("forged model", "model", "bad_signature", lambda i: self.forged_model),
            AttackClass("replayed old schedule", "schedule", "stale",
                        lambda i: self.old_schedule),
            AttackClass("replayed old schedule naming another policy", "schedule", "stale",
                        lambda i: self.old_policy_schedule),
            *self.view_classes(),
        ]  # fmt: skip

    def status(self, i: int, member: str = ATTACKER, role: str = "device", **extra: Any) -> bytes:
        """A device's status, `i` in its version (each different)."""
        status = Status(member, role, State.ONLINE, f"0.1.{i}", "", Activity.IDLE, self.round)
        doc = {**json.loads(status.to_json()), **extra}
        return json.dumps(doc, separators=(",", ":")).encode()

    def view(self, i: int, members: int = 0, role: MemberRole = MemberRole.BOARD) -> bytes:
        """CHILD's view, `i` in its time, listing `members` boards (or other roles)."""
        listed = {f"esp-{k:03d}": MemberView(role, ViewState.ONLINE) for k in range(members)}
        return FleetView(CHILD, GATEWAY, 1.7e9 + i, self.round, listed).to_json()

    def too_many(self, i: int) -> bytes:
        """CHILD's view listing one board more than a view may (to_json would cut it)."""
        doc = json.loads(self.view(i))
        doc["members"] = {f"esp-{k:03d}": {"role": "board", "state": "online"}
                          for k in range(MAX_VIEW_MEMBERS + 1)}  # fmt: skip
        return json.dumps(doc, separators=(",", ":")).encode()

    def view_classes(self) -> list[AttackClass]:
        """Hostile statuses (a device, on its own status topic) and views (CHILD)."""
        big = MAX_STATUS_BYTES
        return [
            AttackClass("status: random bytes", "status", "malformed",
                        lambda i: np.random.default_rng([77, i]).bytes(300)),
            AttackClass("status: past its cap", "status", "oversize",
                        lambda i: self.status(i, detail="x" * big)),
            AttackClass("status: deep nesting", "status", "malformed",
                        lambda i: b"[" * 2000 + str(i).encode()),
            AttackClass("status: another device's id", "status", "wrong_id",
                        lambda i: self.status(i, DEVICES[1])),
            AttackClass("status: a device says it is a gateway", "status", "wrong_role",
                        lambda i: self.status(i, role="gateway")),
            AttackClass("status: last_error past 200 characters", "status", "malformed",
                        lambda i: self.status(i, last_error="e" * 300)),
            AttackClass("view: lists another gateway's device", "view", "wrong_member",
                        lambda i: self.view(i, 1, MemberRole.DEVICE).replace(b"esp-0", b"dev-0")),
            AttackClass("view: too many members", "view", "malformed",
                        lambda i: self.too_many(i)),
            AttackClass("view: of another gateway", "view", "wrong_id",
                        lambda i: self.view(i).replace(CHILD.encode(), GATEWAY.encode(), 1)),
        ]  # fmt: skip

    @cached_property
    def scaled(self) -> dict[str, Any]:
        return self.update_body(scale=100.0)

    @cached_property
    def old_model(self) -> bytes:
        return self.model(self.round - 1)

    @cached_property
    def old_run_model(self) -> bytes:
        return self.model(self.round + 3, run=RUN - 1)

    @cached_property
    def forged_model(self) -> bytes:
        return self.model(self.round + 1, key=SigningKey(bytes(32)))

    @cached_property
    def old_schedule(self) -> bytes:
        old = self.make_schedule(self.round - 1, self.schedule.deadline - 60)
        return self.schedule_message(old)

    @cached_property
    def old_policy_schedule(self) -> bytes:
        """An old round's schedule whose policy this build cannot run: refused as stale
        before anyone looks at its policy."""
        policy = Policy(cohort="median", strategy=StrategySpec.of("fedadam", lr=0.05))
        old = self.make_schedule(self.round - 2, self.schedule.deadline - 120, policy=policy)
        return self.schedule_message(old)


def flip_signature(data: bytes) -> bytes:
    """`data` with one bit of its signature flipped."""
    at = data.index(b"\x63sig\x58\x40") + 6
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def demo_fleet(seed: int = 0) -> tuple[Fleet, dict[str, SigningKey]]:
    """One gateway and its four devices, keys from `seed` (part a needs no files)."""
    rng = np.random.default_rng(seed)
    keys = {i: SigningKey(rng.bytes(32)) for i in (COORDINATOR, GATEWAY, *DEVICES)}
    entry = GatewayEntry(
        keys[GATEWAY].verify_key, COORDINATOR, {d: keys[d].verify_key for d in DEVICES}
    )
    keys[CHILD] = SigningKey(rng.bytes(32))  # after the others: their keys stay as they were
    child = GatewayEntry(keys[CHILD].verify_key, GATEWAY, {})
    return Fleet(FLEET, keys[COORDINATOR].verify_key, {GATEWAY: entry, CHILD: child}), keys
