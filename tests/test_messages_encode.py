"""encode_update, and its error feedback: what is not sent now is carried in the residual, so
over many rounds the sum of what was sent tracks the sum of the targets.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from tern.aggregate import Partial
from tern.codecs import Codec, Float16Codec, Float32Codec, TernaryCodec
from tern.errors import ShapeMismatch
from tern.messages import encode_update
from tern.quantize import TernaryRule
from tests.helpers import make_rng
from tests.message_helpers import SPEC, random_partial, received

# == encode_update ==================================================================


def test_encode_update_with_float32_is_lossless_and_leaves_no_residual() -> None:
    # prepare
    partial = random_partial(8)

    # act
    update, residual = encode_update(Float32Codec(), SPEC, partial)

    # assert
    assert not residual.any()
    got = received(update).check(SPEC).to_partial()
    assert got.weighted_sum.tobytes() == partial.weighted_sum.tobytes()


@pytest.mark.parametrize(
    "partial",
    [
        Partial(np.ones(SPEC.size, dtype=np.float32), 0.0, 1),
        Partial(np.ones(SPEC.size, dtype=np.float32), -1.0, 1),
        Partial(np.ones(SPEC.size, dtype=np.float32), 1.0, 0),
    ],
    ids=["zero-weight", "negative-weight", "no-contributors"],
)
def test_encode_update_rejects_an_empty_partial(partial: Partial) -> None:
    # act / assert
    with pytest.raises(ValueError, match="positive weight"):
        encode_update(Float32Codec(), SPEC, partial)


def test_encode_update_rejects_a_residual_of_another_shape() -> None:
    # act / assert
    with pytest.raises(ShapeMismatch):
        encode_update(Float32Codec(), SPEC, random_partial(), np.zeros(SPEC.size + 1, np.float32))


@pytest.mark.parametrize("size", [SPEC.size - 1, SPEC.size + 2], ids=["shorter", "longer"])
def test_encode_update_rejects_a_partial_unlike_the_spec(size: int) -> None:
    # prepare
    partial = Partial(np.ones(size, dtype=np.float32), 1.0, 1)

    # act / assert
    with pytest.raises(ShapeMismatch):
        encode_update(TernaryCodec(rule=TernaryRule.OPTIMAL), SPEC, partial)


# -- error feedback ------------------------------------------------------------------

ROUNDS = 300
WEIGHT = 3.0


def _send(
    codec: Codec, partial: Partial, residual: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """What the receiver adds for this partial (through the wire), and the new residual."""
    update, new_residual = encode_update(codec, SPEC, partial, residual)
    sent = received(update).check(SPEC).to_partial().weighted_sum
    return sent.astype(np.float64), new_residual


def _contraction_bound(targets: list[np.ndarray]) -> float:
    """Error-feedback bound for a compressor with ||x - C(x)||^2 <= (1 - 1/n)||x||^2.

    Per tensor: e_r <= q (g_r + e_{r-1}), so e <= q / (1 - q) * max_r ||g_r||, q = sqrt(1 - 1/n).
    """
    total = 0.0
    for t, o in zip(SPEC.tensors, SPEC.offsets, strict=True):
        q = math.sqrt(1 - 1 / t.size)
        g = max(float(np.linalg.norm(x[o : o + t.size])) for x in targets)
        total += (q / (1 - q) * g) ** 2
    return math.sqrt(total)


def _error_feedbackall_codecs() -> list[Any]:
    return [
        pytest.param(Float16Codec(), id="float16"),
        *[
            pytest.param(TernaryCodec(rule=r, rng=make_rng(11)), id=f"ternary-{r}")
            for r in TernaryRule
        ],
    ]


@pytest.mark.parametrize("codec", _error_feedbackall_codecs())
def test_error_feedback_sent_plus_final_residual_equals_the_sum_of_targets(codec: Codec) -> None:
    # prepare
    rng = make_rng(21)
    targets = [(rng.standard_normal(SPEC.size) * WEIGHT).astype(np.float32) for _ in range(ROUNDS)]
    residual = np.zeros(SPEC.size, dtype=np.float32)
    total_sent = np.zeros(SPEC.size, dtype=np.float64)

    # act
    for target in targets:
        sent, residual = _send(codec, Partial(target, WEIGHT, 3), residual)
        total_sent += sent

    # assert: sum sent = sum targets - final residual * weight (telescoping)
    total_target = np.sum(np.array(targets, dtype=np.float64), axis=0)
    recovered = total_sent + residual.astype(np.float64) * WEIGHT
    np.testing.assert_allclose(recovered, total_target, atol=1e-6 * ROUNDS * WEIGHT * 10)


@pytest.mark.parametrize("rule", [TernaryRule.OPTIMAL, TernaryRule.MAX_ROUND])
def test_error_feedback_residual_stays_within_the_contraction_bound(rule: TernaryRule) -> None:
    # prepare
    codec = TernaryCodec(rule=rule)
    rng = make_rng(22)
    targets = [(rng.standard_normal(SPEC.size) * WEIGHT).astype(np.float32) for _ in range(ROUNDS)]
    bound = _contraction_bound(targets)
    residual = np.zeros(SPEC.size, dtype=np.float32)
    largest = 0.0

    # act
    for target in targets:
        _, residual = _send(codec, Partial(target, WEIGHT, 3), residual)
        largest = max(largest, float(np.linalg.norm(residual.astype(np.float64) * WEIGHT)))

    # assert
    assert largest <= bound


@pytest.mark.parametrize("rule", [TernaryRule.OPTIMAL, TernaryRule.MAX_ROUND])
def test_without_error_feedback_the_tracking_error_grows(rule: TernaryRule) -> None:
    # prepare: the same delta every round, so quantization error adds up coherently
    codec = TernaryCodec(rule=rule)
    target = (make_rng(23).standard_normal(SPEC.size) * WEIGHT).astype(np.float32)
    bound = _contraction_bound([target])
    with_feedback = np.zeros(SPEC.size, dtype=np.float64)
    without_feedback = np.zeros(SPEC.size, dtype=np.float64)
    residual = np.zeros(SPEC.size, dtype=np.float32)

    # act
    for _ in range(ROUNDS):
        sent, residual = _send(codec, Partial(target, WEIGHT, 3), residual)
        with_feedback += sent
        sent_plain, _ = _send(codec, Partial(target, WEIGHT, 3), None)
        without_feedback += sent_plain

    # assert
    expected = target.astype(np.float64) * ROUNDS
    gap_with = float(np.linalg.norm(expected - with_feedback))
    gap_without = float(np.linalg.norm(expected - without_feedback))
    one_round = float(np.linalg.norm(target - _send(codec, Partial(target, WEIGHT, 3), None)[0]))
    assert gap_with <= bound
    assert gap_without == pytest.approx(ROUNDS * one_round, rel=1e-4)
    assert gap_without > bound
    assert gap_without > 10 * gap_with


def test_error_feedback_residual_is_per_unit_weight() -> None:
    # prepare: a residual of r per unit weight is worth r * w in the next target
    codec = Float32Codec()  # lossless: sent is exactly the target
    partial = Partial(np.zeros(SPEC.size, dtype=np.float32), 4.0, 2)
    residual = np.full(SPEC.size, 0.25, dtype=np.float32)

    # act
    sent, new_residual = _send(codec, partial, residual)

    # assert
    np.testing.assert_array_equal(sent, np.full(SPEC.size, 1.0))
    assert not new_residual.any()
