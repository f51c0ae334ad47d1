"""Part c of bench.hostile: a gateway under secure aggregation (issue 12).

The receiver is the gateway's `SecAggRound` (its trust boundary, `admit_stage`, then
the protocol, `SecAggServer.offer`), for the cohort of bench.hostile's four devices on
the demo's model, open at the stage each class needs (a copy of a round run in this
process, `bench.secagg_session`, per message). For each stage, the time to accept the
attacker's valid message of that stage (offer alone: the smaller baseline); for each
class, the time to refuse it, and the ratio against its stage's acceptance. Then a
flood: at every stage, the attacker (a member that also sends its own valid messages)
sends hostile messages of every class around the honest members' messages; the round
must still close with exactly the sum of the four devices' contributions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from bench.fuzz_seeds import envelope_fields, envelope_with_body
from bench.hostile_classes import ATTACKER, DEVICES, FLEET, GATEWAY, LAYERS, RUN, flip_signature
from bench.hostile_costs import _timed
from bench.secagg_session import CohortWorld, Session, cohort_world
from kernels.reference import mlp_spec
from tern import topics
from tern.cbor import head
from tern.collect import MAX_ATTEMPTS, Outcome
from tern.envelope import Kind, open_envelope, seal
from tern.secagg.wire import member_caps

__all__ = ["STAGES", "SecAggClass", "secagg_classes", "secagg_costs", "secagg_flood", "world"]

STAGES = ("keys", "shares", "masked", "reveal")
ROUND = 5
STRANGER = "dev-99"


@dataclass(frozen=True)
class SecAggClass:
    """A hostile stage message: `make(i)` the i-th, refused at `stage` for `reason`."""

    name: str
    stage: str
    reason: str
    make: Callable[[int], bytes]
    topic: str = ATTACKER
    retained: bool = False
    history: str = ""  # "sent": the attacker's valid message of the stage is in; "spent"
    baseline: str = ""  # the stage whose valid message it is measured against (its size)

    @property
    def against(self) -> str:
        return self.baseline or self.stage


def world(seed: int = 0) -> CohortWorld:
    from bench.hostile_classes import demo_fleet

    _, keys = demo_fleet(seed)
    return cohort_world(FLEET, GATEWAY, DEVICES, mlp_spec(LAYERS), run=RUN, rnd=ROUND,
                        seed=seed, keys=keys)  # fmt: skip


def secagg_classes(w: CohortWorld) -> list[SecAggClass]:
    """Every class of the brief, made from the attacker's valid messages of a round."""
    done = Session(w)
    valid: dict[str, bytes] = {}
    for stage in STAGES:
        done.at_stage(stage)
        valid[stage] = done.up[ATTACKER]
    key, cohort = w.keys[ATTACKER], w.cohort
    opened = {
        s: open_envelope(d, cohort.keys, fleet=FLEET, kinds=tuple(Kind)) for s, d in valid.items()
    }
    union = max(c.max_bytes for c in member_caps(cohort).values())

    def resealed(stage: str, i: int, body: Any = None, **fields: Any) -> bytes:
        env = opened[stage]
        b = env.body if body is None else body
        if isinstance(b, dict) and stage == "keys" and body is None:  # each one different
            b = {**b, "c": (i.to_bytes(4, "big") + bytes(b["c"])[4:])}
        if isinstance(b, dict) and stage == "masked" and body is None:
            b = {**b, "data": i.to_bytes(4, "big") + bytes(b["data"])[4:]}
        return seal(replace(env, body=b, **fields), key)

    def body(stage: str, **changes: Any) -> dict[str, Any]:
        b = opened[stage].body
        assert isinstance(b, dict)
        return {**b, **changes}

    def framed(stage: str, i: int, raw: Callable[[int], bytes]) -> bytes:
        fields = envelope_fields(opened[stage])
        fields["sig"] = i.to_bytes(8, "big") * 8
        size = len(valid[stage])
        return envelope_with_body(
            {k: v for k, v in fields.items() if k != "body"} | {"sig": fields["sig"]},
            raw(size - 200),
            sig=False,
        )

    shares = body("shares")["to"]
    renamed = dict(list(shares.items())[1:]) | {STRANGER: next(iter(shares.values()))}
    reveal = body("reveal")
    first = next(iter(reveal["b"]))
    masked_data = body("masked")["data"]
    other_data = body("masked", data=masked_data[4:] + masked_data[:4])
    short_boxes = body("shares", to={k: v[:-1] for k, v in shares.items()})
    not_field = {**reveal, "b": {**reveal["b"], first: b"\xff" * len(reveal["b"][first])}}
    not_asked = {**reveal, "s": {first: reveal["b"][first]},
                 "b": {k: v for k, v in reveal["b"].items() if k != first}}  # fmt: skip
    m = "sa: "
    return [
        SecAggClass(m + "oversize (past the cohort's cap)", "masked", "oversize",
                    lambda i: b"\xa9" + bytes(union) + i.to_bytes(8, "big")),
        SecAggClass(m + "malformed CBOR: random bytes", "masked", "malformed",
                    lambda i: i.to_bytes(8, "big") + bytes(len(valid["masked"]))),
        SecAggClass(m + "malformed CBOR: deep nesting", "masked", "malformed",
                    lambda i: b"\x81" * 4000 + i.to_bytes(8, "big")),
        SecAggClass(m + "malformed CBOR: bignum body", "masked", "malformed",
                    lambda i: framed("masked", i, lambda n: b"\xc2" + head(2, n) + b"\xff" * n)),
        SecAggClass(m + "bad signature (sa_keys)", "keys", "bad_signature",
                    lambda i: flip_signature(resealed("keys", i))),
        SecAggClass(m + "bad signature (sa_masked)", "masked", "bad_signature",
                    lambda i: flip_signature(resealed("masked", i, other_data))),
        SecAggClass(m + "replayed from another round (sa_masked)", "masked", "stale_round",
                    lambda i: resealed("masked", i, round=ROUND - 1 - i % 2)),
        SecAggClass(m + "replayed from another run (sa_keys)", "keys", "stale_run",
                    lambda i: resealed("keys", i, run=RUN - 1)),
        SecAggClass(m + "out-of-order stage (sa_reveal at keys)", "keys", "out_of_order",
                    lambda i: valid["reveal"], baseline="reveal"),
        SecAggClass(m + "out-of-order stage (sa_masked at shares)", "shares", "out_of_order",
                    lambda i: valid["masked"], baseline="masked"),
        SecAggClass(m + "duplicate (a second, different sa_keys)", "keys", "duplicate",
                    lambda i: resealed("keys", i + 1), history="sent"),
        SecAggClass(m + "not addressed (shares for a non-neighbour)", "shares", "wrong_recipients",
                    lambda i: resealed("shares", i, body("shares", to=renamed))),
        SecAggClass(m + "gateway's kind sent up (sa_roster)", "shares", "wrong_kind",
                    lambda i: resealed("shares", i, kind=Kind.SA_ROSTER)),
        SecAggClass(m + "on another member's topic", "masked", "wrong_sender",
                    lambda i: valid["masked"], topic=DEVICES[1]),
        SecAggClass(m + "from outside the cohort", "masked", "unexpected_sender",
                    lambda i: valid["masked"], topic=STRANGER),
        SecAggClass(m + "wrong ring length (one element short)", "masked", "wrong_length",
                    lambda i: resealed("masked", i, body("masked", data=masked_data[:-1]))),
        SecAggClass(m + "wrong ring (bits + 1)", "masked", "wrong_ring",
                    lambda i: resealed("masked", i, body("masked", bits=cohort.bits + 1))),
        SecAggClass(m + "bad share ciphertext (short)", "shares", "malformed",
                    lambda i: resealed("shares", i, short_boxes)),
        SecAggClass(m + "bad share in a reveal (not a field element)", "reveal", "malformed",
                    lambda i: resealed("reveal", i, not_field)),
        SecAggClass(m + "reveal of a member not asked for", "reveal", "bad_reveal",
                    lambda i: resealed("reveal", i, not_asked)),
        SecAggClass(m + "key of small order", "keys", "bad_key",
                    lambda i: resealed("keys", i, {"c": bytes(32), "s": bytes(32)})),
        SecAggClass(m + "retained stage message", "masked", "retained",
                    lambda i: valid["masked"], retained=True),
        SecAggClass(m + "flood past the attempt budget", "masked", "rate_limited",
                    lambda i: resealed("masked", i, round=ROUND - 1), history="spent"),
    ]  # fmt: skip


def _prepared(base: Session, case: SecAggClass | None) -> Session:
    s = base.snapshot()
    if case is not None and case.history == "sent":
        s.deliver_up([ATTACKER])
    elif case is not None and case.history == "spent":
        for k in range(MAX_ATTEMPTS):
            s.round.offer(case.make(10_000 + k), s.world.topic(ATTACKER), retained=False)
    return s


def secagg_costs(w: CohortWorld, repeat: int, samples: int) -> dict[str, Any]:
    """µs to accept each stage's valid message and to refuse each class, and the ratio."""
    bases = {s: Session(w).at_stage(s) for s in STAGES}
    classes = secagg_classes(w)
    messages = {c.name: c.make(0) for c in classes}
    accept: dict[str, list[float]] = {s: [] for s in STAGES}
    refuse: dict[str, list[float]] = {c.name: [] for c in classes}
    reasons: dict[str, str] = {}

    def offer(s: Session, data: bytes, sender: str, retained: bool) -> Callable[[], str]:
        topic = topics.update(FLEET, GATEWAY, sender).path
        return lambda: s.round.offer(data, topic, retained=retained).reason

    for _ in range(repeat):
        times: dict[str, list[int]] = {k: [] for k in [*accept, *refuse]}
        for _ in range(samples):
            for stage, base in bases.items():
                s = _prepared(base, None)
                ns, reason = _timed(offer(s, base.up[ATTACKER], ATTACKER, False))
                if reason:
                    raise RuntimeError(f"a valid {stage} message was refused: {reason}")
                times[stage].append(ns)
            for c in classes:
                s = _prepared(bases[c.stage], c)
                ns, reasons[c.name] = _timed(offer(s, messages[c.name], c.topic, c.retained))
                times[c.name].append(ns)
        for key, ns_list in times.items():
            (accept if key in accept else refuse)[key].append(statistics.median(ns_list) / 1e3)
    base_us = {k: statistics.median(v) for k, v in accept.items()}
    out: dict[str, Any] = {
        "accept_us": {k: round(v, 2) for k, v in base_us.items()},
        "message_bytes": {k: len(b.up[ATTACKER]) for k, b in bases.items()},
        "bits": w.cohort.bits,
        "classes": {},
    }
    for c in classes:
        us = statistics.median(refuse[c.name])
        out["classes"][c.name] = {
            "refuse_us": round(us, 2), "ratio": round(us / base_us[c.against], 3),
            "reason": reasons[c.name], "expected": c.reason, "baseline": c.against,
            "bytes": len(messages[c.name]),
        }  # fmt: skip
    return out


def secagg_flood(w: CohortWorld, messages: int) -> dict[str, Any]:
    """`messages` hostile messages spread over the four stages, around the honest ones;
    does the round close with exactly the sum of the four devices' contributions?"""
    classes = secagg_classes(w)
    s = Session(w)
    per_stage = messages // len(STAGES)
    sent, i, t0 = 0, 0, time.perf_counter()
    honest_refused: list[str] = []
    while s.round.stage is not None:
        s.deliver_up([ATTACKER])  # the attacker is a member too: its own message first
        n = per_stage + (messages - per_stage * len(STAGES) if s.round.stage == "reveal" else 0)
        for k in range(n):
            if k == n // 2:
                s.deliver_up()  # the honest members, in the middle of the flood
            c = classes[i % len(classes)]
            topic = c.topic if c.topic != DEVICES[1] else ATTACKER  # its broker stops that
            s.round.offer(c.make(i), w.topic(topic), retained=c.retained)
            sent, i = sent + 1, i + 1
        s.deliver_up()
        honest_refused += [o.reason for o in s.offers if o.outcome is Outcome.REJECTED]
        s.close()
        s.deliver_down()
    seconds = time.perf_counter() - t0
    return {
        "sent": sent,
        "seconds": round(seconds, 3),
        "rejected": dict(sorted(s.round.rejected.items())),
        "counted": sum(s.round.rejected.values()),
        "honest_refused": honest_refused,
        "survivors": len(s.round.server.survivors),
        "honest_in_sum": set(DEVICES) - {ATTACKER} <= set(s.round.server.survivors),
        "exact_sum": s.exact,
        "failure": s.round.stages.failure,
    }
