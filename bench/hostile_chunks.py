"""What refusing a hostile chunked message costs its receiver, and a flood of them (issue 13).

The receiver is a gateway's `broker.chunking.ChunkedTransport` (the real decorator, on the
in-memory bus, broker.memory) subscribed to its devices' updates, with the bounds a
gateway runs: 128 KiB messages, reassemblies within the model cap of a
1,000,000-parameter fleet, at most 8 pending, a 64 MiB budget, a 30 s timeout on an
injected clock. The attacker is a device (dev-01) that publishes what its broker rights
allow: on its own update topic and its own chunk topics. Each class is set up outside the
timing (its chunks retained, its manifest queued); the time is that of delivering what is
queued to the receiver (the manifest, the chunk subscriptions it makes and the retained
chunks they bring), against delivering a valid chunked update of a 1,000,000-parameter
model in ternary (202,368 bytes: 2 chunks), measured in the same run: the median of
`samples` messages, one of each in turn, then the median of `repeat` repeats, the garbage
collector paused. Every refusal must carry its named reason, be counted once
(``chunk_<reason>``), and leave the receiver able to take the next valid update whole.

The flood: the attacker sends `messages` hostile messages of every class in turn while
four honest devices send chunked updates; every honest update must arrive exactly, and
the bytes the receiver holds never exceed its budget.

    python -m bench.hostile_chunks [--repeat N] [--samples N] [--messages N] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.hostile_costs import _timed
from broker.chunking import ChunkedTransport
from broker.memory import MemoryBus, MemoryTransport
from broker.transport import Message
from tern import topics
from tern.caps import model_caps
from tern.chunks import MIN_CHUNK, Manifest, encode_manifest, split

__all__ = [
    "CLASSES",
    "ChunkClass",
    "ChunkWorld",
    "chunk_costs",
    "chunk_flood",
    "chunks_part",
    "main",
]

FLEET = "hostile-chunks"
GATEWAY = "gw-1"
ATTACKER = "dev-01"
HONEST = ("dev-02", "dev-03", "dev-04", "dev-05")
LIMIT = 128 * 1024
BOUND = model_caps(1_000_000).max_bytes  # what a gateway accepts on an update topic
UPDATE = 202_368  # a 1,000,000-parameter ternary update (tests/test_big_model.py)
PENDING, BUDGET, TIMEOUT = 8, 64 << 20, 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _payload(n: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(n)


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class ChunkWorld:
    """One receiver on a fresh bus, the attacker's raw client, and what arrived."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.bus = MemoryBus()
        self.receiver = ChunkedTransport(
            self.bus.transport(GATEWAY), fleet=FLEET, sender=GATEWAY, max_message=LIMIT,
            limit=lambda topic: BOUND, max_pending=PENDING, budget=BUDGET, timeout=TIMEOUT,
            clock=self.clock,
        )  # fmt: skip
        self.receiver.connect()
        self.got: list[Message] = []
        self.receiver.subscribe(topics.updates_to(FLEET, GATEWAY), self.got.append)
        self.raw: dict[str, MemoryTransport] = {}

    def client(self, member: str) -> MemoryTransport:
        """`member`'s raw client: it publishes bytes as they are (no chunking)."""
        if member not in self.raw:
            self.raw[member] = self.bus.transport(member).connect()
        return self.raw[member]

    def chunk(self, member: str, digest: bytes, data: bytes) -> None:
        self.client(member).publish(topics.chunk(FLEET, member, digest.hex()), data, retain=True)

    def manifest(self, member: str, data: bytes) -> None:
        self.client(member).publish(topics.update(FLEET, GATEWAY, member), data)

    def valid(self, member: str, seed: int) -> bytes:
        """`member`'s valid chunked update, queued; its payload."""
        data = _payload(UPDATE, seed)
        m, chunks = split(data, LIMIT - 512, member)
        for digest, c in zip(m.parts, chunks, strict=True):
            self.chunk(member, digest, c)
        self.manifest(member, encode_manifest(m))
        return data


@dataclass(frozen=True)
class ChunkClass:
    """A hostile chunked message: `setup(world)` queues it (untimed), refused for `reason`."""

    name: str
    reason: str
    setup: Callable[[ChunkWorld], None]
    before: Callable[[ChunkWorld], None] | None = None  # untimed, delivered before


def _manifest(size: int, parts: Sequence[bytes], sender: str = ATTACKER) -> bytes:
    return encode_manifest(Manifest(_sha(b"whole"), size, tuple(parts), sender))


def _malformed(w: ChunkWorld) -> None:
    w.manifest(ATTACKER, encode_manifest(Manifest(bytes(32), 9, (bytes(32),), ATTACKER))[:-4]
               + b"\xff\xff\xff\xff")  # fmt: skip


def _too_many_parts(w: ChunkWorld) -> None:
    w.manifest(ATTACKER, _manifest(2 * MIN_CHUNK, [_sha(bytes([i])) for i in range(3)]))


def _not_shortest(w: ChunkWorld) -> None:
    raw = _manifest(UPDATE, [_sha(b"a"), _sha(b"b")])
    at = raw.index(b"size") + 4  # the size as an eight-byte head, not its shortest four
    w.manifest(ATTACKER, raw[:at] + b"\x1b" + UPDATE.to_bytes(8, "big") + raw[at + 5 :])


def _oversize(w: ChunkWorld) -> None:
    w.manifest(ATTACKER, _manifest(BOUND + 1, [_sha(b"a")]))


def _other_sender(w: ChunkWorld) -> None:
    m, _ = split(_payload(UPDATE, 1), LIMIT - 512, HONEST[0])
    w.manifest(ATTACKER, encode_manifest(m))


def _bad_chunk(w: ChunkWorld) -> None:
    m, chunks = split(_payload(UPDATE, 2), LIMIT - 512, ATTACKER)
    w.chunk(ATTACKER, m.parts[0], chunks[1])  # bytes that are not the digest's
    w.manifest(ATTACKER, encode_manifest(m))


def _chunks_too_big(w: ChunkWorld) -> None:
    big = _payload(LIMIT - 512, 3)
    w.chunk(ATTACKER, _sha(big), big)
    w.manifest(ATTACKER, _manifest(MIN_CHUNK, [_sha(big)]))


def _lying(w: ChunkWorld) -> None:
    m, chunks = split(_payload(UPDATE, 4), LIMIT - 512, ATTACKER)
    for digest, c in zip(m.parts, chunks, strict=True):
        w.chunk(ATTACKER, digest, c)
    w.manifest(ATTACKER, _manifest(m.size, m.parts))


def _fill(w: ChunkWorld) -> None:
    """Every slot taken by honest devices' updates whose chunks have not come yet."""
    for i in range(PENDING):
        member = f"dev-{10 + i}"
        m, _ = split(_payload(UPDATE, 100 + i), LIMIT - 512, member)
        w.manifest(member, encode_manifest(m))
    w.bus.deliver()


def _busy(w: ChunkWorld) -> None:
    m, _ = split(_payload(UPDATE, 5), LIMIT - 512, ATTACKER)
    w.manifest(ATTACKER, encode_manifest(m))


def _stalled(w: ChunkWorld) -> None:
    m, _ = split(_payload(UPDATE, 6), LIMIT - 512, ATTACKER)
    w.manifest(ATTACKER, encode_manifest(m))  # its chunks never come
    w.bus.deliver()
    w.clock.now += TIMEOUT


def _expiry(w: ChunkWorld) -> None:
    w.manifest(ATTACKER, b"an update that is not chunked")  # what comes next expires it


CLASSES = (
    ChunkClass("malformed manifest (truncated, trailing bytes)", "chunk_malformed", _malformed),
    ChunkClass("manifest of more parts than its size needs", "chunk_malformed", _too_many_parts),
    ChunkClass("manifest not in its one encoding (long head)", "chunk_malformed", _not_shortest),
    ChunkClass("manifest above the topic's bound (model cap + 1)", "chunk_oversize", _oversize),
    ChunkClass("manifest naming another device as its sender", "chunk_sender", _other_sender),
    ChunkClass("chunk whose bytes are not its digest's", "chunk_digest", _bad_chunk),
    ChunkClass("chunks adding to more than the manifest's size", "chunk_oversize", _chunks_too_big),
    ChunkClass("manifest lying about the whole's SHA-256", "chunk_mismatch", _lying),
    ChunkClass("manifest while every reassembly slot is taken", "chunk_busy", _busy, _fill),
    ChunkClass("reassembly whose chunks never come (timeout)", "chunk_timeout", _expiry, _stalled),
)


def _deliver(w: ChunkWorld) -> Callable[[], str]:
    def call() -> str:
        before = w.receiver.rejected()
        w.bus.deliver()
        new = w.receiver.rejected() - before
        return ",".join(sorted(new.elements()))

    return call


def chunk_costs(repeat: int, samples: int) -> dict[str, Any]:
    """µs to take a valid chunked update and to refuse each class, the ratio, and whether
    each refusal was counted once and left the receiver able to take a valid update."""
    accept: list[float] = []
    refuse: dict[str, list[float]] = {c.name: [] for c in CLASSES}
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(repeat):
        times: dict[str, list[int]] = {"valid": [], **{c.name: [] for c in CLASSES}}
        for i in range(samples):
            w = ChunkWorld()
            data = w.valid(HONEST[0], i)
            ns, reason = _timed(_deliver(w))
            if reason or [m.payload for m in w.got] != [data]:
                raise RuntimeError(f"a valid chunked update was not taken whole: {reason}")
            times["valid"].append(ns)
            for c in CLASSES:
                w = ChunkWorld()
                if c.before is not None:
                    c.before(w)
                c.setup(w)
                ns, reason = _timed(_deliver(w))
                times[c.name].append(ns)
                w.clock.now += TIMEOUT  # what the class left pending times out
                after = w.valid(HONEST[1], i)
                w.bus.deliver()
                taken = bool(w.got) and w.got[-1].payload == after
                seen[c.name] = {"reason": reason, "taken_after": taken}
        accept.append(statistics.median(times["valid"]) / 1e3)
        for name in refuse:
            refuse[name].append(statistics.median(times[name]) / 1e3)
    base = statistics.median(accept)
    out: dict[str, Any] = {"accept_us": round(base, 2), "message_bytes": UPDATE, "classes": {}}
    for c in CLASSES:
        us = statistics.median(refuse[c.name])
        s = seen[c.name]
        out["classes"][c.name] = {
            "refuse_us": round(us, 2), "ratio": round(us / base, 3), "reason": s["reason"],
            "expected": c.reason, "counted": s["reason"] == c.reason,
            "taken_after": s["taken_after"],
        }  # fmt: skip
    return out


def chunk_flood(messages: int, every: int = 50) -> dict[str, Any]:
    """`messages` hostile messages of every class in turn from the attacker, an honest
    chunked update from one of four devices after every `every` of them."""
    w = ChunkWorld()
    honest: list[bytes] = []
    biggest = 0
    started = time.perf_counter()
    for i in range(messages):
        c = CLASSES[i % len(CLASSES)]
        if c.before is _fill:  # the attacker cannot fill the slots: others' updates would
            _busy(w)
        elif c.before is _stalled:
            _stalled(w)
            _expiry(w)
        else:
            c.setup(w)
        w.bus.deliver()
        biggest = max(biggest, w.receiver._reassembler.reserved)
        if i % every == every - 1:
            honest.append(w.valid(HONEST[len(honest) % len(HONEST)], 1000 + len(honest)))
            w.bus.deliver()
    seconds = time.perf_counter() - started
    got = [m.payload for m in w.got if len(m.payload) == UPDATE]
    counted = w.receiver.rejected()
    return {
        "sent": messages, "seconds": round(seconds, 3), "honest": len(honest),
        "honest_whole": got == honest, "counted": sum(counted.values()),
        "rejected": dict(counted), "max_reserved": biggest, "budget": BUDGET,
    }  # fmt: skip


def chunks_part(repeat: int, samples: int, messages: int) -> dict[str, Any]:
    """Measure, print the table and the flood's line, and return them (bench.hostile's
    part e, and this module's main)."""
    # every refusal is counted; its log line (one per topic, reason and minute in a
    # process) is not what is measured
    logging.getLogger("broker.chunking").setLevel(logging.CRITICAL)
    result = chunk_costs(repeat, samples)
    print(f"\npart e: chunked messages at a gateway (bench.hostile_chunks), accept a valid"
          f" {UPDATE:,}-byte update in 2 chunks: {result['accept_us']:.1f} µs")  # fmt: skip
    head = f"{'attack class':<52} {'refuse µs':>10} {'ratio':>6}  reason"
    print(head)
    print("-" * len(head))
    for name, r in sorted(result["classes"].items(), key=lambda kv: kv[1]["ratio"]):
        mark = "" if r["counted"] else f" (expected {r['expected']})"
        mark += "" if r["taken_after"] else " (the next valid update was NOT taken)"
        print(f"{name:<52} {r['refuse_us']:>10.1f} {r['ratio']:>6.2f}  {r['reason']}{mark}")
    worst = max(r["ratio"] for r in result["classes"].values())
    met = "met" if worst <= 1 else "MISSED"
    print(f"target: ratio <= 1: worst {worst:.2f} ({met}; a manifest lying about the whole's"
          " SHA-256 is found only by hashing the whole)")  # fmt: skip
    flood = chunk_flood(messages)
    result["flood"] = flood
    print(
        f"flood: {flood['sent']:,} hostile messages in {flood['seconds']:.2f} s, "
        f"{flood['counted']:,} refusals counted {flood['rejected']}; {flood['honest']} honest "
        f"updates {'all arrived whole' if flood['honest_whole'] else 'NOT all arrived whole'};"
        f" at most {flood['max_reserved']:,} bytes reserved (budget {flood['budget']:,})"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=5, help="repeats (median)")
    ap.add_argument("--samples", type=int, default=50, help="messages per class and repeat")
    ap.add_argument("--messages", type=int, default=2000, help="hostile messages in the flood")
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    result = chunks_part(args.repeat, args.samples, args.messages)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
