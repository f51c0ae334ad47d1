"""The secure-aggregation decoders bench.fuzz exercises (issue 12), at both receivers.

- ``secagg.round.<stage>``: bytes on a member's update topic at the gateway's
  `SecAggRound.offer` (its trust boundary, `tern.admit.admit_stage`, then
  `SecAggServer.offer`), the round open at that stage. The input's first byte picks the
  sender (bits 0-1, of four members), whether the sender's own valid message of the stage
  went in first (bit 2), the partial topic instead of the update topic (bit 3), retained
  (bit 7). `/signed` re-signs the rest with the sender's key (a compromised member).
- ``secagg.member.<kind>``: bytes to dev-1's inbox, opened by `open_server_message` and
  taken by its `SecAggClient`, the client waiting for the gateway's `kind`. `/signed`
  re-signs with the gateway's key (a compromised gateway).
- ``body.sa_<kind>``: each body's `from_body`, on CBOR decoded under generous caps.

Seeds: every message of a whole round run in this process (`bench.secagg_session`),
signed or with ``sig`` removed, the hostile CBOR shapes as their bodies, and each body.
After the call, a refused input (or one the receiver had already taken) must leave the
receiver able to finish the round with exactly the survivors' sum: checked on every
`FOLLOW_EVERY`-th input (by its digest) and on every input a receiver took.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from bench.fuzz_seeds import cbor_hostile, envelope_fields, envelope_with_body

__all__ = ["FOLLOW_EVERY", "Checked", "secagg_table"]

FOLLOW_EVERY = 8
MEMBERS = ("dev-1", "dev-2", "dev-3", "dev-4")
GATEWAY_STAGES = ("keys", "shares", "masked", "reveal")
MEMBER_WAITS = {"roster": "keys", "inbox": "shares", "survivors": "masked"}  # closed before

Row = tuple[str, Sequence[bytes], Callable[[bytes], Callable[[], object]], tuple[type, ...]]


class Checked:
    """One call to time, and `after()`: what must still hold once it returned or raised
    (run outside the timing by `bench.fuzz_targets.run_one`)."""

    def __init__(self, call: Callable[[], object], after: Callable[[], None]) -> None:
        self._call, self._after = call, after

    def __call__(self) -> object:
        return self._call()

    def after(self) -> None:
        self._after()


def _sampled(data: bytes) -> bool:
    return hashlib.blake2b(data, digest_size=1).digest()[0] % FOLLOW_EVERY == 0


def secagg_table(resign: Callable[[bytes, Any], bytes]) -> list[Row]:
    """The rows bench.fuzz_targets adds: (name, seeds, prepare, errors)."""
    from bench.secagg_session import Session, cohort_world
    from kernels.reference import mlp_spec
    from tern.cbor import Caps, decode
    from tern.collect import Outcome
    from tern.envelope import Kind, canonical, open_envelope
    from tern.secagg import open_server_message
    from tern.secagg.bodies import (
        InboxBody,
        KeysBody,
        MaskedBody,
        RevealBody,
        RosterBody,
        SharesBody,
        SurvivorsBody,
    )
    from tern.topics import partial as partial_topic

    world = cohort_world("fuzz", "gw-1", MEMBERS, mlp_spec((8, 6, 3)), run=1_764_000_000_000,
                         rnd=3, seed=7)  # fmt: skip
    cohort, keys = world.cohort, world.keys
    ups: list[tuple[str, bytes]] = []  # (member, sealed) of every member message
    downs: list[bytes] = []  # every gateway message
    recorder = Session(world)
    while recorder.round.stage is not None:
        ups += sorted(recorder.up.items())
        recorder.deliver_up()
        recorder.close()
        downs += [d for _, d in sorted(recorder.down.items())]
        recorder.deliver_down()
    assert recorder.exact, "the fuzz world's round does not close exactly"
    everyone = {**cohort.keys, cohort.server: cohort.server_key}

    def unsigned(sealed: bytes) -> bytes:
        env = open_envelope(sealed, everyone, fleet=cohort.fleet, kinds=tuple(Kind))
        return canonical(envelope_fields(env))

    hostile = cbor_hostile()
    around_up = envelope_fields(
        open_envelope(ups[-1][1], everyone, fleet=cohort.fleet, kinds=tuple(Kind))
    )
    around_down = envelope_fields(
        open_envelope(downs[-1], everyone, fleet=cohort.fleet, kinds=tuple(Kind))
    )
    index = {m: i for i, m in enumerate(MEMBERS)}
    up_seeds = [bytes([index[m] | 4 * (k % 2)]) + d for k, (m, d) in enumerate(ups)]
    up_seeds += [b"\3" + envelope_with_body(around_up, b, sig=True) for b in hostile]
    up_unsigned = [bytes([index[m]]) + unsigned(d) for m, d in ups]
    up_unsigned += [b"\3" + envelope_with_body(around_up, b, sig=False) for b in hostile]
    down_seeds = [*downs, *(envelope_with_body(around_down, b, sig=True) for b in hostile)]
    down_unsigned = [unsigned(d) for d in downs]
    down_unsigned += [envelope_with_body(around_down, b, sig=False) for b in hostile]

    gateway_at = {s: Session(world).at_stage(s) for s in GATEWAY_STAGES}
    member_at = {k: Session(world).awaiting(s) for k, s in MEMBER_WAITS.items()}

    def gateway_call(stage: str, signed: bool) -> Callable[[bytes], Checked]:
        def prepare(data: bytes) -> Checked:
            selector = data[0] if data else 0
            sender = MEMBERS[selector & 3]
            payload = resign(data[1:], keys[sender]) if signed else data[1:]
            session = gateway_at[stage].snapshot()
            if selector & 4:
                session.deliver_up([sender])
            topic = (partial_topic(cohort.fleet, cohort.server, sender).path if selector & 8
                     else world.topic(sender))  # fmt: skip
            got: list[Any] = []

            def call() -> object:
                offer = session.round.offer(payload, topic, retained=selector >= 0x80)
                got.append(offer)
                return offer

            def after() -> None:
                offer = got[0]
                if offer.outcome is Outcome.REJECTED and not offer.reason:
                    raise AssertionError("a refused stage message has no reason")
                took = offer.outcome in (Outcome.ACCEPTED, Outcome.FAILED)
                if not (took or _sampled(data)):
                    return
                session.finish()
                if session.round.stage is not None:
                    raise AssertionError("the round did not run to its end")
                if not took and not session.exact:
                    raise AssertionError(
                        f"after a refused message ({offer.reason}) the round did not close "
                        f"with the exact sum ({session.round.stages.failure or 'wrong sum'})"
                    )

            return Checked(call, after)

        return prepare

    def member_call(kind: str, signed: bool) -> Callable[[bytes], Checked]:
        def prepare(data: bytes) -> Checked:
            payload = resign(data, keys[cohort.server]) if signed else data
            session = member_at[kind].snapshot()
            client = session.clients[MEMBERS[0]]
            before = client.stage

            def call() -> object:
                return client.take(open_server_message(payload, cohort, MEMBERS[0]))

            def after() -> None:
                took = client.stage != before  # it took a new message: the rest may differ
                if took or not (_sampled(data) or payload in downs):
                    return
                session.finish()
                if not session.exact or session.refused:
                    raise AssertionError(
                        f"after refusing a message, a member did not finish its round "
                        f"({session.round.stages.failure or session.refused or 'wrong sum'})"
                    )

            return Checked(call, after)

        return prepare

    k = len(MEMBERS) - 1
    decoders: dict[str, Callable[[object], object]] = {
        "body.sa_keys": KeysBody.from_body,
        "body.sa_roster": lambda b: RosterBody.from_body(b, k),
        "body.sa_shares": lambda b: SharesBody.from_body(b, k),
        "body.sa_inbox": lambda b: InboxBody.from_body(b, k),
        "body.sa_masked": lambda b: MaskedBody.from_body(b, cohort.length, cohort.bits),
        "body.sa_survivors": lambda b: SurvivorsBody.from_body(b, k + 1),
        "body.sa_reveal": lambda b: RevealBody.from_body(b, k + 1),
    }
    bodies = [
        canonical(open_envelope(d, everyone, fleet=cohort.fleet, kinds=tuple(Kind)).body)
        for d in [*(d for _, d in ups), *downs]
    ]
    body_caps = Caps(1 << 16, 1 << 13)

    def body(decoder: Callable[[object], object]) -> Callable[[bytes], Callable[[], object]]:
        return lambda data: lambda: decoder(decode(data, body_caps))

    rows: list[Row] = []
    for stage in GATEWAY_STAGES:
        rows.append((f"secagg.round.{stage}", up_seeds, gateway_call(stage, False), ()))
        rows.append((f"secagg.round.{stage}/signed", up_unsigned, gateway_call(stage, True), ()))
    for kind in MEMBER_WAITS:
        rows.append((f"secagg.member.{kind}", down_seeds, member_call(kind, False), ()))
        rows.append((f"secagg.member.{kind}/signed", down_unsigned, member_call(kind, True), ()))
    for name, decoder in decoders.items():
        rows.append((name, [*bodies, *hostile], body(decoder), ()))
    return rows
