"""The microcontroller model: int8 weights, HMAC-SHA256, integer-only inference.

A gateway derives one of these from each global model for every registered board
(topics.md, "Microcontroller model"). The byte layout is plain little-endian `struct`
so MicroPython parses it without a CBOR library, and inference is exact integer
arithmetic so the board, this module and any other port give the same bits.
"""

from __future__ import annotations

import hmac
import itertools
import math
import operator
import struct
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from fractions import Fraction
from hashlib import sha256

import numpy as np
import numpy.typing as npt

from tern.errors import (
    BadSignature,
    MalformedMessage,
    NonFiniteValue,
    PayloadTooLarge,
    ShapeMismatch,
    UnknownSchemaVersion,
)
from tern.spec import ModelSpec
from tern.topics import validate_id

__all__ = [
    "DEFAULT_IN_EXP",
    "FORMAT_VERSION",
    "KEY_BYTES",
    "MAX_MCU_BYTES",
    "TAG_BYTES",
    "McuLayer",
    "McuModel",
    "Prediction",
    "infer",
    "mcu_tag",
    "open_mcu",
    "quantize",
    "quantize_window",
    "seal_mcu",
]

DEFAULT_IN_EXP = 5  # standardized MNIST-1D features: steps of 1/32, range +-3.97
MAX_MCU_BYTES = 65536  # the whole message, tag included
KEY_BYTES = 32
TAG_BYTES = 32
FORMAT_VERSION = 2
MAGIC = b"TMCU"
MAX_LAYERS = 8
MAX_WIDTH = 1024

# magic, version, layers, in_exp, flags, model_version, run
_HEADER = struct.Struct("<4sBBbBIQ")
_LAYER = struct.Struct("<Bbbx")  # m, e_w, e_b, pad
_DOMAIN = b"tern-mcu-2\x00"  # per format version: a tag never verifies across them
_I32 = (-(1 << 31), (1 << 31) - 1)
_BIAS_BITS = 23  # biases keep at least 23 significant bits
_MAX_BIAS_EXP = 30

I8Array = npt.NDArray[np.int8]
I64Array = npt.NDArray[np.int64]


def _body_size(sizes: Sequence[int]) -> int:
    layers = itertools.pairwise(sizes)
    return _HEADER.size + 2 * len(sizes) + sum(_LAYER.size + o * n + 4 * o for n, o in layers)


def _check_sizes(sizes: Sequence[int]) -> None:
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
        _check_sizes(self.sizes)
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
            _HEADER.pack(
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
        if len(body) < _HEADER.size:
            raise MalformedMessage(f"MCU model of {len(body)} bytes is shorter than its header")
        magic, version, n_layers, in_exp, flags, model_version, run = _HEADER.unpack_from(body)
        if magic != MAGIC:
            raise MalformedMessage(f"MCU model magic is {magic!r}, not {MAGIC!r}")
        if version != FORMAT_VERSION:
            raise UnknownSchemaVersion(version, (FORMAT_VERSION,))
        if flags != 0:
            raise MalformedMessage(f"MCU model flags are {flags}, must be 0")
        if not 1 <= n_layers <= MAX_LAYERS:
            raise MalformedMessage(f"an MCU model has 1-{MAX_LAYERS} layers, not {n_layers}")
        pos = _HEADER.size + 2 * (n_layers + 1)
        if len(body) < pos:
            raise MalformedMessage("MCU model truncated in its layer widths")
        sizes = struct.unpack_from(f"<{n_layers + 1}H", body, _HEADER.size)
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


# -- quantization ------------------------------------------------------------------------


def _mlp_layers(spec: ModelSpec, weights: npt.ArrayLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W (in, out), beta (out,)) pairs of an MLP spec as kernels.reference.mlp_spec makes."""
    n = len(spec.tensors) // 2
    names = [t.name for t in spec.tensors]
    if n == 0 or names != [f"{p}{i}" for i in range(n) for p in "wb"]:
        raise ShapeMismatch(f"not an MLP spec (w0, b0, w1, b1, ...): tensors are {names}")
    parts = spec.split(np.asarray(weights, dtype=np.float32))
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(n):
        w, b = parts[f"w{i}"], parts[f"b{i}"]
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise ShapeMismatch(f"layer {i}: w{i} {w.shape} and b{i} {b.shape} do not pair")
        if i and w.shape[0] != out[-1][0].shape[1]:
            raise ShapeMismatch(
                f"w{i} takes {w.shape[0]} inputs, w{i - 1} gives {out[-1][0].shape[1]}"
            )
        out.append((w.astype(np.float64), b.astype(np.float64)))
    if not all(np.isfinite(w).all() and np.isfinite(b).all() for w, b in out):
        raise NonFiniteValue("the model holds NaN or infinity; it cannot be quantized")
    return out


def _weight_scale(a: float) -> tuple[int, int]:
    """The smallest s = m * 2**-e_w (m in 128-255) with s * 127 >= a, as (m, e_w).

    Exact (Fraction), because a scale one ulp too small would clip the largest weight
    and one too large would waste resolution; both would differ between ports.
    """
    if a == 0:
        return 0, 0
    target = Fraction(a) / 127
    # Normalize the target into [128, 256) * 2**-e: s is then the target rounded up on
    # that binade's grid, or the next binade's 128 when it rounds up to 256.
    _, exp2 = math.frexp(a / 127)  # a/127 = f * 2**exp2, f in [0.5, 1)
    e = 8 - exp2
    while target * 2**e >= 256:
        e -= 1
    while target * 2**e < 128:
        e += 1
    m = math.ceil(target * 2**e)
    if m == 256:
        m, e = 128, e - 1
    if not -128 <= e <= 127:
        raise ShapeMismatch(f"largest weight {a!r} needs a scale exponent {e} outside an i8")
    return m, e


def _bias_exponent(beta: np.ndarray) -> int:
    """The largest e_b <= 30 with every |round(beta * 2**e_b)| <= 2**23."""
    big = float(np.abs(beta).max()) if beta.size else 0.0
    e = _MAX_BIAS_EXP
    # Scaling by a power of two is exact in float64, so this test is exact too.
    while e > -128 and np.rint(math.ldexp(big, e)) > 1 << _BIAS_BITS:
        e -= 1
    return e


def quantize(
    spec: ModelSpec,
    weights: npt.ArrayLike,
    model_version: int,
    in_exp: int = DEFAULT_IN_EXP,
    *,
    run: int,
) -> McuModel:
    """The MCU model of an MLP's flat float32 weights (topics.md, "How the gateway quantizes"),
    for global model `model_version` of the coordinator's `run` (the envelope's, both signed).

    `run` has no default: a model stamped with the wrong run would be refused by every
    board (an older run) or would lock them out of the real one (a newer run).
    """
    pairs = _mlp_layers(spec, weights)
    sizes = (pairs[0][0].shape[0], *(w.shape[1] for w, _ in pairs))
    _check_sizes(sizes)
    layers = []
    for w, beta in pairs:
        m, e_w = _weight_scale(float(np.abs(w).max()))
        if m:
            s = math.ldexp(m, -e_w)
            # round-half-to-even in float64; |W / s| <= 127 by the choice of s, so the
            # clamp only guards against the division's last-ulp rounding.
            q = np.clip(np.rint(w / s), -127, 127)
        else:
            q = np.zeros_like(w)
        e_b = _bias_exponent(beta)
        b = np.rint(np.ldexp(beta, e_b))
        # Transposed to (out, in): each output's weights are contiguous on the wire,
        # so a board's inner loop walks one row.
        layers.append(
            McuLayer(m, e_w, e_b, np.ascontiguousarray(q.T.astype(np.int8)), b.astype(np.int64))
        )
    return McuModel(model_version, run, in_exp, sizes, tuple(layers))


def quantize_window(x: npt.ArrayLike, in_exp: int) -> list[int]:
    """A float window as the board's ints: clamp(rint(x * 2**in_exp), -127, 127)."""
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise NonFiniteValue("the window holds NaN or infinity")
    return [int(i) for i in np.clip(np.rint(np.ldexp(v, in_exp)), -127, 127)]


# -- authentication ----------------------------------------------------------------------


def mcu_tag(body: bytes, key: bytes, fleet: str, device: str) -> bytes:
    """HMAC-SHA256 over the domain, fleet, device and body, so a copy for one board
    (or fleet) never verifies on another, even under a shared key."""
    if len(key) != KEY_BYTES:
        raise MalformedMessage(f"a board key is {KEY_BYTES} bytes, not {len(key)}")
    # Validated ids hold no NUL, so the NUL-separated prefix is unambiguous.
    prefix = b"%s%s\x00%s\x00" % (
        _DOMAIN,
        validate_id(fleet, "fleet").encode(),
        validate_id(device, "device").encode(),
    )
    return hmac.new(key, prefix + bytes(body), sha256).digest()


def seal_mcu(body: bytes, key: bytes, fleet: str, device: str) -> bytes:
    """Body and its tag: the payload of `topics.mcu_model(fleet, device)`."""
    if len(body) + TAG_BYTES > MAX_MCU_BYTES:
        raise PayloadTooLarge(len(body) + TAG_BYTES, MAX_MCU_BYTES)
    return bytes(body) + mcu_tag(body, key, fleet, device)


def open_mcu(data: bytes, key: bytes, fleet: str, device: str) -> McuModel:
    """Check size, then the tag (constant time, before parsing anything), then parse."""
    if len(data) > MAX_MCU_BYTES:
        raise PayloadTooLarge(len(data), MAX_MCU_BYTES)
    if len(data) < _HEADER.size + TAG_BYTES:
        raise MalformedMessage(f"MCU model of {len(data)} bytes is too short")
    body, tag = bytes(data[:-TAG_BYTES]), bytes(data[-TAG_BYTES:])
    if not hmac.compare_digest(tag, mcu_tag(body, key, fleet, device)):
        raise BadSignature(f"MCU model tag does not verify for {fleet}/{device}")
    return McuModel.from_bytes(body)


# -- inference ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prediction:
    label: int
    logits: tuple[int, ...]  # each stands for logit * 2**-exp
    exp: int
    confidence: float


def _rshift(v: int, k: int) -> int:
    """v / 2**k rounded to nearest, halves up (>> floors, also for negatives)."""
    return (v + (1 << (k - 1))) >> k


def infer(model: McuModel, window: Sequence[int]) -> Prediction:
    """Integer-only inference, exactly as topics.md "Inference" says, bit for bit."""
    if len(window) != model.sizes[0]:
        raise ShapeMismatch(f"window of {len(window)} values, the model takes {model.sizes[0]}")
    try:
        x = [operator.index(v) for v in window]
    except TypeError as exc:
        raise MalformedMessage("window values must be integers") from exc
    if not all(-127 <= v <= 127 for v in x):
        raise MalformedMessage("window values must be in -127..127")
    e = model.in_exp
    y: list[int] = []
    big_e = e
    last = len(model.layers) - 1
    for i, layer in enumerate(model.layers):
        big_e = layer.e_w + e
        # |acc| <= 127 * 128 * 1024 < 2**24, so int64 is exact here.
        acc = (layer.weights.astype(np.int64) @ np.asarray(x, dtype=np.int64)).tolist()
        d = layer.e_b - big_e
        bias = [int(b) for b in layer.bias]
        c = [_rshift(b, d) for b in bias] if d > 0 else [b << -d for b in bias]
        y = [a * layer.m + cj for a, cj in zip(acc, c, strict=True)]
        if i == last:
            break
        y = [max(v, 0) for v in y]
        top = max(y)
        k = max(0, top.bit_length() - 7)
        while k and _rshift(top, k) > 127:  # k = 0 means top <= 127 already
            k += 1
        x = [max(-127, min(127, _rshift(v, k))) for v in y] if k else y
        e = big_e - k
    label = max(range(len(y)), key=lambda j: (y[j], -j))
    total = 0.0
    for v in y:
        with suppress(OverflowError):  # a gap too large for a float: exp(-huge) is 0
            total += math.exp(math.ldexp(v - y[label], -big_e))
    return Prediction(label, tuple(y), big_e, 1.0 / total)
