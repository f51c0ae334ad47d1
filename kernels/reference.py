"""The numpy reference trainer: a dense MLP, ReLU hidden layers, softmax cross-entropy.

Logistic regression is the case with no hidden layer. Weights travel as one flat
float32 vector in `ModelSpec` order ("w0", "b0", "w1", "b1", ...; w is (in, out), b is
(out,)), so a trainer's output is what `encode_update` expects, with no reshuffling.

This module is the oracle other trainers (the WebAssembly kernel, device firmware) are
checked against, and the default device trainer: pure functions, float32 throughout,
and all randomness from an explicit `numpy.random.Generator`, so one seed gives one
result bit for bit on one machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import numpy.typing as npt

from tern.messages import TrainConfig
from tern.spec import ModelSpec

__all__ = [
    "evaluate",
    "forward",
    "init_weights",
    "loss_and_grad",
    "mlp_spec",
    "train_local",
]

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.integer]


def mlp_spec(sizes: Sequence[int]) -> ModelSpec:
    """The spec of an MLP with layer widths `sizes`, input first, classes last."""
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"an MLP needs at least two positive layer sizes, got {list(sizes)}")
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (n_in, n_out) in enumerate(pairwise(sizes)):
        shapes[f"w{i}"] = (int(n_in), int(n_out))
        shapes[f"b{i}"] = (int(n_out),)
    return ModelSpec.of(shapes)


def _layers(spec: ModelSpec, flat: F32Array) -> list[tuple[F32Array, F32Array]]:
    """(w, b) views into `flat`, one pair per layer."""
    n = len(spec.tensors) // 2
    if [t.name for t in spec.tensors] != [f"{p}{i}" for i in range(n) for p in "wb"]:
        raise ValueError("not an MLP spec: tensors must be w0, b0, w1, b1, ...")
    parts = spec.split(flat)
    return [(parts[f"w{i}"], parts[f"b{i}"]) for i in range(n)]


def init_weights(spec: ModelSpec, rng: np.random.Generator) -> F32Array:
    """He-normal weights (std sqrt(2 / fan_in)) and zero biases, flat float32."""
    flat = np.zeros(spec.size, dtype=np.float32)
    for w, _ in _layers(spec, flat):
        std = np.sqrt(2.0 / w.shape[0])
        w[...] = rng.standard_normal(w.shape, dtype=np.float32) * np.float32(std)
    return flat


def _activations(layers: list[tuple[F32Array, F32Array]], x: F32Array) -> list[F32Array]:
    """The input, each hidden layer after ReLU, and the logits."""
    acts = [np.asarray(x, dtype=np.float32)]
    for i, (w, b) in enumerate(layers):
        z = acts[-1] @ w + b
        if i < len(layers) - 1:
            np.maximum(z, np.float32(0.0), out=z)
        acts.append(z)
    return acts


def forward(spec: ModelSpec, weights: F32Array, x: F32Array) -> F32Array:
    """Logits, shape (batch, classes)."""
    return _activations(_layers(spec, weights), x)[-1]


def _log_softmax(logits: F32Array) -> F32Array:
    z = logits - logits.max(axis=1, keepdims=True)
    out: F32Array = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def loss_and_grad(
    spec: ModelSpec, weights: F32Array, x: F32Array, y: IntArray
) -> tuple[float, F32Array]:
    """Mean cross-entropy over the batch and its gradient, flat in spec order."""
    layers = _layers(spec, weights)
    acts = _activations(layers, x)
    n = x.shape[0]
    rows = np.arange(n)
    logp = _log_softmax(acts[-1])
    loss = float(-logp[rows, y].mean(dtype=np.float64))
    # d loss / d logits = (softmax - onehot) / n
    g = np.exp(logp)
    g[rows, y] -= np.float32(1.0)
    g *= np.float32(1.0 / n)
    grad = np.empty(spec.size, dtype=np.float32)
    for i in range(len(layers) - 1, -1, -1):
        gw, gb = _layers(spec, grad)[i]
        np.matmul(acts[i].T, g, out=gw)
        g.sum(axis=0, out=gb)
        if i > 0:
            g = g @ layers[i][0].T
            g *= acts[i] > 0  # ReLU: the activation is positive exactly where it passed
    return loss, grad


def train_local(
    spec: ModelSpec,
    weights: F32Array,
    x: F32Array,
    y: IntArray,
    config: TrainConfig,
    rng: np.random.Generator,
) -> F32Array:
    """`config.epochs` epochs of minibatch SGD from `weights`; returns new flat weights.

    Each epoch visits the samples in an order drawn from `rng`; the last batch of an
    epoch may be short. `weights` is not modified.
    """
    w = np.array(weights, dtype=np.float32, copy=True)
    lr = np.float32(config.lr)
    n = x.shape[0]
    for _ in range(config.epochs):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            _, grad = loss_and_grad(spec, w, x[batch], y[batch])
            grad *= lr
            w -= grad
    return w


def evaluate(spec: ModelSpec, weights: F32Array, x: F32Array, y: IntArray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy as a fraction in [0, 1])."""
    logp = _log_softmax(forward(spec, weights, x))
    loss = float(-logp[np.arange(x.shape[0]), y].mean(dtype=np.float64))
    accuracy = float((logp.argmax(axis=1) == y).mean())
    return loss, accuracy
