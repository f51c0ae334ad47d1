"""MNIST-1D, generated offline, and a Dirichlet label-skew split across clients.

MNIST-1D (Greydanus 2020) is 40 float features, 10 classes: small enough for a
microcontroller, hard enough that a linear model and an MLP differ. The `mnist1d`
package generates it from templates without the network.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Dataset", "dirichlet_partition", "load_mnist1d"]

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Dataset:
    x: F32Array  # (n_train, 40), standardized with the training statistics
    y: IntArray
    x_test: F32Array
    y_test: IntArray


def load_mnist1d(num_samples: int = 10_000, seed: int = 42, train_split: float = 0.8) -> Dataset:
    """Generate MNIST-1D; features standardized per column with train mean and std."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = train_split
    # make_dataset seeds the global `random` and numpy generators; put them back so
    # generating data does not change anyone else's random stream.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.asarray(data["x"], dtype=np.float64)
    x_test = np.asarray(data["x_test"], dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    return Dataset(
        x=((x - mean) / std).astype(np.float32),
        y=np.asarray(data["y"], dtype=np.int64),
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=np.asarray(data["y_test"], dtype=np.int64),
    )


def dirichlet_partition(
    labels: npt.ArrayLike,
    n_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
) -> list[IntArray]:
    """Split sample indices across clients with Dirichlet(alpha) label skew.

    Each client first gets `min_size` samples dealt from a random permutation, so no
    client is empty by construction (no resample-until-it-works loop); the rest of each
    class is split by proportions drawn from Dirichlet(alpha) over clients. Smaller
    alpha, more skew. Returns sorted index arrays, one per client, that partition
    ``range(len(labels))``.
    """
    y = np.asarray(labels).reshape(-1)
    if n_clients < 1 or alpha <= 0 or min_size < 0:
        raise ValueError("need n_clients >= 1, alpha > 0 and min_size >= 0")
    if n_clients * min_size > y.size:
        raise ValueError(f"{y.size} samples cannot give {n_clients} clients {min_size} each")
    order = rng.permutation(y.size)
    reserved = order[: n_clients * min_size]
    parts: list[list[IntArray]] = [[reserved[c::n_clients]] for c in range(n_clients)]
    rest = order[n_clients * min_size :]
    for label in np.unique(y):
        idx = rest[y[rest] == label]  # already in random order
        share = rng.dirichlet(np.full(n_clients, alpha))
        cuts = (np.cumsum(share)[:-1] * idx.size).astype(np.int64)
        for c, chunk in enumerate(np.split(idx, cuts)):
            parts[c].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
