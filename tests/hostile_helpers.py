"""What the hostile-input tests share (tests/test_hostile_input*.py): every decoder of the
protocol layer behind one call, and the checks that anything but a TernError fails a test.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from cbor2 import CBORTag
from hypothesis import HealthCheck, settings

from tern import topics, trits
from tern.cbor import Caps, decode
from tern.codecs import CodecName, codec_for
from tern.envelope import Kind, loads_bounded, open_envelope
from tern.errors import TernError
from tern.fleet import Fleet
from tern.freshness import Watermarks
from tern.messages import (
    Failure,
    GlobalModel,
    KernelFile,
    KernelRef,
    RoundSchedule,
    TrainConfig,
    Update,
    open_kernel,
)
from tern.reports import RoundMetrics, Status, Telemetry
from tern.spec import ModelSpec

if TYPE_CHECKING:
    from conftest import ProtocolKit

__all__ = [
    "EMPTY_MODULE",
    "EMPTY_MODULE_SHA256",
    "FUZZ",
    "LIMIT",
    "MESSAGE_NAMES",
    "REJECTED",
    "SLUG",
    "check_update",
    "decode_body",
    "decode_bytes",
    "dense_wire",
    "kit_fleet",
    "must_reject",
    "only_tern_errors",
    "sealed_messages",
]

SLUG = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
LIMIT = 1 << 20
EMPTY_MODULE = KernelFile(1, b"\0asm\1\0\0\0")  # the smallest valid WebAssembly module
EMPTY_MODULE_SHA256 = EMPTY_MODULE.sha256
REJECTED = object()

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def only_tern_errors(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
    """``fn(...)``, or REJECTED if it raised a TernError; any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except TernError as exc:
        assert SLUG.fullmatch(exc.reason), f"{type(exc).__name__} reason {exc.reason!r}"
        return REJECTED


def must_reject(fn: Callable[..., object], *args: object, **kwargs: object) -> TernError:
    with pytest.raises(TernError) as info:
        fn(*args, **kwargs)
    assert SLUG.fullmatch(info.value.reason)
    return info.value


def check_update(body: object, spec: ModelSpec) -> object:
    update = Update.from_body(body)
    return update.check(spec, density=0.5)


def decode_body(value: object, spec: ModelSpec) -> None:
    """Every body-level decoder, on `value` as a body and as each codec's tensors."""
    only_tern_errors(GlobalModel.from_body, value)
    only_tern_errors(RoundSchedule.from_body, value)
    only_tern_errors(KernelRef.from_cbor, value)
    only_tern_errors(KernelFile.from_body, value)
    only_tern_errors(Failure.from_body, value)
    only_tern_errors(TrainConfig.from_cbor, value)
    only_tern_errors(ModelSpec.from_cbor, value)
    only_tern_errors(check_update, value, spec)
    for codec in CodecName:
        as_tensors = {"codec": str(codec), "weight": 1.0, "count": 1, "tensors": [value, value]}
        only_tern_errors(check_update, as_tensors, spec)
        for t in spec.tensors:
            only_tern_errors(codec_for(codec, density=0.5).check, value, t.shape, t.name)


def decode_bytes(data: bytes, kit: ProtocolKit) -> object:
    """Every decoder that takes bytes (or text) from the network; returns open_envelope's result."""
    env = only_tern_errors(open_envelope, data, kit.keys, fleet=kit.fleet, kinds=set(Kind))
    if env is not REJECTED:
        decode_body(env.body, kit.spec)  # type: ignore[attr-defined]
    value = only_tern_errors(loads_bounded, data, LIMIT)
    if value is not REJECTED:
        decode_body(value, kit.spec)
    for n in sorted({0, 1, 4, 5, 6, 5 * len(data) - 1, 5 * len(data)}):
        if n >= 0:
            only_tern_errors(trits.validate_packed, data, n)
            only_tern_errors(trits.unpack, data, n)
    only_tern_errors(topics.parse, data.decode("utf-8", "surrogateescape"))
    only_tern_errors(open_kernel, data, kit_fleet(kit), EMPTY_MODULE_SHA256)
    only_tern_errors(decode, data, Caps(LIMIT, LIMIT))
    only_tern_errors(lambda: Watermarks.from_json(data.decode("utf-8", "replace")))
    for report in (Status, RoundMetrics, Telemetry):
        only_tern_errors(report.from_json, data)
    return env


def kit_fleet(kit: ProtocolKit) -> Fleet:
    """A fleet whose coordinator signs with the kit's key."""
    return Fleet(kit.fleet, kit.key.verify_key, {})


def sealed_messages(kit: ProtocolKit) -> dict[str, bytes]:
    return {
        "model": kit.seal(Kind.MODEL, kit.global_model().to_body()),
        "schedule": kit.seal(Kind.SCHEDULE, kit.schedule().to_body()),
        **{f"update-{c}": kit.sealed_update(c) for c in CodecName},
        "partial-ternary": kit.sealed_update(CodecName.TERNARY, Kind.PARTIAL),
        "kernel": kit.seal(Kind.KERNEL, EMPTY_MODULE.to_body()),
        "failure": kit.seal(Kind.FAILURE, Failure({"kernel_trap": 1}).to_body()),
    }


MESSAGE_NAMES = [
    "model",
    "schedule",
    *(f"update-{c}" for c in CodecName),
    "partial-ternary",
    "kernel",
    "failure",
]


def dense_wire(shape: object, tag: int, data: bytes) -> CBORTag:
    return CBORTag(40, [shape, CBORTag(tag, data)])
