"""Kernel and failure messages in the protocol layer: topics, open_kernel, the Collector."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from nacl.signing import SigningKey

from kernels.wasm import ABI_VERSION, packaged_kernel
from tern import topics
from tern.admit import Peer, Role, Terms
from tern.aggregate import Partial
from tern.codecs import CodecName, Float32Codec, TernaryCodec
from tern.collect import Collector, Offer, Outcome
from tern.envelope import Envelope, Kind, seal
from tern.errors import (
    BadSignature,
    DigestMismatch,
    MalformedMessage,
    PayloadTooLarge,
    TopicError,
    UnexpectedMessage,
    Unsigned,
)
from tern.fleet import COORDINATOR, Fleet
from tern.messages import (
    MAX_KERNEL_BYTES,
    Failure,
    KernelFile,
    Update,
    encode_update,
    open_kernel,
    seal_kernel,
)
from tern.spec import ModelSpec

FLEET = "plant-7"
COORD = SigningKey(bytes([9]) * 32)
WASM = packaged_kernel()
SHA = hashlib.sha256(WASM).hexdigest()
KFLEET = Fleet(FLEET, COORD.verify_key, {})


# -- topics ------------------------------------------------------------------------------


def test_kernel_topic_is_named_by_the_sha256_and_parses_back() -> None:
    t = topics.kernel(FLEET, SHA)

    assert t.path == f"tern/{FLEET}/kernel/{SHA}"
    assert topics.parse(t.path) == t
    assert topics.kernels(FLEET).path == f"tern/{FLEET}/kernel/+"
    assert topics.kernels(FLEET).matches(t.path)


@pytest.mark.parametrize("digest", ["", "abc", SHA.upper(), SHA[:-1], SHA + "0", "g" * 64])
def test_kernel_topic_refuses_anything_but_64_lowercase_hex_digits(digest: str) -> None:
    with pytest.raises(TopicError, match="digest"):
        topics.kernel(FLEET, digest)
    with pytest.raises(TopicError):
        topics.parse(f"tern/{FLEET}/kernel/{digest}")


# -- open_kernel --------------------------------------------------------------------------


def test_a_signed_kernel_opens_to_its_bytes() -> None:
    data = seal_kernel(KernelFile(ABI_VERSION, WASM), FLEET, COORD)

    kernel = open_kernel(data, KFLEET, SHA)

    assert kernel.wasm == WASM and kernel.abi == ABI_VERSION and kernel.sha256 == SHA


def test_a_bare_module_is_refused_as_unsigned() -> None:
    with pytest.raises(Unsigned) as info:
        open_kernel(WASM, KFLEET, SHA)
    assert info.value.reason == "unsigned"


def test_a_kernel_signed_by_another_key_is_refused() -> None:
    data = seal_kernel(KernelFile(ABI_VERSION, WASM), FLEET, SigningKey(bytes(32)))

    with pytest.raises(BadSignature):
        open_kernel(data, KFLEET, SHA)


def test_a_kernel_of_another_fleet_is_refused() -> None:
    data = seal_kernel(KernelFile(ABI_VERSION, WASM), "plant-8", COORD)

    with pytest.raises(UnexpectedMessage) as info:
        open_kernel(data, KFLEET, SHA)
    assert info.value.reason == "wrong_fleet"


def test_a_signed_kernel_under_another_hash_is_refused() -> None:
    other = WASM + b"\x00\x03\x01ab"  # a custom section: another valid module
    data = seal_kernel(KernelFile(ABI_VERSION, other), FLEET, COORD)

    with pytest.raises(DigestMismatch) as info:
        open_kernel(data, KFLEET, SHA)
    assert info.value.reason == "digest_mismatch"


def test_a_kernel_whose_bytes_do_not_hash_to_its_own_sha256_is_refused() -> None:
    body = KernelFile(ABI_VERSION, WASM).to_body()
    body["wasm"] = WASM[:-1] + bytes([WASM[-1] ^ 1])  # signed, but not the bytes it names
    data = seal(Envelope(Kind.KERNEL, FLEET, 0, 0, COORDINATOR, body), COORD)

    with pytest.raises(DigestMismatch):
        open_kernel(data, KFLEET, SHA)


@pytest.mark.parametrize("extra", [1, MAX_KERNEL_BYTES])
def test_a_kernel_over_the_size_limit_is_refused(extra: int) -> None:
    huge = KernelFile(ABI_VERSION, b"\0asm\1\0\0\0" + bytes(MAX_KERNEL_BYTES + extra))
    data = seal_kernel(huge, FLEET, COORD)

    with pytest.raises(PayloadTooLarge):
        open_kernel(data, KFLEET, huge.sha256)


def test_a_kernel_body_with_a_missing_or_extra_field_is_malformed() -> None:
    body = KernelFile(ABI_VERSION, WASM).to_body()
    for broken in ({k: v for k, v in body.items() if k != "abi"}, {**body, "extra": 1}):
        with pytest.raises(MalformedMessage):
            KernelFile.from_body(broken)


# -- failures -------------------------------------------------------------------------------


def test_failure_needs_at_least_one_reason_of_positive_count() -> None:
    assert Failure.from_body({"failed": {"kernel_trap": 2}}) == Failure({"kernel_trap": 2})
    for bad in ({"failed": {}}, {"failed": {"x": 0}}, {"failed": {"": 1}}, {"failed": [1]}):
        with pytest.raises(MalformedMessage):
            Failure.from_body(bad)


def test_a_partial_carries_its_failures_and_a_plain_update_omits_them() -> None:
    spec = ModelSpec.of({"w": (2, 2)})
    update, _ = encode_update(Float32Codec(), spec, Partial(np.ones(4, np.float32), 2.0, 2))
    with_failures = Update(update.codec, update.weight, update.count, update.tensors, {"late": 1})

    assert "failed" not in update.to_body()
    assert Update.from_body(with_failures.to_body()).failed == {"late": 1}
    assert Update.from_body(with_failures.to_body()).check(spec).failed == {"late": 1}


# -- the Collector ---------------------------------------------------------------------------

SPEC = ModelSpec.of({"w": (4, 3), "b": (3,)})
KEYS = {s: SigningKey(bytes([i + 1]) * 32) for i, s in enumerate(["dev-1", "dev-2", "gw-9"])}
PEERS = {
    "dev-1": Peer("dev-1", Role.DEVICE, KEYS["dev-1"].verify_key, 1, 100.0),
    "dev-2": Peer("dev-2", Role.DEVICE, KEYS["dev-2"].verify_key, 1, 100.0),
    "gw-9": Peer("gw-9", Role.GATEWAY, KEYS["gw-9"].verify_key, 4, 400.0),
}
TERMS = Terms(FLEET, 0, 5, 4, CodecName.TERNARY, SPEC, max_norm=100.0)


def _topic(sender: str) -> str:
    if sender.startswith("gw"):
        return topics.partial(FLEET, "gw-1", sender).path
    return topics.update(FLEET, "gw-1", sender).path


def _sealed(sender: str, kind: Kind, body: object, round: int = 5) -> bytes:
    return seal(Envelope(kind, FLEET, round, 4, sender, body), KEYS[sender])


def _update(sender: str, failed: dict[str, int] | None = None, kind: Kind = Kind.UPDATE) -> bytes:
    delta = np.random.default_rng(len(sender)).standard_normal(SPEC.size).astype(np.float32)
    codec = Float32Codec() if kind is Kind.PARTIAL else TernaryCodec()
    update, _ = encode_update(codec, SPEC, Partial(delta, 1.0, 1))
    update = Update(update.codec, update.weight, update.count, update.tensors, failed or {})
    return _sealed(sender, kind, update.to_body())


def _offer(c: Collector, sender: str, data: bytes) -> Offer:
    return c.offer(data, _topic(sender))


def _collector() -> Collector:
    return Collector(terms=TERMS, peers=PEERS)


def test_a_failure_report_settles_its_sender_and_is_tallied_with_those_in_partials() -> None:
    c = _collector()

    first = _offer(
        c, "dev-1", _sealed("dev-1", Kind.FAILURE, Failure({"kernel_fuel": 1}).to_body())
    )
    _offer(c, "dev-2", _update("dev-2"))
    _offer(c, "gw-9", _update("gw-9", {"kernel_fuel": 2, "late": 1}, Kind.PARTIAL))

    assert first.outcome is Outcome.FAILED
    assert c.complete and c.missing == frozenset()
    assert c.failed == {"kernel_fuel": 3, "late": 1}
    assert c.close().count == 2  # failures add nothing to the fold


def test_a_second_message_after_a_failure_report_is_a_duplicate() -> None:
    c = _collector()
    _offer(c, "dev-1", _sealed("dev-1", Kind.FAILURE, Failure({"kernel_trap": 1}).to_body()))

    again = _offer(c, "dev-1", _update("dev-1"))

    assert again.reason == "duplicate" and "dev-1" not in c.accepted


def test_a_device_update_claiming_failures_is_refused() -> None:
    c = _collector()

    offer = _offer(c, "dev-1", _update("dev-1", {"late": 1}))

    assert offer.reason == "count_bound" and c.rejected == {"count_bound": 1}


def test_a_failure_for_another_round_is_stale_and_settles_nothing() -> None:
    c = _collector()

    offer = _offer(
        c, "dev-1", _sealed("dev-1", Kind.FAILURE, Failure({"late": 1}).to_body(), round=4)
    )

    assert offer.reason == "stale_round" and "dev-1" in c.missing and c.failed == {}
