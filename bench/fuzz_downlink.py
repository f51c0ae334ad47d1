"""The compressed downlink's decoders bench.fuzz exercises (issue 13), at a receiver.

- ``follow.on_delta``: bytes on ``tern/{fleet}/delta`` at dev-1's `ModelFollower`
  (parent gw-1), its trust boundary for the coordinator's deltas. The input's first byte
  picks the follower's state: bit 0, it holds v0 and v1 (else v0 only: the coordinator's
  full model, then the ternary delta to v1); bit 1, it took a schedule naming the hash of
  the version after its latest; bit 2, it holds nothing yet (bit 0 ignored). `/signed`
  re-signs the rest with the coordinator's key (a stolen key is out of scope, but the
  decoder behind the signature must still raise only TernError).
- ``follow.on_full``: bytes on ``tern/{fleet}/model`` at the same follower, its state
  picked the same way (bit 1: a schedule naming the hash of the version a full model
  would bring). `/signed` re-signs with gw-1's key: a compromised parent gateway.
- ``body.ModelDelta``: `CheckedDelta.from_body` on CBOR decoded under generous caps,
  then applied to v0 (a checked delta must be safe to use).

Seeds: deltas sealed by the coordinator in every codec (ternary, float16, float32,
sparse) from v0 and from v1, one lying about its hash, one naming another base, one of an
older run, one sealed by the gateway; full models sealed by the coordinator, by gw-1 (the
true v1 and v2, and a v1 unlike the signed hash), by another gateway and by a device; a
schedule; the hostile CBOR shapes as the body of a delta's envelope (of gw-1's full
model's, for ``follow.on_full``); unsigned for `/signed`.

After every call (untimed, `Checked.after`): a refusal leaves the held models, their
bytes and hashes, and the feed's marks as they were, and is counted once as
``delta_<reason>`` / ``model_<reason>``; after an acceptance every held model hashes to
its recorded hash, no more than two are held and the model mark is not behind them. For
full models, the follower never holds a model whose hash differs from the coordinator's
signed hash for that version, and holds a model the gateway sealed only for a version
such a hash names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from bench.fuzz_secagg import Checked, Row
from bench.fuzz_seeds import cbor_hostile, envelope_fields, envelope_with_body

__all__ = ["downlink_table"]

FLEET = "fuzz-down"
RUN = 1_764_000_000_000
PARENT = "gw-1"
IDS = ("coordinator", PARENT, "gw-2", "dev-1", "dev-2")
HOLDS_V1, NAMES_NEXT, EMPTY = 1, 2, 4  # the selector byte's bits


def downlink_table(resign: Callable[[bytes, Any], bytes]) -> list[Row]:
    """The rows bench.fuzz_targets adds: (name, seeds, prepare, errors)."""
    import numpy as np
    from nacl.signing import SigningKey

    from kernels.reference import init_weights, mlp_spec
    from tern.cbor import Caps, decode
    from tern.codecs import (
        Codec,
        CodecName,
        Float16Codec,
        Float32Codec,
        SparseTernaryCodec,
        TernaryCodec,
    )
    from tern.downlink import CheckedDelta, ModelDelta, compress, model_hash
    from tern.envelope import Envelope, Kind, canonical, open_envelope, seal
    from tern.errors import TernError
    from tern.feed import CoordinatorFeed
    from tern.fleet import COORDINATOR, Fleet, GatewayEntry
    from tern.freshness import Stamp
    from tern.messages import GlobalModel, RoundSchedule
    from tern.rounds.events import Link
    from tern.rounds.follow import Adopted, ModelFollower

    keys = {i: SigningKey(hashlib.sha256(b"downlink:" + i.encode()).digest()) for i in IDS}
    vk = {i: k.verify_key for i, k in keys.items()}
    fleet = Fleet(FLEET, vk[COORDINATOR], {
        PARENT: GatewayEntry(vk[PARENT], COORDINATOR, {"dev-1": vk["dev-1"]}),
        "gw-2": GatewayEntry(vk["gw-2"], COORDINATOR, {"dev-2": vk["dev-2"]}),
    }, max_params=4096)  # fmt: skip
    spec = mlp_spec((8, 6, 3))  # small: mutations land on structure, not on weight bytes
    rng = np.random.default_rng(13)
    v0 = GlobalModel(spec, init_weights(spec, rng))

    def step(held: GlobalModel, codec: Codec, base: int) -> tuple[ModelDelta, GlobalModel]:
        target = held.weights + rng.normal(scale=0.05, size=spec.size).astype(np.float32)
        c = compress(codec, held, base, target.astype(np.float32), None)
        return c.delta, c.model

    def sealed(kind: Kind, version: int, body: object, sender: str = COORDINATOR,
               run: int = RUN) -> bytes:  # fmt: skip
        env = Envelope(kind, FLEET, version, version, sender, body, run=run)
        return seal(env, keys[sender])

    def full(version: int, model: GlobalModel, sender: str = COORDINATOR) -> bytes:
        return sealed(Kind.MODEL, version, model.to_body(), sender)

    codecs: list[Codec] = [TernaryCodec(), Float16Codec(), Float32Codec(),
                           SparseTernaryCodec(0.25)]  # fmt: skip
    d1, v1 = step(v0, codecs[0], 0)
    d2, v2 = step(v1, codecs[0], 1)
    other = GlobalModel(spec, init_weights(spec, rng))
    hashes = {0: model_hash(spec, v0.weights), 1: d1.hash, 2: d2.hash}
    deltas = [d1, d2]
    for codec in codecs[1:]:
        deltas += [step(v0, codec, 0)[0], step(v1, codec, 1)[0]]
    sealed_deltas = [sealed(Kind.MODEL_DELTA, d.base + 1, d.to_body()) for d in deltas]
    lying = ModelDelta(d2.base, d2.base_hash, bytes(32), d2.codec, d2.tensors)
    elsewhere = ModelDelta(d2.base, model_hash(spec, other.weights), d2.hash, d2.codec,
                           d2.tensors)  # fmt: skip
    sealed_deltas += [
        sealed(Kind.MODEL_DELTA, 2, lying.to_body()),
        sealed(Kind.MODEL_DELTA, 2, elsewhere.to_body()),
        sealed(Kind.MODEL_DELTA, 1, d1.to_body(), run=RUN - 1),
        sealed(Kind.MODEL_DELTA, 2, d2.to_body(), sender=PARENT),
    ]
    schedule = RoundSchedule(2, 2, CodecName.TERNARY, 1e12, 1, model_hash=hashes[2])
    fulls = [
        full(0, v0), full(1, v1), full(2, v2),
        full(1, v1, PARENT), full(2, v2, PARENT), full(1, other, PARENT), full(2, other, PARENT),
        full(1, v1, "gw-2"), full(1, v1, "dev-1"),
    ]  # fmt: skip
    others = [sealed(Kind.SCHEDULE, 2, schedule.to_body())]
    hostile = cbor_hostile()
    everyone = {i: k.verify_key for i, k in keys.items()}
    opened = {d: open_envelope(d, everyone, fleet=FLEET, kinds=tuple(Kind))
              for d in (sealed_deltas[0], fulls[3])}  # fmt: skip
    around = envelope_fields(opened[sealed_deltas[0]])
    around_full = envelope_fields(opened[fulls[3]])

    def unsigned(data: bytes) -> bytes:
        env = open_envelope(data, everyone, fleet=FLEET, kinds=tuple(Kind))
        return canonical(envelope_fields(env))

    def named(state: int) -> dict[Stamp, bytes]:
        """The coordinator-signed hashes the follower in `state` was given."""
        latest = -1 if state & EMPTY else 1 if state & HOLDS_V1 else 0
        out = {Stamp(RUN, v): hashes[v] for v in range(latest + 1)}
        if state & NAMES_NEXT and latest + 1 in hashes:
            out[Stamp(RUN, latest + 1)] = hashes[latest + 1]
        return out

    def follower(state: int) -> ModelFollower:
        f = ModelFollower(CoordinatorFeed(fleet), PARENT, Link.DOWN)
        if not state & EMPTY:
            f.on_full(full(0, v0))
            if state & HOLDS_V1:
                f.on_delta(sealed_deltas[0])
        for stamp, digest in named(state).items():
            f.on_schedule(stamp.run, RoundSchedule(stamp.version, stamp.version,
                                                   CodecName.TERNARY, 1e12, 1,
                                                   model_hash=digest))  # fmt: skip
        f.feed.rejected.clear()
        return f

    def held_state(f: ModelFollower) -> tuple[object, ...]:
        models = tuple((s, d, m.spec, m.weights.tobytes()) for s, (m, d) in sorted(f.held.items()))
        return models, f.feed.marks

    def consistent(f: ModelFollower) -> None:
        for stamp, (model, digest) in f.held.items():
            if model_hash(model.spec, model.weights) != digest:
                raise AssertionError(f"held v{stamp.version} does not hash to its hash")
        mark = f.feed.marks.model
        if len(f.held) > 2 or (f.held and (mark is None or max(f.held) > mark)):
            raise AssertionError("more than two models held, or the mark behind them")

    def follow(method: str, signer: str | None) -> Callable[[bytes], Checked]:
        prefix = "delta" if method == "on_delta" else "model"

        def prepare(data: bytes) -> Checked:
            state = data[0] if data else 0
            payload = data[1:] if signer is None else resign(data[1:], keys[signer])
            f = follower(state)
            before = held_state(f)
            got: list[list[Adopted]] = []

            def call() -> object:
                if method == "on_delta":
                    got.append(f.on_delta(payload)[1])
                else:
                    got.append(f.on_full(payload))
                return got[-1]

            def after() -> None:
                if not got:  # refused (a TernError: anything else was a crash already)
                    counts = {k: n for k, n in f.feed.rejected.items() if n}
                    if len(counts) != 1 or sum(counts.values()) != 1:
                        raise AssertionError(f"a refusal was not counted once: {counts}")
                    if not next(iter(counts)).startswith(prefix + "_"):
                        raise AssertionError(f"a refusal counted as {counts}")
                    if held_state(f) != before:
                        raise AssertionError("a refused message changed the models held")
                    return
                consistent(f)
                if method == "on_full":
                    signed = named(state)
                    for stamp, (_, digest) in f.held.items():
                        if stamp in signed and signed[stamp] != digest:
                            raise AssertionError(f"v{stamp.version} unlike its signed hash")
                    for a in got[-1]:
                        if a.envelope.sender != COORDINATOR and signed.get(a.stamp) != a.hash:
                            raise AssertionError("took a gateway's model no signed hash names")

            return Checked(call, after)

        return prepare

    states = (0, HOLDS_V1, NAMES_NEXT, HOLDS_V1 | NAMES_NEXT, EMPTY)
    delta_msgs = [*sealed_deltas, fulls[1], *others]
    delta_seeds = [bytes([s]) + d for s in states for d in delta_msgs]
    delta_seeds += [bytes([s]) + envelope_with_body(around, b, sig=True)
                    for s in (0, HOLDS_V1) for b in hostile]  # fmt: skip
    delta_unsigned = [bytes([s]) + unsigned(d) for s in states[:2] for d in delta_msgs]
    delta_unsigned += [b"\0" + envelope_with_body(around, b, sig=False) for b in hostile]
    full_msgs = [*fulls, sealed_deltas[0], *others]
    full_seeds = [bytes([s]) + d for s in states for d in full_msgs]
    full_seeds += [b"\2" + envelope_with_body(around_full, b, sig=True) for b in hostile]
    full_unsigned = [bytes([s]) + unsigned(d) for s in states for d in full_msgs]
    full_unsigned += [b"\2" + envelope_with_body(around_full, b, sig=False) for b in hostile]

    body_caps = Caps(1 << 16, 1 << 13)
    bodies = [canonical(d.to_body()) for d in [*deltas, lying, elsewhere]]

    def body(data: bytes) -> Callable[[], object]:
        return lambda: CheckedDelta.from_body(decode(data, body_caps), spec).apply(v0)

    errors: tuple[type, ...] = (TernError,)
    return [
        ("follow.on_delta", delta_seeds, follow("on_delta", None), errors),
        ("follow.on_delta/signed", delta_unsigned, follow("on_delta", COORDINATOR), errors),
        ("follow.on_full", full_seeds, follow("on_full", None), errors),
        ("follow.on_full/signed", full_unsigned, follow("on_full", PARENT), errors),
        ("body.ModelDelta", [*bodies, *hostile], body, errors),
    ]
