"""The chunk layer's decoders bench.fuzz exercises (issue 13, big models in small messages).

- ``chunks.decode_manifest``: bytes on a subscribed topic that start like a manifest, at
  a receiver whose bound for the topic is a 1,000,000-parameter model's cap.
- ``chunks.Reassembler``: a chunk at a `tern.chunks.Reassembler` that is collecting the
  chunks of one manifest (a payload of three chunks of 8 KiB and a short fourth, the
  second chunk repeated). The input's first byte names the digest the chunk comes under
  (one of the manifest's parts by its low bits, or, with bit 7, the chunk's own SHA-256:
  a chunk nobody asked for), bit 6 first hands in the manifest's first chunk, and the rest
  is the chunk.
- ``chunks.Reassembler.manifest``: a manifest decoded from the input, offered to a
  reassembler already collecting another of the same sender and holding one of its chunks.

Seeds: the manifests of payloads of one to five chunks, with repeated chunks, at the
smallest chunk size and at 128 KiB; every chunk of the payload under its own and under
another's digest; the hostile CBOR shapes.

After every call (untimed, `Checked.after`): the bytes held never exceed those reserved,
nor those the budget allows; a payload handed out is exactly the one its manifest names
(its size and SHA-256); a refused chunk leaves every other reassembly as it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from bench.fuzz_secagg import Checked, Row
from bench.fuzz_seeds import cbor_hostile

__all__ = ["chunks_table"]

SENDER = "coordinator"
FROM_SELF, FIRST_IN = 0x80, 0x40  # the selector byte's bits


def chunks_table(resign: Callable[[bytes, Any], bytes]) -> list[Row]:
    """The rows bench.fuzz_targets adds: (name, seeds, prepare, errors)."""
    from tern.caps import model_caps
    from tern.chunks import MIN_CHUNK, Reassembler, decode_manifest, encode_manifest, split
    from tern.errors import TernError

    bound = model_caps(1_000_000).max_bytes

    def payload(n: int, seed: int) -> bytes:
        return hashlib.shake_256(bytes([seed])).digest(n)

    block = payload(MIN_CHUNK, 1)
    whole = payload(MIN_CHUNK, 0) + block + block + payload(100, 2)  # a repeated chunk
    manifest, chunks = split(whole, MIN_CHUNK, SENDER)
    other, other_chunks = split(payload(2 * MIN_CHUNK + 5, 3), MIN_CHUNK, SENDER)
    manifests = [encode_manifest(manifest), encode_manifest(other)]
    for n, size in ((1, MIN_CHUNK), (5, MIN_CHUNK), (3, 128 * 1024 - 512)):
        manifests.append(encode_manifest(split(payload(n * size - 7, n), size, SENDER)[0]))

    def check(r: Reassembler, done: list[Any]) -> None:
        if not r.held <= r.reserved <= r.budget:
            raise AssertionError(f"{r.held} bytes held, {r.reserved} reserved, {r.budget} budget")
        for d in done:
            m = d.manifest
            if len(d.payload) != m.size or hashlib.sha256(d.payload).digest() != m.sha256:
                raise AssertionError("a payload unlike its manifest was handed out")

    def collecting() -> Reassembler:
        r = Reassembler(max_pending=4, budget=1 << 20)
        r.offer_manifest("tern/f/model", manifest, retain=True)
        r.offer_manifest("tern/f/delta", other, retain=True)
        return r

    def chunk(data: bytes) -> Checked:
        selector = data[0] if data else 0
        body = data[1:]
        digest = (hashlib.sha256(body).digest() if selector & FROM_SELF
                  else manifest.parts[selector % len(manifest.parts)])  # fmt: skip
        r = collecting()
        done: list[Any] = []
        if selector & FIRST_IN:
            done += r.offer_chunk(SENDER, manifest.parts[0], chunks[0])
        before = {t: m for t, m in r.pending().items() if t != "tern/f/model"}

        def call() -> object:
            done.extend(r.offer_chunk(SENDER, digest, body))
            return done

        def after() -> None:
            check(r, done)
            if {t: m for t, m in r.pending().items() if t != "tern/f/model"} != before:
                raise AssertionError("a chunk of one reassembly changed another")
            if done and done[-1].payload != whole:
                raise AssertionError("a payload other than the sender's was reassembled")

        return Checked(call, after)

    def offered(data: bytes) -> Checked:
        r = collecting()
        r.offer_chunk(SENDER, other.parts[0], other_chunks[0])
        started: list[Any] = []

        def call() -> object:
            started.append(r.offer_manifest("tern/f/model", decode_manifest(data, bound), True))
            return started[-1]

        def after() -> None:
            check(r, [s.done for s in started if s.done is not None])
            if r.pending().get("tern/f/delta") != other:
                raise AssertionError("a manifest on one topic dropped another's reassembly")

        return Checked(call, after)

    chunk_seeds = [bytes([i]) + c for i in range(len(chunks)) for c in chunks]
    chunk_seeds += [bytes([FIRST_IN | i]) + chunks[i] for i in range(len(chunks))]
    chunk_seeds += [bytes([FROM_SELF]) + c for c in (*chunks, *other_chunks)]
    hostile = cbor_hostile()
    errors: tuple[type, ...] = (TernError,)

    def decoded(data: bytes) -> Callable[[], object]:
        return lambda: decode_manifest(data, bound)

    return [
        ("chunks.decode_manifest", [*manifests, *hostile], decoded, errors),
        ("chunks.Reassembler", chunk_seeds, chunk, errors),
        ("chunks.Reassembler.manifest", [*manifests, *hostile], offered, errors),
    ]  # fmt: skip
