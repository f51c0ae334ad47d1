"""Tensors as RFC 8746 typed arrays: tag 40 [shape, typed array], little-endian."""

from __future__ import annotations

import math
from enum import IntEnum

import numpy as np
import numpy.typing as npt
from cbor2 import CBORTag

from tern.errors import MalformedMessage, NonFiniteValue, ShapeMismatch
from tern.spec import parse_shape

__all__ = ["TypedArrayTag", "decode_array", "encode_array"]

TAG_MULTI_DIM = 40  # RFC 8746 multi-dimensional array, row-major


class TypedArrayTag(IntEnum):
    UINT8 = 64
    FLOAT16_LE = 84
    FLOAT32_LE = 85


_DTYPES: dict[TypedArrayTag, np.dtype[np.generic]] = {
    TypedArrayTag.UINT8: np.dtype(np.uint8),
    TypedArrayTag.FLOAT16_LE: np.dtype("<f2"),
    TypedArrayTag.FLOAT32_LE: np.dtype("<f4"),
}


def encode_array(a: npt.NDArray[np.generic], tag: TypedArrayTag) -> CBORTag:
    """Tag 40 [[dims...], tag(bytes)] for `a` stored as `tag`'s element type."""
    data = np.asarray(a, dtype=_DTYPES[tag])  # not ascontiguousarray: it makes 0-d 1-d
    return CBORTag(TAG_MULTI_DIM, [list(data.shape), CBORTag(int(tag), data.tobytes())])


def decode_array(
    value: object, shape: tuple[int, ...], tag: TypedArrayTag, what: str
) -> npt.NDArray[np.generic]:
    """Check `value` is a tag-40 array of `tag` elements with exactly `shape`.

    Returns a read-only view on the message's bytes, reshaped. Floats must be finite.
    """
    if not (isinstance(value, CBORTag) and value.tag == TAG_MULTI_DIM):
        raise MalformedMessage(f"{what}: expected a tag {TAG_MULTI_DIM} typed array")
    inner = value.value
    if not (isinstance(inner, list | tuple) and len(inner) == 2):
        raise MalformedMessage(f"{what}: tag {TAG_MULTI_DIM} must hold [shape, array]")
    got_shape = parse_shape(inner[0])
    if got_shape != shape:
        raise ShapeMismatch(f"{what}: shape {got_shape} differs from the spec's {shape}")
    data = inner[1]
    if not (isinstance(data, CBORTag) and data.tag == tag and isinstance(data.value, bytes)):
        raise MalformedMessage(f"{what}: expected typed array tag {int(tag)} ({tag.name})")
    dtype = _DTYPES[tag]
    expected = math.prod(shape) * dtype.itemsize
    if len(data.value) != expected:
        raise ShapeMismatch(f"{what}: {len(data.value)} bytes, shape {shape} needs {expected}")
    arr = np.frombuffer(data.value, dtype=dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(arr).all():
        raise NonFiniteValue(f"{what}: holds NaN or infinity")
    return arr
