"""The model spec: the ordered list of named tensors every update is checked against."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

from tern.errors import MalformedMessage, ShapeMismatch, brief

__all__ = ["MAX_PARAMS", "MAX_TENSORS", "ModelSpec", "TensorSpec", "parse_shape"]

F32Array = npt.NDArray[np.float32]

MAX_PARAMS = 1 << 28  # 1 GiB of float32: far above any device model, bounds a hostile spec
MAX_TENSORS = 256  # named tensors in one model; bounds a hostile spec's decoding work
_MAX_DIMS = 8


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelSpec:
    """Tensors in wire order; the flat parameter vector is their concatenation."""

    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ShapeMismatch(f"tensor names repeat in the spec: {names}")
        if len(self.tensors) > MAX_TENSORS:
            raise ShapeMismatch(f"a spec of {len(self.tensors)} tensors exceeds {MAX_TENSORS}")
        if self.size > MAX_PARAMS:
            raise ShapeMismatch(f"spec of {self.size} parameters exceeds {MAX_PARAMS}")

    @classmethod
    def of(cls, shapes: Mapping[str, Sequence[int]]) -> ModelSpec:
        return cls(tuple(TensorSpec(n, tuple(int(d) for d in s)) for n, s in shapes.items()))

    @cached_property
    def size(self) -> int:
        return sum(t.size for t in self.tensors)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out, pos = [], 0
        for t in self.tensors:
            out.append(pos)
            pos += t.size
        return tuple(out)

    def split(self, flat: F32Array) -> dict[str, F32Array]:
        """Views of the flat vector, one per tensor, in its shape."""
        if flat.shape != (self.size,):
            raise ShapeMismatch(f"flat vector has shape {flat.shape}, spec needs ({self.size},)")
        return {
            t.name: flat[o : o + t.size].reshape(t.shape)
            for t, o in zip(self.tensors, self.offsets, strict=True)
        }

    def flatten(self, tensors: Mapping[str, npt.ArrayLike]) -> F32Array:
        """Concatenate named tensors (exact shapes) into one float32 vector."""
        if set(tensors) != {t.name for t in self.tensors}:
            raise ShapeMismatch(f"tensors {sorted(tensors)} differ from the spec's names")
        out = np.empty(self.size, dtype=np.float32)
        for t, o in zip(self.tensors, self.offsets, strict=True):
            a = np.asarray(tensors[t.name], dtype=np.float32)
            if a.shape != t.shape:
                raise ShapeMismatch(f"tensor {t.name!r} has shape {a.shape}, spec says {t.shape}")
            out[o : o + t.size] = a.reshape(-1)
        return out

    def to_cbor(self) -> list[list[object]]:
        return [[t.name, list(t.shape)] for t in self.tensors]

    @classmethod
    def from_cbor(cls, value: object) -> ModelSpec:
        if not isinstance(value, list | tuple) or not 0 < len(value) <= MAX_TENSORS:
            raise MalformedMessage(f"spec must be an array of 1-{MAX_TENSORS} [name, shape]")
        tensors = []
        for item in value:
            if not (isinstance(item, list | tuple) and len(item) == 2):
                raise MalformedMessage(f"spec entry {brief(item)} is not [name, shape]")
            name, shape = item
            if not isinstance(name, str) or not name or len(name) > 128:
                raise MalformedMessage(f"spec tensor name {brief(name)} is not a short string")
            tensors.append(TensorSpec(name, parse_shape(shape)))
        return cls(tuple(tensors))


def parse_shape(value: object) -> tuple[int, ...]:
    """A shape from CBOR: an array of at most 8 non-negative ints, product bounded."""
    if not isinstance(value, list | tuple) or len(value) > _MAX_DIMS:
        raise MalformedMessage(f"shape {brief(value)} is not an array of at most {_MAX_DIMS} dims")
    if not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_PARAMS for d in value
    ):
        raise MalformedMessage(f"a dimension of shape {brief(value)} is outside [0, {MAX_PARAMS}]")
    shape = tuple(value)
    if math.prod(shape) > MAX_PARAMS:
        raise MalformedMessage(f"shape {shape} has more than {MAX_PARAMS} elements")
    return shape
