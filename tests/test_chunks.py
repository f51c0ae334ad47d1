"""Big messages in chunks: the pure layer (tern.chunks) and the transport that speaks it
(broker.chunking) on the in-memory bus; the 1,000,000-parameter round over brokers
limited to 128 KiB is in tests/test_big_model.py."""

from __future__ import annotations

import hashlib
from contextlib import ExitStack

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.chunking import ChunkedTransport, packet_bytes
from broker.memory import MemoryBus
from broker.transport import Message
from tern import topics
from tern.chunks import (
    CHUNK_REASONS,
    MIN_CHUNK,
    ChunkRefused,
    Manifest,
    Reassembler,
    decode_manifest,
    encode_manifest,
    is_manifest,
    manifest_caps,
    split,
)
from tests.fleet_fixtures import FleetRig, build_fleet
from tests.gateway_helpers import ONE, WAIT
from tests.gateway_helpers import Coordinator as StandIn
from tests.helpers import wait_until
from tests.mqtt_fixtures import AmqttBroker, MakeTransport

F = "plant-7"
LIMIT = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def payload(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(n)


def digest_of(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- the manifest ------------------------------------------------------------------------


def test_manifest_round_trips_and_starts_with_its_marker() -> None:
    m, chunks = split(payload(3 * MIN_CHUNK + 5), MIN_CHUNK, "gw-1")
    data = encode_manifest(m)
    assert is_manifest(data) and decode_manifest(data, LIMIT) == m
    assert len(m.parts) == len(chunks) == 4 and m.size == 3 * MIN_CHUNK + 5
    assert len(data) <= manifest_caps(LIMIT).max_bytes


@given(st.binary(min_size=1, max_size=6 * MIN_CHUNK), st.integers(MIN_CHUNK, 3 * MIN_CHUNK))
@settings(max_examples=40, deadline=None)
def test_split_then_reassemble_in_any_order_gives_the_payload(data: bytes, size: int) -> None:
    m, chunks = split(data, size, "dev-1")
    r = Reassembler()
    r.offer_manifest("t", decode_manifest(encode_manifest(m), LIMIT), retain=True)
    done = []
    for c in reversed(chunks):
        done += r.offer_chunk("dev-1", digest_of(c), c)
    assert [d.payload for d in done] == [data] and done[0].retain
    assert r.held == 0 and r.pending() == {}


@given(st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_mutation_of_a_manifest_is_refused_with_a_reason(data: st.DataObject) -> None:
    m, _ = split(payload(5 * MIN_CHUNK), MIN_CHUNK, "dev-1")
    raw = bytearray(encode_manifest(m))
    i = data.draw(st.integers(0, len(raw) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[i]))
    raw[i] = new
    try:
        got = decode_manifest(bytes(raw), LIMIT)
    except ChunkRefused as exc:
        assert exc.reason in CHUNK_REASONS
    else:  # only the bytes of a digest or of the sender's id may change and stay valid
        assert got != m and encode_manifest(got) == bytes(raw)


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_any_bytes_are_a_manifest_or_refused_with_a_reason(data: bytes) -> None:
    try:
        decode_manifest(data, LIMIT)
    except ChunkRefused as exc:
        assert exc.reason in CHUNK_REASONS


def test_manifest_of_more_parts_than_its_size_needs_is_refused() -> None:
    parts = tuple(digest_of(bytes([i])) for i in range(3))
    m = Manifest(digest_of(b"x"), 2 * MIN_CHUNK, parts, "dev-1")
    with pytest.raises(ChunkRefused) as exc:
        decode_manifest(encode_manifest(m), LIMIT)
    assert exc.value.reason == "chunk_malformed"


def test_manifest_larger_than_the_topic_bound_is_refused_as_oversize() -> None:
    m, _ = split(payload(4 * MIN_CHUNK), MIN_CHUNK, "dev-1")
    with pytest.raises(ChunkRefused) as exc:
        decode_manifest(encode_manifest(m), 3 * MIN_CHUNK)
    assert exc.value.reason == "chunk_oversize"


def test_manifest_not_in_its_one_encoding_is_refused() -> None:
    m, _ = split(payload(MIN_CHUNK + 1), MIN_CHUNK, "dev-1")
    raw = encode_manifest(m)
    size_at = raw.index(b"size") + 4
    # the size 8193 as a four-byte head instead of its shortest (two-byte) form
    longer = raw[:size_at] + b"\x1a" + (MIN_CHUNK + 1).to_bytes(4, "big") + raw[size_at + 3 :]
    with pytest.raises(ChunkRefused) as exc:
        decode_manifest(longer, LIMIT)
    assert exc.value.reason == "chunk_malformed"


# -- the reassembler -----------------------------------------------------------------------


def test_a_chunk_whose_bytes_are_not_its_digest_is_refused_and_the_rest_still_completes() -> None:
    data = payload(3 * MIN_CHUNK)
    m, chunks = split(data, MIN_CHUNK, "dev-1")
    r = Reassembler()
    r.offer_manifest("t", m, retain=False)
    with pytest.raises(ChunkRefused) as exc:
        r.offer_chunk("dev-1", m.parts[0], chunks[1])
    assert exc.value.reason == "chunk_digest"
    assert r.offer_chunk("dev-2", m.parts[0], chunks[0]) == []  # another sender's: ignored
    done = [d for c in chunks for d in r.offer_chunk("dev-1", digest_of(c), c)]
    assert [d.payload for d in done] == [data]


def test_chunks_adding_up_to_more_than_the_manifest_size_drop_the_reassembly() -> None:
    big, small = payload(2 * MIN_CHUNK, 1), payload(MIN_CHUNK, 2)
    m = Manifest(digest_of(small), MIN_CHUNK + 10, (digest_of(big), digest_of(small)), "d")
    r = Reassembler()
    r.offer_manifest("t", m, retain=False)
    with pytest.raises(ChunkRefused) as exc:
        r.offer_chunk("d", digest_of(big), big)
    assert exc.value.reason == "chunk_oversize" and r.pending() == {} and r.held == 0


def test_a_lying_manifest_is_refused_as_a_mismatch_once_every_chunk_is_in() -> None:
    data = payload(2 * MIN_CHUNK)
    m, chunks = split(data, MIN_CHUNK, "d")
    lying = Manifest(digest_of(b"other"), m.size, m.parts, "d")
    r = Reassembler()
    r.offer_manifest("t", lying, retain=False)
    r.offer_chunk("d", m.parts[0], chunks[0])
    with pytest.raises(ChunkRefused) as exc:
        r.offer_chunk("d", m.parts[1], chunks[1])
    assert exc.value.reason == "chunk_mismatch" and r.pending() == {}


def test_one_reassembly_per_topic_a_newer_manifest_replaces_the_older() -> None:
    r = Reassembler()
    old, _ = split(payload(2 * MIN_CHUNK, 1), MIN_CHUNK, "d")
    new, _ = split(payload(2 * MIN_CHUNK, 2), MIN_CHUNK, "d")
    r.offer_manifest("t", old, retain=True)
    started = r.offer_manifest("t", new, retain=True)
    assert started.replaced == old and r.pending() == {"t": new}
    assert r.offer_manifest("t", new, retain=True).again


def test_reassemblies_beyond_max_pending_or_the_budget_are_refused_as_busy() -> None:
    r = Reassembler(max_pending=2, budget=5 * MIN_CHUNK)
    ms = [split(payload(2 * MIN_CHUNK, i), MIN_CHUNK, "d")[0] for i in range(3)]
    r.offer_manifest("a", ms[0], retain=False)
    r.offer_manifest("b", ms[1], retain=False)
    with pytest.raises(ChunkRefused) as exc:
        r.offer_manifest("c", ms[2], retain=False)
    assert exc.value.reason == "chunk_busy"
    r.drop("b")
    big, _ = split(payload(4 * MIN_CHUNK), MIN_CHUNK, "d")
    with pytest.raises(ChunkRefused) as exc:
        r.offer_manifest("c", big, retain=False)  # 2 + 4 chunks reserved > 5
    assert exc.value.reason == "chunk_busy"
    huge, _ = split(payload(6 * MIN_CHUNK), MIN_CHUNK, "d")
    with pytest.raises(ChunkRefused) as exc:
        r.offer_manifest("c", huge, retain=False)
    assert exc.value.reason == "chunk_oversize"


def test_a_reassembly_not_complete_within_the_timeout_is_dropped() -> None:
    clock = Clock()
    r = Reassembler(timeout=30.0, clock=clock)
    m, chunks = split(payload(2 * MIN_CHUNK), MIN_CHUNK, "d")
    r.offer_manifest("t", m, retain=False)
    r.offer_chunk("d", m.parts[0], chunks[0])
    clock.now = 29.0
    assert r.expire() == []
    clock.now = 30.0
    assert r.expire() == [("t", m)] and r.held == 0


def test_a_payload_with_repeated_chunks_is_kept_once_and_reassembled() -> None:
    data = bytes(4 * MIN_CHUNK)  # four identical chunks: one digest
    m, chunks = split(data, MIN_CHUNK, "d")
    assert len(set(m.parts)) == 1
    r = Reassembler()
    r.offer_manifest("t", m, retain=False)
    assert r.held == 0
    done = r.offer_chunk("d", m.parts[0], chunks[0])
    assert [d.payload for d in done] == [data]


@given(
    st.lists(
        st.tuples(st.sampled_from("abcd"), st.integers(1, 4), st.integers(0, 9)),
        min_size=1,
        max_size=30,
    )
)
@settings(max_examples=60, deadline=None)
def test_chunks_held_never_exceed_the_budget(steps: list[tuple[str, int, int]]) -> None:
    budget = 6 * MIN_CHUNK
    r = Reassembler(max_pending=3, budget=budget)
    chunks_of: dict[bytes, bytes] = {}
    for topic, n, seed in steps:
        m, chunks = split(payload(n * MIN_CHUNK, seed), MIN_CHUNK, "d")
        chunks_of.update(zip(m.parts, chunks, strict=True))
        try:
            r.offer_manifest(topic, m, retain=False)
        except ChunkRefused as exc:
            assert exc.reason in ("chunk_busy", "chunk_oversize")
        for digest in list(chunks_of)[seed % 3 :: 2]:
            r.offer_chunk("d", digest, chunks_of[digest])
        assert r.held <= r.reserved <= budget


# -- the transport on the in-memory bus ------------------------------------------------------


def chunked(bus: MemoryBus, who: str, max_message: int | None = 64 * 1024) -> ChunkedTransport:
    t = ChunkedTransport(bus.transport(who), fleet=F, sender=who, max_message=max_message,
                         limit=lambda topic: LIMIT)  # fmt: skip
    t.connect()
    return t


def test_a_big_retained_message_reaches_a_late_subscriber_whole() -> None:
    bus = MemoryBus()
    sender, receiver = chunked(bus, "coordinator"), chunked(bus, "gw-1")
    data = payload(300_000)
    sender.publish(topics.global_model(F), data, retain=True)
    got: list[Message] = []
    receiver.subscribe(topics.global_model(F), got.append)
    bus.deliver()
    assert got == [Message(topics.global_model(F).path, data, True)]
    assert receiver.reassembled == 1 and sender.chunked == 1
    assert max(len(m) for m in _retained(bus)) <= 64 * 1024
    assert receiver.inner._subs.keys() == {topics.global_model(F).path}  # type: ignore[attr-defined]


def test_small_messages_and_foreign_payloads_pass_through_unchanged() -> None:
    bus = MemoryBus()
    sender, receiver = chunked(bus, "coordinator"), chunked(bus, "gw-1")
    got: list[Message] = []
    receiver.subscribe(topics.round_schedule(F), got.append)
    sender.publish(topics.round_schedule(F), b"small", retain=False)
    bus.deliver()
    assert got == [Message(topics.round_schedule(F).path, b"small", False)]
    assert sender.chunked == 0 and bus.published == 1


def test_a_new_chunked_message_clears_the_chunks_of_the_one_before() -> None:
    bus = MemoryBus()
    sender = chunked(bus, "coordinator")
    sender.publish(topics.global_model(F), payload(200_000, 1), retain=True)
    first = {t for t in bus._retained if "/chunk/" in t}
    sender.publish(topics.global_model(F), payload(200_000, 2), retain=True)
    second = {t for t in bus._retained if "/chunk/" in t}
    assert first and second and not first & second
    sender.publish(topics.global_model(F), b"small again", retain=True)
    assert not [t for t in bus._retained if "/chunk/" in t]


def test_a_malformed_manifest_and_a_bad_chunk_are_counted_and_the_receiver_keeps_going() -> None:
    bus = MemoryBus()
    sender, receiver = chunked(bus, "coordinator"), chunked(bus, "gw-1")
    got: list[Message] = []
    receiver.subscribe(topics.global_model(F), got.append)
    raw = bus.transport("coordinator-raw")
    raw.connect()
    raw.publish(topics.global_model(F), encode_manifest_bad(), retain=False)
    m, chunks = split(payload(3 * MIN_CHUNK), MIN_CHUNK, "coordinator")
    raw.publish(topics.chunk(F, "coordinator", m.parts[0].hex()), chunks[1], retain=True)
    raw.publish(topics.global_model(F), encode_manifest(m), retain=False)
    bus.deliver()
    assert receiver.rejected() == {"chunk_malformed": 1, "chunk_digest": 1}
    data = payload(200_000)
    sender.publish(topics.global_model(F), data, retain=False)
    bus.deliver()
    assert got[-1].payload == data


def test_a_manifest_naming_another_sender_than_its_topic_is_refused() -> None:
    bus = MemoryBus()
    receiver = chunked(bus, "gw-1")
    receiver.subscribe(topics.updates_to(F, "gw-1"), lambda m: None)
    m, _ = split(payload(2 * MIN_CHUNK), MIN_CHUNK, "dev-2")
    raw = bus.transport("dev-1")
    raw.connect()
    raw.publish(topics.update(F, "gw-1", "dev-1"), encode_manifest(m))
    bus.deliver()
    assert receiver.rejected() == {"chunk_sender": 1}


def test_unsubscribing_drops_its_reassemblies_and_their_chunk_subscriptions() -> None:
    bus = MemoryBus()
    receiver = chunked(bus, "gw-1")
    receiver.subscribe(topics.global_model(F), lambda m: None)
    m, _ = split(payload(3 * MIN_CHUNK), MIN_CHUNK, "coordinator")
    raw = bus.transport("coordinator")
    raw.connect()
    raw.publish(topics.global_model(F), encode_manifest(m))
    bus.deliver()
    assert len(receiver.inner._subs) == 4  # type: ignore[attr-defined]
    receiver.unsubscribe(topics.global_model(F))
    assert receiver.inner._subs == {}  # type: ignore[attr-defined]


def test_a_reassembly_whose_chunks_never_come_times_out_and_stops_listening_for_them() -> None:
    bus, clock = MemoryBus(), Clock()
    receiver = ChunkedTransport(bus.transport("gw-1"), fleet=F, sender="gw-1", max_message=None,
                                limit=lambda topic: LIMIT, timeout=5.0, clock=clock)  # fmt: skip
    receiver.connect()
    got: list[Message] = []
    receiver.subscribe(topics.updates_to(F, "gw-1"), got.append)
    raw = bus.transport("dev-1")
    raw.connect()
    m, _ = split(payload(2 * MIN_CHUNK), MIN_CHUNK, "dev-1")
    raw.publish(topics.update(F, "gw-1", "dev-1"), encode_manifest(m))
    bus.deliver()
    assert len(receiver.inner._subs) == 3  # type: ignore[attr-defined]
    clock.now = 5.0
    raw.publish(topics.update(F, "gw-1", "dev-1"), b"whole")
    bus.deliver()
    assert receiver.rejected() == {"chunk_timeout": 1}
    assert [g.payload for g in got] == [b"whole"]
    assert len(receiver.inner._subs) == 1  # type: ignore[attr-defined]


def test_a_message_heard_through_two_filters_reaches_each_handler_once() -> None:
    bus = MemoryBus()
    sender, receiver = chunked(bus, "coordinator"), chunked(bus, "gw-1")
    first: list[Message] = []
    second: list[Message] = []
    receiver.subscribe(topics.global_model(F), first.append)
    receiver.subscribe(topics.Topic(topics.TopicKind.GLOBAL_MODEL, F), first.append)
    receiver.subscribe(topics.kernels(F), second.append)
    data = payload(150_000)
    sender.publish(topics.global_model(F), data, retain=True)
    sender.publish(topics.kernel(F, "ab" * 32), data, retain=True)  # the same chunks again
    bus.deliver()
    assert [m.payload for m in first] == [data] and [m.payload for m in second] == [data]
    assert receiver.reassembled == 2 and not receiver.rejected()
    assert len([t for t in bus._retained if "/chunk/" in t]) == 3


def test_a_max_message_too_small_for_a_chunk_is_refused() -> None:
    with pytest.raises(Exception, match="below"):
        chunked(MemoryBus(), "gw-1", max_message=MIN_CHUNK)


def test_packet_bytes_counts_mqtt_framing() -> None:
    assert packet_bytes("a/b", 10, 0) == 1 + 1 + 2 + 3 + 10
    assert packet_bytes("a/b", 200, 1) == 1 + 2 + 2 + 3 + 2 + 200


@pytest.mark.parametrize("limit", [16_384, 131_072, 2_097_152 + 100, 8 << 20])
def test_every_chunk_packet_fits_the_limit_exactly(limit: int) -> None:
    t = ChunkedTransport(MemoryBus().transport("gw-1"), fleet=F, sender="gw-1",
                         max_message=limit, limit=lambda topic: LIMIT)  # fmt: skip
    assert t.chunk_size is not None
    topic = topics.chunk(F, "gw-1", "0" * 64).path
    assert packet_bytes(topic, t.chunk_size, 1) <= limit < packet_bytes(topic, t.chunk_size + 1, 1)


def encode_manifest_bad() -> bytes:
    m, _ = split(payload(2 * MIN_CHUNK), MIN_CHUNK, "coordinator")
    return encode_manifest(m)[:-3] + b"\xff\xff\xff"


def _retained(bus: MemoryBus) -> list[bytes]:
    return list(bus._retained.values())


def test_a_gateway_counts_refused_chunked_messages_in_its_metrics_and_completes_the_round(
    amqtt_broker: AmqttBroker, make_transport: MakeTransport, stack: ExitStack
) -> None:
    kit = build_fleet(ONE)
    f = kit.fleet.fleet
    coordinator = StandIn(kit, make_transport(amqtt_broker.url, "coord"))
    rig = FleetRig(kit, amqtt_broker.url, stack)
    gateway = rig.gateway("gw-1")
    rig.device("dev-01")
    rig.device("dev-02")
    # what an attacker holding dev-03 has: its login and client id
    cid = sorted(kit.fleet.client_ids("dev-03"))[0]
    attacker = make_transport(gateway.downstream_url, cid, login=kit.login("dev-03"))
    own = topics.update(f, "gw-1", "dev-03")
    lying, chunks = split(payload(2 * MIN_CHUNK), MIN_CHUNK, "dev-03")
    other, _ = split(payload(2 * MIN_CHUNK, 1), MIN_CHUNK, "dev-01")

    coordinator.open_round(1, 1, seconds=3.0)
    wait_until(lambda: gateway.open_round == 1)
    attacker.publish(own, encode_manifest(lying)[:-2] + b"\xff\xff", wait=True)
    attacker.publish(own, encode_manifest(other), wait=True)
    bad_chunk = topics.chunk(f, "dev-03", lying.parts[0].hex())
    attacker.publish(bad_chunk, chunks[1], retain=True, wait=True)
    attacker.publish(own, encode_manifest(lying), wait=True)
    metrics = gateway.wait_for_round(1, WAIT)

    assert {k: v for k, v in metrics.rejected.items() if k.startswith("chunk_")} == {
        "chunk_malformed": 1, "chunk_sender": 1, "chunk_digest": 1,
    }  # fmt: skip
    assert (metrics.contributors, metrics.dropped) == (2, 1)
