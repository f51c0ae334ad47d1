"""The microcontroller model on the wire (tern/mcu.py): byte round trips and strict parsing,
the tag, format 2's run, and the gateway relay that orders models as the boards do.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import struct
from hashlib import sha256

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.boards import BoardEntry, Boards
from gateway.mcu import BoardRelay
from tern import topics
from tern.errors import (
    BadSignature,
    MalformedMessage,
    PayloadTooLarge,
    TernError,
    TopicError,
    UnknownSchemaVersion,
)
from tern.mcu import (
    DEFAULT_IN_EXP,
    FORMAT_VERSION,
    KEY_BYTES,
    MAX_MCU_BYTES,
    TAG_BYTES,
    McuLayer,
    McuModel,
    mcu_tag,
    open_mcu,
    quantize,
    seal_mcu,
)
from tern.messages import GlobalModel
from tests.mcu_vectors import DEVICE, FLEET, KEY, RUN, TINY_SEALED, TINY_SPEC, TINY_WEIGHTS, layer

# The same model as format 1 sealed it (model_version 7, no run, domain tern-mcu-1).
TINY_SEALED_V1 = bytes.fromhex(
    "544d43550102050007000000020002000200820e19003f20825f333333009a9999ff"
    "820d18003f20e07e00000000cdcc4c00"
    "4a642803ec1bda42c8231efc41ee6deb8fa997c5d2367650957b183d7915cd14"
)


# -- bytes: round trips and strict parsing -------------------------------------------------


@st.composite
def mcu_models(draw: st.DrawFn) -> McuModel:
    sizes = tuple(draw(st.lists(st.integers(1, 6), min_size=2, max_size=4)))
    layers = []
    for n, o in itertools.pairwise(sizes):
        m = draw(st.sampled_from([0, *range(128, 256)]))
        w = draw(hnp.arrays(np.int8, (o, n))) if m else np.zeros((o, n), dtype=np.int8)
        b = draw(hnp.arrays(np.int64, (o,), elements=st.integers(-(2**31), 2**31 - 1)))
        layers.append(McuLayer(m, draw(st.integers(-128, 127)), draw(st.integers(-128, 127)), w, b))
    return McuModel(
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(-128, 127)),
        sizes,
        tuple(layers),
    )


def _same(a: McuModel, b: McuModel) -> bool:
    head = (a.model_version, a.run, a.in_exp, a.sizes)
    return head == (b.model_version, b.run, b.in_exp, b.sizes) and all(
        (x.m, x.e_w, x.e_b) == (y.m, y.e_w, y.e_b)
        and np.array_equal(x.weights, y.weights)
        and np.array_equal(x.bias, y.bias)
        for x, y in zip(a.layers, b.layers, strict=True)
    )


@settings(max_examples=200, deadline=None)
@given(model=mcu_models())
def test_to_bytes_and_from_bytes_round_trip(model: McuModel) -> None:
    body = model.to_bytes()

    back = McuModel.from_bytes(body)

    assert _same(back, model) and back.to_bytes() == body


@settings(max_examples=100, deadline=None)
@given(model=mcu_models())
def test_seal_and_open_round_trip(model: McuModel) -> None:
    sealed = seal_mcu(model.to_bytes(), KEY, FLEET, DEVICE)

    assert _same(open_mcu(sealed, KEY, FLEET, DEVICE), model)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_tern_errors(data: bytes) -> None:
    with contextlib.suppress(TernError):
        open_mcu(data, KEY, FLEET, DEVICE)
    with contextlib.suppress(TernError):
        McuModel.from_bytes(data)
    with contextlib.suppress(TernError):  # past the magic and version, into the fields
        McuModel.from_bytes(b"TMCU\x02" + data)


@settings(max_examples=200, deadline=None)
@given(model=mcu_models(), cut=st.integers(min_value=1), bit=st.integers(min_value=0))
def test_truncated_or_flipped_messages_are_refused(model: McuModel, cut: int, bit: int) -> None:
    body = model.to_bytes()
    sealed = seal_mcu(body, KEY, FLEET, DEVICE)
    flipped = bytearray(sealed)
    flipped[(bit // 8) % len(sealed)] ^= 1 << (bit % 8)
    short = sealed[: len(sealed) - 1 - cut % len(sealed)]

    with pytest.raises((BadSignature, MalformedMessage)):
        open_mcu(short, KEY, FLEET, DEVICE)
    with pytest.raises(BadSignature):
        open_mcu(bytes(flipped), KEY, FLEET, DEVICE)
    with pytest.raises(MalformedMessage):
        McuModel.from_bytes(body[: len(body) - 1 - cut % len(body)])
    # A flipped body bit may still parse (a weight changed): that is what the tag is for.
    with contextlib.suppress(TernError):
        McuModel.from_bytes(bytes(flipped[:-TAG_BYTES]))


def _resealed(body: bytes, offset: int, value: int) -> bytes:
    edited = bytearray(body)
    edited[offset] = value
    return seal_mcu(bytes(edited), KEY, FLEET, DEVICE)


@pytest.mark.parametrize(
    ("offset", "value", "error"),
    [
        (0, ord("X"), MalformedMessage),  # magic
        (4, 1, UnknownSchemaVersion),  # version 1: no run
        (4, 3, UnknownSchemaVersion),  # version
        (5, 0, MalformedMessage),  # no layers
        (5, 9, MalformedMessage),  # too many layers
        (7, 1, MalformedMessage),  # reserved flags
        (20, 0, MalformedMessage),  # a zero width
        (26, 100, MalformedMessage),  # mantissa outside 128-255
        (29, 1, MalformedMessage),  # layer padding
    ],
)
def test_open_refuses_authentic_but_invalid_fields(
    offset: int, value: int, error: type[TernError]
) -> None:
    body = quantize(TINY_SPEC, TINY_WEIGHTS, 7, run=RUN).to_bytes()

    with pytest.raises(error):
        open_mcu(_resealed(body, offset, value), KEY, FLEET, DEVICE)


def test_open_refuses_oversize_before_checking_the_tag() -> None:
    with pytest.raises(PayloadTooLarge):
        open_mcu(bytes(MAX_MCU_BYTES + 1), KEY, FLEET, DEVICE)


def test_a_zero_mantissa_with_nonzero_weights_is_refused() -> None:
    with pytest.raises(MalformedMessage):
        layer(0, 0, 0, [[1]], [0])


# -- the tag -------------------------------------------------------------------------------


def test_tag_is_hmac_sha256_over_the_domain_fleet_device_and_body() -> None:
    body = quantize(TINY_SPEC, TINY_WEIGHTS, 7, run=RUN).to_bytes()

    tag = mcu_tag(body, KEY, FLEET, DEVICE)

    expected = hmac.new(KEY, b"tern-mcu-2\x00demo\x00esp-1\x00" + body, sha256).digest()
    assert tag == expected and len(tag) == TAG_BYTES


@pytest.mark.parametrize(
    ("key", "fleet", "device"),
    [(bytes(KEY_BYTES), FLEET, DEVICE), (KEY, "other", DEVICE), (KEY, FLEET, "esp-2")],
    ids=["key", "fleet", "device"],
)
def test_a_model_sealed_for_one_board_does_not_open_for_another(
    key: bytes, fleet: str, device: str
) -> None:
    sealed = TINY_SEALED

    with pytest.raises(BadSignature):
        open_mcu(sealed, key, fleet, device)


def test_tag_refuses_short_keys_and_bad_ids() -> None:
    with pytest.raises(MalformedMessage):
        mcu_tag(b"", b"short", FLEET, DEVICE)
    with pytest.raises(TopicError):
        mcu_tag(b"", KEY, FLEET, "esp/1")


# -- format 2: the run -----------------------------------------------------------------------


@pytest.mark.parametrize("run", [0, 1, RUN, 2**32, 2**64 - 1])
def test_run_is_a_little_endian_u64_right_after_the_model_version(run: int) -> None:
    model = quantize(TINY_SPEC, TINY_WEIGHTS, 7, run=run)

    body = model.to_bytes()
    back = open_mcu(seal_mcu(body, KEY, FLEET, DEVICE), KEY, FLEET, DEVICE)

    assert body[4] == FORMAT_VERSION == 2
    assert body[8:12] == (7).to_bytes(4, "little")
    assert body[12:20] == run.to_bytes(8, "little")
    assert (back.run, back.model_version) == (run, 7) and back.order == (run, 7)


@pytest.mark.parametrize("run", [-1, 2**64])
def test_a_run_outside_a_u64_is_refused(run: int) -> None:
    with pytest.raises(MalformedMessage):
        quantize(TINY_SPEC, TINY_WEIGHTS, 7, run=run)


def test_quantize_has_no_default_run() -> None:
    with pytest.raises(TypeError):
        quantize(TINY_SPEC, TINY_WEIGHTS, 7)  # type: ignore[call-arg]


def _version_1(body: bytes) -> bytes:
    """`body` (format 2) as format 1 wrote it: no run, version 1."""
    head = struct.pack("<4sBBbBI", b"TMCU", 1, body[5], body[6] - 256 * (body[6] > 127), 0, 7)
    return head + body[20:]


def test_a_version_1_model_is_refused_whether_tagged_as_1_or_as_2() -> None:
    v1_body = _version_1(quantize(TINY_SPEC, TINY_WEIGHTS, 7, run=RUN).to_bytes())
    v1_tag = hmac.new(KEY, b"tern-mcu-1\x00demo\x00esp-1\x00" + v1_body, sha256).digest()
    assert v1_body + v1_tag == TINY_SEALED_V1  # what format 1 sent for the same model

    # As format 1 sealed it: its tag is under the old domain, so it never verifies now.
    with pytest.raises(BadSignature):
        open_mcu(v1_body + v1_tag, KEY, FLEET, DEVICE)
    # Tagged under the new domain (a gateway that mixed them up): refused by its version.
    with pytest.raises(UnknownSchemaVersion):
        open_mcu(seal_mcu(v1_body, KEY, FLEET, DEVICE), KEY, FLEET, DEVICE)


# -- the gateway's relay orders models as the boards do --------------------------------------


class _Sent:
    """The relay's publish callable: what it sent, by topic."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def __call__(self, topic: topics.Topic, data: bytes, *, retain: bool, qos: int = 1) -> None:
        self.messages.append((topic.path, data))

    def orders(self) -> list[tuple[int, int]]:
        return [open_mcu(d, BOARD_KEY, FLEET, DEVICE).order for _, d in self.messages]


BOARD_KEY = bytes([7]) * KEY_BYTES


def _relay() -> tuple[BoardRelay, _Sent]:
    boards = Boards(FLEET, "gw-1", {DEVICE: BoardEntry(BOARD_KEY, "user-1", "password-1")})
    down = _Sent()
    return BoardRelay(boards, DEFAULT_IN_EXP, down, _Sent()), down


def test_relay_derives_a_model_only_when_run_and_version_are_newer() -> None:
    relay, down = _relay()
    model = GlobalModel(TINY_SPEC, TINY_WEIGHTS)

    relay.on_model(RUN, 3, model)
    relay.on_model(RUN, 3, model)  # the retained copy again, after a reconnect
    relay.on_model(RUN, 2, model)  # older version, same run
    relay.on_model(RUN - 1, 30, model)  # an older run's higher version: a replay
    relay.on_model(RUN, 4, model)
    relay.on_model(RUN + 1, 0, model)  # a new run starts again at 0

    assert down.orders() == [(RUN, 3), (RUN, 4), (RUN + 1, 0)]
    assert relay.stats["model_stale"] == 2 and relay.stats["models"] == 3
    assert relay.model_order == (RUN + 1, 0)
    assert {t for t, _ in down.messages} == {topics.mcu_model(FLEET, DEVICE).path}
