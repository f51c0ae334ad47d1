"""The numpy reference trainer and the Dirichlet partition (kernels/)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.partition import dirichlet_partition
from kernels.reference import evaluate, init_weights, loss_and_grad, mlp_spec, train_local
from tern.messages import TrainConfig


def _blobs(
    rng: np.random.Generator, n: int = 240, dim: int = 6, classes: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    centers = rng.standard_normal((classes, dim)) * 3
    y = rng.integers(0, classes, n)
    x = (centers[y] + rng.standard_normal((n, dim))).astype(np.float32)
    return x, y.astype(np.int64)


def test_mlp_spec_names_weights_and_biases_in_wire_order() -> None:
    spec = mlp_spec([40, 100, 10])

    assert [(t.name, t.shape) for t in spec.tensors] == [
        ("w0", (40, 100)),
        ("b0", (100,)),
        ("w1", (100, 10)),
        ("b1", (10,)),
    ]


@pytest.mark.parametrize("sizes", [[6, 3], [6, 5, 3], [6, 4, 4, 3]])
def test_gradient_matches_central_finite_differences(sizes: list[int]) -> None:
    rng = np.random.default_rng(1)
    spec = mlp_spec(sizes)
    x, y = _blobs(rng, n=16)
    w = init_weights(spec, rng).astype(np.float64).astype(np.float32)
    _, grad = loss_and_grad(spec, w, x, y)
    probe = rng.choice(spec.size, size=12, replace=False)
    eps = np.float32(1e-2)

    numeric = []
    for i in probe:
        up, down = w.copy(), w.copy()
        up[i] += eps
        down[i] -= eps
        numeric.append(
            (loss_and_grad(spec, up, x, y)[0] - loss_and_grad(spec, down, x, y)[0]) / (2 * eps)
        )

    np.testing.assert_allclose(grad[probe], numeric, rtol=2e-2, atol=2e-3)


def test_local_training_is_deterministic_for_a_seed_and_learns() -> None:
    rng = np.random.default_rng(2)
    spec = mlp_spec([6, 16, 3])
    x, y = _blobs(rng)
    w0 = init_weights(spec, np.random.default_rng(3))
    cfg = TrainConfig(epochs=5, batch_size=16, lr=0.1)

    a = train_local(spec, w0, x, y, cfg, np.random.default_rng(4))
    b = train_local(spec, w0, x, y, cfg, np.random.default_rng(4))
    c = train_local(spec, w0, x, y, cfg, np.random.default_rng(5))

    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    assert evaluate(spec, a, x, y)[0] < evaluate(spec, w0, x, y)[0]
    assert evaluate(spec, a, x, y)[1] > 0.9


def test_dirichlet_partition_is_a_disjoint_cover_with_label_skew() -> None:
    labels = np.random.default_rng(6).integers(0, 10, 5000)

    parts = dirichlet_partition(labels, 20, 0.5, np.random.default_rng(7))
    again = dirichlet_partition(labels, 20, 0.5, np.random.default_rng(7))

    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(labels.size))
    assert all(p.size >= 10 for p in parts)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))
    # non-IID: some client's majority class holds far more than the 10% an IID split gives
    shares = [np.bincount(labels[p], minlength=10).max() / p.size for p in parts]
    assert max(shares) > 0.3
