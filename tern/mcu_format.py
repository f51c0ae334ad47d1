"""The microcontroller model's wire format: int8 layers behind a little-endian header.

`McuModel.to_bytes` and `McuModel.from_bytes` are the body a board's tag covers
(topics.md, "Microcontroller model"): plain `struct`, so MicroPython parses it without
a CBOR library. `tern.mcu` quantizes, tags and runs these models, and re-exports this
module's public names.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tern.errors import MalformedMessage, PayloadTooLarge, ShapeMismatch, UnknownSchemaVersion

__all__ = [
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "MAX_LAYERS",
    "MAX_MCU_BYTES",
    "MAX_WIDTH",
    "TAG_BYTES",
    "I8Array",
    "I64Array",
    "McuLayer",
    "McuModel",
    "check_sizes",
]

MAX_MCU_BYTES = 65536  # the whole message, tag included
TAG_BYTES = 32
FORMAT_VERSION = 2
MAGIC = b"TMCU"
MAX_LAYERS = 8
MAX_WIDTH = 1024

# magic, version, layers, in_exp, flags, model_version, run
HEADER = struct.Struct("<4sBBbBIQ")
_LAYER = struct.Struct("<Bbbx")  # m, e_w, e_b, pad
_I32 = (-(1 << 31), (1 << 31) - 1)

I8Array = npt.NDArray[np.int8]
I64Array = npt.NDArray[np.int64]


def _body_size(sizes: Sequence[int]) -> int:
    layers = itertools.pairwise(sizes)
    return HEADER.size + 2 * len(sizes) + sum(_LAYER.size + o * n + 4 * o for n, o in layers)


def check_sizes(sizes: Sequence[int]) -> None:
    if not 1 <= len(sizes) - 1 <= MAX_LAYERS:
        raise ShapeMismatch(f"an MCU model has 1-{MAX_LAYERS} layers, not {len(sizes) - 1}")
    if not all(1 <= s <= MAX_WIDTH for s in sizes):
        raise ShapeMismatch(f"layer widths {list(sizes)} must each be 1-{MAX_WIDTH}")
    size = _body_size(sizes) + TAG_BYTES
    if size > MAX_MCU_BYTES:
        raise PayloadTooLarge(size, MAX_MCU_BYTES)


@dataclass(frozen=True, slots=True)
class McuLayer:
    """One dense layer as on the wire: weights stand for `w * m * 2**-e_w`, biases `b * 2**-e_b`."""

    m: int
    e_w: int
    e_b: int
    weights: I8Array  # (out, in): output-major, each output's weights contiguous
    bias: I64Array  # (out,), i32 values

    def __post_init__(self) -> None:
        if not (self.m == 0 or 128 <= self.m <= 255):
            raise MalformedMessage(f"weight scale mantissa {self.m} is not 0 or 128-255")
        if not (-128 <= self.e_w <= 127 and -128 <= self.e_b <= 127):
            raise MalformedMessage(f"exponents {self.e_w}, {self.e_b} do not fit an i8")
        if self.weights.dtype != np.int8 or self.weights.ndim != 2:
            raise ShapeMismatch("layer weights must be a 2-d int8 array (out, in)")
        if self.m == 0 and self.weights.any():
            raise MalformedMessage("a zero weight scale needs every weight to be zero")
        if self.bias.dtype != np.int64 or self.bias.shape != self.weights.shape[:1]:
            raise ShapeMismatch("layer bias must be int64 of shape (out,)")
        if self.bias.size and not (_I32[0] <= self.bias.min() and self.bias.max() <= _I32[1]):
            raise MalformedMessage("a bias does not fit an i32")

    def __eq__(self, other: object) -> bool:  # arrays compare by value, not elementwise
        if not isinstance(other, McuLayer):
            return NotImplemented
        return (
            (self.m, self.e_w, self.e_b) == (other.m, other.e_w, other.e_b)
            and np.array_equal(self.weights, other.weights)
            and np.array_equal(self.bias, other.bias)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside


@dataclass(frozen=True, slots=True)
class McuModel:
    """A model as on the wire. Boards order models by `order`, (run, model_version): the
    coordinator's run first, so a new run's version 0 is newer than any of an old run."""

    model_version: int
    run: int
    in_exp: int
    sizes: tuple[int, ...]
    layers: tuple[McuLayer, ...]

    def __post_init__(self) -> None:
        check_sizes(self.sizes)
        if not 0 <= self.model_version < 1 << 32:
            raise MalformedMessage("model version is not a u32")  # not formatted: unbounded
        if not 0 <= self.run < 1 << 64:
            raise MalformedMessage("run is not a u64")
        if not -128 <= self.in_exp <= 127:
            raise MalformedMessage(f"input exponent {self.in_exp} does not fit an i8")
        shapes = [layer.weights.shape for layer in self.layers]
        if shapes != [(o, n) for n, o in zip(self.sizes[:-1], self.sizes[1:], strict=True)]:
            raise ShapeMismatch(f"layer shapes {shapes} do not match widths {self.sizes}")

    @property
    def order(self) -> tuple[int, int]:
        """(run, model_version): a board runs a model only when this is greater than its own."""
        return self.run, self.model_version

    def to_bytes(self) -> bytes:
        """The body: everything the tag covers."""
        parts = [
            HEADER.pack(
                MAGIC,
                FORMAT_VERSION,
                len(self.layers),
                self.in_exp,
                0,
                self.model_version,
                self.run,
            ),
            struct.pack(f"<{len(self.sizes)}H", *self.sizes),
        ]
        for layer in self.layers:
            parts.append(_LAYER.pack(layer.m, layer.e_w, layer.e_b))
            parts.append(layer.weights.tobytes())
            parts.append(layer.bias.astype("<i4").tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, body: bytes) -> McuModel:
        """Parse a body (no tag), strictly: its length must be exactly what it declares."""
        body = bytes(body)
        if len(body) + TAG_BYTES > MAX_MCU_BYTES:
            raise PayloadTooLarge(len(body) + TAG_BYTES, MAX_MCU_BYTES)
        if len(body) < HEADER.size:
            raise MalformedMessage(f"MCU model of {len(body)} bytes is shorter than its header")
        magic, version, n_layers, in_exp, flags, model_version, run = HEADER.unpack_from(body)
        if magic != MAGIC:
            raise MalformedMessage(f"MCU model magic is {magic!r}, not {MAGIC!r}")
        if version != FORMAT_VERSION:
            raise UnknownSchemaVersion(version, (FORMAT_VERSION,))
        if flags != 0:
            raise MalformedMessage(f"MCU model flags are {flags}, must be 0")
        if not 1 <= n_layers <= MAX_LAYERS:
            raise MalformedMessage(f"an MCU model has 1-{MAX_LAYERS} layers, not {n_layers}")
        pos = HEADER.size + 2 * (n_layers + 1)
        if len(body) < pos:
            raise MalformedMessage("MCU model truncated in its layer widths")
        sizes = struct.unpack_from(f"<{n_layers + 1}H", body, HEADER.size)
        if not all(1 <= s <= MAX_WIDTH for s in sizes):
            raise MalformedMessage(f"layer widths {list(sizes)} must each be 1-{MAX_WIDTH}")
        if len(body) != _body_size(sizes):
            raise MalformedMessage(
                f"MCU model is {len(body)} bytes, its widths {list(sizes)} "
                f"imply {_body_size(sizes)}"
            )
        layers = []
        for n, o in itertools.pairwise(sizes):
            m, e_w, e_b = _LAYER.unpack_from(body, pos)
            if body[pos + 3] != 0:
                raise MalformedMessage("MCU layer padding byte is not 0")
            pos += _LAYER.size
            w = np.frombuffer(body, dtype=np.int8, count=o * n, offset=pos).reshape(o, n)
            pos += o * n
            b = np.frombuffer(body, dtype="<i4", count=o, offset=pos).astype(np.int64)
            pos += 4 * o
            layers.append(McuLayer(m, e_w, e_b, w.copy(), b))
        return cls(model_version, run, in_exp, tuple(sizes), tuple(layers))
