"""The microcontroller model: int8 weights, HMAC-SHA256, integer-only inference.

A gateway derives one of these from each global model for every registered board
(topics.md, "Microcontroller model"). The byte layout is plain little-endian `struct`
so MicroPython parses it without a CBOR library, and inference is exact integer
arithmetic so the board, this module and any other port give the same bits. The wire
format itself (`McuModel`, `McuLayer`) lives in `tern.mcu_format`, re-exported here.
"""

from __future__ import annotations

import hmac
import math
import operator
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
)
from tern.mcu_format import (
    FORMAT_VERSION,
    HEADER,
    MAX_MCU_BYTES,
    TAG_BYTES,
    McuLayer,
    McuModel,
    check_sizes,
)
from tern.mcu_format import MAGIC as MAGIC
from tern.mcu_format import MAX_LAYERS as MAX_LAYERS
from tern.mcu_format import MAX_WIDTH as MAX_WIDTH
from tern.mcu_format import I8Array as I8Array
from tern.mcu_format import I64Array as I64Array
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
KEY_BYTES = 32

_DOMAIN = b"tern-mcu-2\x00"  # per format version: a tag never verifies across them
_BIAS_BITS = 23  # biases keep at least 23 significant bits
_MAX_BIAS_EXP = 30


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
    check_sizes(sizes)
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
    if len(data) < HEADER.size + TAG_BYTES:
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
