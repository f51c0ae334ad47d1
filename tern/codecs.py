"""Tensor codecs behind one interface: float32, float16, ternary and sparse ternary.

A codec turns one float32 tensor into its wire value and back. Receiving is split in
two steps, `check` then `CheckedTensor.add_to`, so that a component validates every
tensor of an update before it touches its accumulator: a bad last tensor must not
leave the first ones half-added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Protocol

import numpy as np
import numpy.typing as npt
from cbor2 import CBORTag

from tern import trits as trit_pack
from tern.errors import MalformedMessage, NonFiniteValue, ShapeMismatch, UnknownCodec, brief
from tern.quantize import DEFAULT_RULE, TernaryRule, optimal_cut, ternarize
from tern.sparse import check_sparse, encode_sparse, max_count
from tern.spec import parse_shape
from tern.tensors import TypedArrayTag, decode_array, encode_array

__all__ = [
    "CheckedTensor",
    "Codec",
    "CodecName",
    "Float16Codec",
    "Float32Codec",
    "SparseTernaryCodec",
    "TernaryCodec",
    "codec_for",
    "decode",
]

F32Array = npt.NDArray[np.float32]


class CodecName(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    TERNARY = "ternary"
    SPARSE = "sparse"  # sparse ternary: top-k trits, positions Rice-coded (tern.sparse)


class CheckedTensor(Protocol):
    """A validated wire tensor, ready to be added into an accumulator."""

    def add_to(self, acc: F32Array) -> None:
        """``acc += value`` for a flat float32 `acc` of the tensor's size."""

    def sq_norm(self) -> float:
        """The squared L2 norm of the value, in float64."""


class Codec(Protocol):
    name: ClassVar[CodecName]

    def encode(self, x: F32Array) -> tuple[object, F32Array]:
        """(wire value, what the receiver will decode); the second feeds error feedback."""

    def check(self, wire: object, shape: tuple[int, ...], what: str) -> CheckedTensor:
        """Validate `wire` against `shape`; raise a TernError naming `what` when wrong."""


def decode(codec: Codec, wire: object, shape: tuple[int, ...], what: str = "tensor") -> F32Array:
    """The float32 tensor a wire value stands for."""
    out = np.zeros(int(np.prod(shape)), dtype=np.float32)
    codec.check(wire, shape, what).add_to(out)
    return out.reshape(shape)


def _finite(x: F32Array, what: str) -> F32Array:
    if isinstance(x, np.ndarray) and x.dtype == np.float32:
        a = x  # the usual case; errstate costs more than the check on a small tensor
    else:
        with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf, caught below
            a = np.asarray(x, dtype=np.float32)
    if not np.isfinite(a).all():
        raise NonFiniteValue(f"{what}: cannot encode NaN or infinity")
    return a


@dataclass(frozen=True, slots=True)
class _Dense:
    values: npt.NDArray[np.generic]

    def add_to(self, acc: F32Array) -> None:
        np.add(acc, self.values.reshape(-1), out=acc, casting="unsafe")

    def sq_norm(self) -> float:
        v = self.values.reshape(-1).astype(np.float64)
        return float(np.dot(v, v))


@dataclass(frozen=True, slots=True)
class Float32Codec:
    name: ClassVar[CodecName] = CodecName.FLOAT32

    def encode(self, x: F32Array) -> tuple[object, F32Array]:
        a = _finite(x, "float32 tensor")
        return encode_array(a, TypedArrayTag.FLOAT32_LE), a

    def check(self, wire: object, shape: tuple[int, ...], what: str) -> CheckedTensor:
        return _Dense(decode_array(wire, shape, TypedArrayTag.FLOAT32_LE, what))


@dataclass(frozen=True, slots=True)
class Float16Codec:
    name: ClassVar[CodecName] = CodecName.FLOAT16

    def encode(self, x: F32Array) -> tuple[object, F32Array]:
        a = _finite(x, "float16 tensor")
        with np.errstate(over="ignore"):
            h = a.astype(np.float16)
        if not np.isfinite(h).all():
            raise NonFiniteValue("float16 tensor: a value overflows float16 (|x| > 65504)")
        return encode_array(h, TypedArrayTag.FLOAT16_LE), h.astype(np.float32)

    def check(self, wire: object, shape: tuple[int, ...], what: str) -> CheckedTensor:
        return _Dense(decode_array(wire, shape, TypedArrayTag.FLOAT16_LE, what))


@dataclass(frozen=True, slots=True)
class _Ternary:
    packed: npt.NDArray[np.uint8]
    scale: np.float32

    def add_to(self, acc: F32Array) -> None:
        trit_pack.accumulate_packed(acc, self.packed, self.scale)

    def sq_norm(self) -> float:
        return float(self.scale) ** 2 * trit_pack.count_nonzero(self.packed)


_TERNARY_KEYS = frozenset({"shape", "scale", "trits"})


@dataclass(frozen=True, slots=True)
class TernaryCodec:
    """{"shape": [...], "scale": float, "trits": uint8 typed array}, layout in tern.trits.

    `rng` is used only by the stochastic rule; the default rule is deterministic.
    """

    rule: TernaryRule = DEFAULT_RULE
    rng: np.random.Generator | None = field(default=None, compare=False)
    name: ClassVar[CodecName] = CodecName.TERNARY

    def encode(self, x: F32Array) -> tuple[object, F32Array]:
        if self.rule is TernaryRule.OPTIMAL and isinstance(x, np.ndarray) and x.dtype == np.float32:
            fast = self._encode_optimal(x)
            if fast is not None:
                return fast
        a = _finite(x, "ternary tensor")
        t, scale = ternarize(a, self.rule, self.rng)
        decoded = np.multiply(t, scale, dtype=np.float32)
        return self._wire(a.shape, scale, trit_pack.pack(t)), decoded

    def _encode_optimal(self, x: F32Array) -> tuple[object, F32Array] | None:
        """The device's hot path (issue 13), the same bytes as the general one: the trits
        go straight from the threshold to packed digits, and the rule's float64 sums make
        the scale finite exactly when every value is, so finiteness costs no pass. None
        when ties at the cut are left out: then the general path."""
        flat = x.reshape(-1)
        cut, scale, _, exact = optimal_cut(flat)
        if not math.isfinite(scale):
            raise NonFiniteValue("ternary tensor: cannot encode NaN or infinity")
        if not exact:
            return None
        packed, digits = trit_pack.pack_cut(flat, cut)
        trits = digits.view(np.int8) - np.int8(1)
        decoded = np.multiply(trits, scale, dtype=np.float32).reshape(x.shape)
        return self._wire(x.shape, scale, packed), decoded

    @staticmethod
    def _wire(shape: tuple[int, ...], scale: np.float32, packed: bytes) -> dict[str, object]:
        return {
            "shape": list(shape),
            "scale": float(scale),
            "trits": CBORTag(int(TypedArrayTag.UINT8), packed),
        }

    def check(self, wire: object, shape: tuple[int, ...], what: str) -> CheckedTensor:
        if not isinstance(wire, Mapping) or set(wire) != _TERNARY_KEYS:
            raise MalformedMessage(f"{what}: a ternary tensor is a map of shape, scale, trits")
        got = parse_shape(wire["shape"])
        if got != shape:
            raise ShapeMismatch(f"{what}: shape {got} differs from the spec's {shape}")
        scale = wire["scale"]
        if not isinstance(scale, float | int) or isinstance(scale, bool):
            raise MalformedMessage(f"{what}: scale is not a number")
        try:
            with np.errstate(over="ignore"):
                s32 = np.float32(scale)
        except OverflowError:  # a CBOR bignum beyond any float
            raise NonFiniteValue(f"{what}: scale {brief(scale)} is not finite in float32") from None
        if not np.isfinite(s32):
            raise NonFiniteValue(f"{what}: scale {brief(scale)} is not finite in float32")
        if s32 < 0:
            raise MalformedMessage(f"{what}: scale {brief(scale)} is negative")
        data = wire["trits"]
        if not (
            isinstance(data, CBORTag)
            and data.tag == TypedArrayTag.UINT8
            and isinstance(data.value, bytes)
        ):
            raise MalformedMessage(f"{what}: trits must be a uint8 typed array (tag 64)")
        packed = trit_pack.validate_packed(data.value, int(np.prod(shape)), what)
        return _Ternary(packed, s32)


@dataclass(frozen=True, slots=True)
class SparseTernaryCodec:
    """Top-k trits of each tensor, k = `max_count(density, n)`; wire form in tern.sparse.

    Encoding keeps the k largest magnitudes as +-mean, the rest zero; it returns what the
    receiver decodes so that callers keep the rest as error feedback. A receiver refuses
    a tensor keeping more than k entries: `density` is the schedule's.
    """

    density: float
    name: ClassVar[CodecName] = CodecName.SPARSE

    def __post_init__(self) -> None:
        max_count(self.density, 1)  # ValueError unless in (0, 1]

    def encode(self, x: F32Array) -> tuple[object, F32Array]:
        a = _finite(x, "sparse tensor")
        return encode_sparse(a, max_count(self.density, a.size))

    def check(self, wire: object, shape: tuple[int, ...], what: str) -> CheckedTensor:
        most = max_count(self.density, math.prod(shape))
        return check_sparse(wire, shape, most, what)


def codec_for(
    name: str, rng: np.random.Generator | None = None, *, density: float | None = None
) -> Codec:
    """The codec a fleet or an update names; UnknownCodec for anything else. The sparse
    codec needs the schedule's `density`: without one (a round that gives none) a sparse
    update is refused as UnknownCodec too; the other codecs ignore it."""
    if name == CodecName.FLOAT32:
        return Float32Codec()
    if name == CodecName.FLOAT16:
        return Float16Codec()
    if name == CodecName.TERNARY:
        return TernaryCodec(rng=rng)
    if name == CodecName.SPARSE:
        if density is None:
            raise UnknownCodec("codec 'sparse' needs a density, and this round gives none")
        return SparseTernaryCodec(density)
    raise UnknownCodec(f"codec {brief(name)} is not one of {[str(c) for c in CodecName]}")
