"""The microcontroller model (tern/mcu.py): the fixed vector, quantization and integer
inference. Bytes, the tag, the run and the gateway relay's order are in test_mcu_format_bytes.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.partition import load_mnist1d
from kernels.reference import forward, init_weights, mlp_spec, train_local
from tern.errors import MalformedMessage, NonFiniteValue, PayloadTooLarge, ShapeMismatch
from tern.mcu import DEFAULT_IN_EXP, McuModel, infer, quantize, quantize_window, seal_mcu
from tern.messages import TrainConfig
from tern.spec import ModelSpec
from tests.mcu_vectors import DEVICE, FLEET, KEY, RUN, TINY_SEALED, TINY_SPEC, TINY_WEIGHTS, layer

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
