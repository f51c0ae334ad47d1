"""The microcontroller model (tern/mcu.py): bytes, tag, quantization and integer inference;
and the order the gateway's relay (gateway/mcu.py) derives models in."""

from __future__ import annotations

import contextlib
import hmac
import itertools
import math
import struct
from hashlib import sha256

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.boards import BoardEntry, Boards
from gateway.mcu import BoardRelay
from kernels.partition import load_mnist1d
from kernels.reference import forward, init_weights, mlp_spec, train_local
from tern import topics
from tern.errors import (
    BadSignature,
    MalformedMessage,
    NonFiniteValue,
    PayloadTooLarge,
    ShapeMismatch,
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
    infer,
    mcu_tag,
    open_mcu,
    quantize,
    quantize_window,
    seal_mcu,
)
from tern.messages import GlobalModel, TrainConfig
from tern.spec import ModelSpec

KEY = bytes(range(32))
FLEET, DEVICE = "demo", "esp-1"
RUN = 1_767_225_600_000  # a coordinator's run: ms since the epoch (0x19B_76DAA800)

TINY_SPEC = mlp_spec([2, 2, 2])
TINY_WEIGHTS = TINY_SPEC.flatten(
    {
        "w0": [[0.5, -1.0], [0.25, 0.75]],
        "b0": [0.1, -0.2],
        "w1": [[1.0, -0.5], [0.5, 2.0]],
        "b1": [0.0, 0.3],
    }
)
# seal_mcu(quantize(TINY_SPEC, TINY_WEIGHTS, 7, run=RUN).to_bytes(), KEY, "demo", "esp-1"):
# any change to the layout, the quantization rules or the tag shows up here. The header is
# TMCU, version 2, 2 layers, in_exp 5, flags 0, model_version 7, run (u64, little-endian).
TINY_SEALED = bytes.fromhex(
    "544d4355020205000700000000a8da769b010000"
    "020002000200820e19003f20825f333333009a9999ff"
    "820d18003f20e07e00000000cdcc4c00"
    "c6ed5b080c6ac8a72e906f1ac4fe2e515ea01553ea9cd286b411bad162033caa"
)

# The same model as format 1 sealed it (model_version 7, no run, domain tern-mcu-1).
TINY_SEALED_V1 = bytes.fromhex(
    "544d43550102050007000000020002000200820e19003f20825f333333009a9999ff"
    "820d18003f20e07e00000000cdcc4c00"
    "4a642803ec1bda42c8231efc41ee6deb8fa997c5d2367650957b183d7915cd14"
)


def layer(m: int, e_w: int, e_b: int, w: list[list[int]], b: list[int]) -> McuLayer:
    return McuLayer(m, e_w, e_b, np.array(w, dtype=np.int8), np.array(b, dtype=np.int64))


# -- the fixed vector --------------------------------------------------------------------


def test_tiny_model_seals_to_the_recorded_bytes() -> None:
    model = quantize(TINY_SPEC, TINY_WEIGHTS, 7, run=RUN)

    sealed = seal_mcu(model.to_bytes(), KEY, FLEET, DEVICE)

    assert sealed == TINY_SEALED


def test_tiny_model_quantizes_as_worked_out_by_hand() -> None:
    model = quantize(TINY_SPEC, TINY_WEIGHTS, 7, run=RUN)

    first, second = model.layers
    # a = 1: 129 * 127 < 2**14 <= 130 * 127, so s = 130 * 2**-14; 0.25 / s = 31.51 -> 32.
    assert (first.m, first.e_w) == (130, 14)
    assert first.weights.tolist() == [[63, 32], [-126, 95]]  # output-major: W transposed
    # max |b| = 0.2: 0.2 * 2**25 <= 2**23 < 0.2 * 2**26.
    assert first.e_b == 25
    assert first.bias.tolist() == [
        round(float(np.float32(0.1)) * 2**25),
        round(float(np.float32(-0.2)) * 2**25),
    ]
    assert (second.m, second.e_w, second.e_b) == (130, 13, 24)
    assert second.weights.tolist() == [[63, 32], [-32, 126]]
    assert model.sizes == (2, 2, 2) and model.in_exp == DEFAULT_IN_EXP


def test_demo_mlp_message_is_the_documented_size() -> None:
    spec = mlp_spec([40, 100, 100, 10])
    model = quantize(spec, init_weights(spec, np.random.default_rng(0)), 1, run=RUN)

    sealed = seal_mcu(model.to_bytes(), KEY, FLEET, DEVICE)

    assert len(sealed) == 15912


# -- inference, checked by hand ----------------------------------------------------------


def test_infer_follows_the_integer_steps_worked_out_by_hand() -> None:
    model = McuModel(
        model_version=3,
        run=RUN,
        in_exp=0,
        sizes=(2, 2, 2),
        layers=(
            layer(128, 7, 0, [[1, 2], [-3, 1]], [5, -100]),
            layer(255, 8, 20, [[1, -1], [-2, 3]], [384, -640]),
        ),
    )

    pred = infer(model, [10, -4])

    # Layer 0, E = 7: acc = [10 - 8, -30 - 4] = [2, -34]; d = 0 - 7, c = b * 2**7 =
    # [640, -12800]; y = acc * 128 + c = [896, -17152]; ReLU [896, 0]. bitlen(896) = 10,
    # k = 3, rshift(896, 3) = (896 + 4) >> 3 = 112; x = [112, 0], e = 4.
    # Layer 1, E = 12: acc = [112, -224]; d = 8, c = [(384 + 128) >> 8, (-640 + 128) >> 8]
    # = [2, -2] (1.5 and -2.5 both round half up); y = [28560 + 2, -57120 - 2].
    assert pred.logits == (28562, -57122)
    assert pred.exp == 12
    assert pred.label == 0
    assert pred.confidence == pytest.approx(1 / (1 + math.exp(-85684 / 4096)), abs=1e-12)


def test_infer_shifts_once_more_when_rounding_carries_past_127() -> None:
    model = McuModel(
        model_version=1,
        run=RUN,
        in_exp=0,
        sizes=(1, 1, 1),
        layers=(layer(255, 8, 0, [[1]], [0]), layer(128, 7, 0, [[1]], [0])),
    )

    pred = infer(model, [1])

    # y = 255 (E = 8): bitlen 8 gives k = 1, but rshift(255, 1) = 128 > 127, so k = 2:
    # x = (255 + 2) >> 2 = 64, e = 6; then y = 64 * 128 = 8192 at E = 7 + 6 = 13.
    assert pred.logits == (8192,)
    assert pred.exp == 13
    assert (pred.label, pred.confidence) == (0, 1.0)


def test_infer_picks_the_first_label_on_ties() -> None:
    model = McuModel(1, RUN, 0, (1, 3), (layer(128, 7, 0, [[1], [2], [2]], [0, 0, 0]),))

    pred = infer(model, [5])

    assert pred.label == 1
    assert pred.confidence == pytest.approx(1 / (2 + math.exp(-5)))


@pytest.mark.parametrize("window", [[1], [1, 2, 3], [128, 0], [0, -128], [0.5, 1]])
def test_infer_refuses_a_window_of_the_wrong_length_or_range(window: list[float]) -> None:
    model = McuModel(1, RUN, 0, (2, 1), (layer(128, 7, 0, [[1, 1]], [0]),))

    with pytest.raises((ShapeMismatch, MalformedMessage)):
        infer(model, window)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def mnist1d_test() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = load_mnist1d(num_samples=4000, seed=42)
    return data.x, data.y, data.x_test


@pytest.mark.parametrize("trained", [False, True], ids=["initial", "trained"])
def test_quantized_demo_mlp_agrees_with_float_inference(
    mnist1d_test: tuple[np.ndarray, np.ndarray, np.ndarray], trained: bool
) -> None:
    x, y, x_test = mnist1d_test
    spec = mlp_spec([40, 100, 100, 10])
    weights = init_weights(spec, np.random.default_rng(0))
    if trained:
        cfg = TrainConfig(epochs=3, batch_size=32, lr=0.5)
        weights = train_local(spec, weights, x, y, cfg, np.random.default_rng(1))
    model = quantize(spec, weights, 1, run=RUN)

    ints = [infer(model, quantize_window(w, DEFAULT_IN_EXP)).label for w in x_test]

    agreement = float(np.mean(np.array(ints) == forward(spec, weights, x_test).argmax(axis=1)))
    # Measured 98.1% (initial) and 98.6% (trained) on these 800 windows; the misses are
    # near-ties between two logits that int8 rounding flips.
    assert agreement >= 0.97


def test_quantize_window_scales_rounds_and_clamps() -> None:
    window = quantize_window(np.array([0.0, 1 / 32, -0.5, 3 / 64, 100.0, -5.0]), 5)

    assert window == [0, 1, -16, 2, 127, -127]  # 1.5 rounds to even


# -- quantization rules ------------------------------------------------------------------

weight_arrays = st.tuples(
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=-40, max_value=40),
    st.integers(min_value=0, max_value=2**32 - 1),
)


@settings(max_examples=150, deadline=None)
@given(params=weight_arrays)
def test_quantized_weights_are_within_half_a_step_and_the_scale_is_smallest(
    params: tuple[int, int, int, int],
) -> None:
    n_in, n_out, magnitude, seed = params
    rng = np.random.default_rng(seed)
    spec = mlp_spec([n_in, n_out])
    flat = (rng.standard_normal(spec.size) * 2.0**magnitude).astype(np.float32)
    w, beta = flat[: n_in * n_out].reshape(n_in, n_out), flat[n_in * n_out :]

    (q,) = quantize(spec, flat, 1, run=RUN).layers

    s = math.ldexp(q.m, -q.e_w)
    a = float(np.abs(w).max())
    assert 128 <= q.m <= 255 and s * 127 >= a
    smaller = math.ldexp(q.m - 1, -q.e_w) if q.m > 128 else math.ldexp(255, -q.e_w - 1)
    assert smaller * 127 < a
    err = np.abs(q.weights.T.astype(np.float64) * s - w.astype(np.float64))
    assert err.max() <= s / 2 * (1 + 1e-12)
    scaled = np.abs(np.rint(np.ldexp(beta.astype(np.float64), q.e_b)))
    assert scaled.max() <= 2**23
    assert (
        q.e_b == 30 or np.abs(np.rint(np.ldexp(beta.astype(np.float64), q.e_b + 1))).max() > 2**23
    )
    assert q.bias.tolist() == np.rint(np.ldexp(beta.astype(np.float64), q.e_b)).tolist()


def test_quantize_marks_an_all_zero_layer_with_a_zero_mantissa() -> None:
    spec = mlp_spec([3, 2])

    (q,) = quantize(spec, np.zeros(spec.size, dtype=np.float32), 1, run=RUN).layers

    assert q.m == 0 and not q.weights.any() and q.e_b == 30


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec.of({"w0": (4, 3), "b0": (3,), "w2": (3, 2), "b2": (2,)}),
        ModelSpec.of({"w0": (4, 3), "b0": (3,), "w1": (2, 2), "b1": (2,)}),
        ModelSpec.of({"w0": (4, 3), "b0": (2,)}),
        ModelSpec.of({"conv": (3, 3, 3)}),
        mlp_spec([4] * 10),
        mlp_spec([2000, 2]),
    ],
    ids=["names", "chain", "bias", "not-mlp", "too-deep", "too-wide"],
)
def test_quantize_refuses_what_is_not_a_small_mlp(spec: ModelSpec) -> None:
    with pytest.raises(ShapeMismatch):
        quantize(spec, np.zeros(spec.size, dtype=np.float32), 1, run=RUN)


def test_quantize_refuses_non_finite_weights_and_oversized_models() -> None:
    spec = mlp_spec([3, 2])
    flat = np.zeros(spec.size, dtype=np.float32)
    flat[2] = np.nan
    big = mlp_spec([256, 256])

    with pytest.raises(NonFiniteValue):
        quantize(spec, flat, 1, run=RUN)
    with pytest.raises(PayloadTooLarge):
        quantize(big, np.zeros(big.size, dtype=np.float32), 1, run=RUN)


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
