"""The global model on its way down: compressed deltas between versions, and the
model's hash that every receiver checks (topics.md "model_delta").

The coordinator publishes, after every round, the change from the model version every
receiver holds to the next one, in a codec (ternary by default) with error feedback on
the coordinator's side: what quantization dropped stays in the coordinator's residual
and rides in a later delta. The published model *is* the base plus the decoded delta,
computed through the same decoder every receiver runs, so a receiver that holds the
base holds, after applying the delta, exactly the coordinator's model bytes; the
delta's signed `hash` (and the schedule's `model_hash`) prove it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cbor2
import numpy as np
import numpy.typing as npt

from tern.aggregate import Partial
from tern.caps import contribution_caps
from tern.cbor import Caps
from tern.codecs import CheckedTensor, Codec, CodecName, codec_for
from tern.errors import NonFiniteValue, ShapeMismatch
from tern.fields import body_map, codec_field, digest_field, uint_field
from tern.messages import GlobalModel
from tern.spec import ModelSpec
from tern.strategies import ServerState, Strategy

__all__ = [
    "DOWNLINK_BUFFER",
    "CheckedDelta",
    "Compressed",
    "CompressedDownlink",
    "ModelDelta",
    "compress",
    "delta_caps",
    "downlink_strategy",
    "model_hash",
]

F32Array = npt.NDArray[np.float32]

_DOMAIN = b"tern-model-v1\x00"
_KEYS = frozenset({"base", "base_hash", "hash", "codec", "tensors"})
_HASH_BYTES = 2 * (12 + 34)  # two keys with their 32-byte strings


def model_hash(spec: ModelSpec, weights: F32Array) -> bytes:
    """SHA-256 of a model: a domain tag, its spec as canonical CBOR, then its weights as
    float32 little-endian, spec order."""
    h = hashlib.sha256(_DOMAIN)
    h.update(cbor2.dumps(spec.to_cbor(), canonical=True))
    h.update(np.ascontiguousarray(weights, dtype="<f4").tobytes())
    return h.digest()


def delta_caps(spec: ModelSpec) -> Caps:
    """The largest delta of a model of `spec` in any codec: a float32 one, or a sparse
    one keeping every entry (its framing is larger for tensors of one or two values)."""
    dense = contribution_caps(spec, CodecName.FLOAT32, partial=False)
    sparse = contribution_caps(spec, CodecName.SPARSE, partial=False, density=1.0)
    return Caps(
        max(dense.max_bytes, sparse.max_bytes) + _HASH_BYTES,
        max(dense.max_items, sparse.max_items) + 4,
    )


@dataclass(frozen=True, slots=True)
class ModelDelta:
    """What the coordinator sends down: version `base` (whose hash is `base_hash`) plus
    `tensors` (in `codec`'s wire form, spec order) is the model whose hash is `hash`."""

    base: int
    base_hash: bytes
    hash: bytes
    codec: CodecName
    tensors: tuple[object, ...]

    def to_body(self) -> dict[str, object]:
        return {
            "base": self.base,
            "base_hash": self.base_hash,
            "hash": self.hash,
            "codec": str(self.codec),
            "tensors": list(self.tensors),
        }


@dataclass(frozen=True, slots=True)
class CheckedDelta:
    """A delta whose every tensor was checked against the spec: ready to apply."""

    base: int
    base_hash: bytes
    hash: bytes
    codec: CodecName
    tensors: tuple[CheckedTensor, ...]

    @classmethod
    def from_body(cls, body: object, spec: ModelSpec) -> CheckedDelta:
        """Check a delta's body against the spec of the model it applies to; every tensor
        is checked before any is used."""
        m = body_map(body, _KEYS, "model_delta")
        codec = codec_field(m["codec"])
        tensors = m["tensors"]
        if not isinstance(tensors, list | tuple) or len(tensors) != len(spec.tensors):
            raise ShapeMismatch(f"a delta holds tensors unlike the spec's {len(spec.tensors)}")
        c = _decoder(codec, spec)
        checked = tuple(
            c.check(w, t.shape, f"delta {t.name!r}")
            for t, w in zip(spec.tensors, tensors, strict=True)
        )
        return cls(
            base=uint_field(m["base"], "model_delta.base"),
            base_hash=bytes.fromhex(digest_field(m["base_hash"], "model_delta.base_hash")),
            hash=bytes.fromhex(digest_field(m["hash"], "model_delta.hash")),
            codec=codec,
            tensors=checked,
        )

    def apply(self, model: GlobalModel) -> GlobalModel:
        """The model after this delta; NonFiniteValue when a weight would not be finite."""
        out = np.array(model.weights, dtype=np.float32, copy=True)
        for t, o, c in zip(model.spec.tensors, model.spec.offsets, self.tensors, strict=True):
            c.add_to(out[o : o + t.size])
        if not np.isfinite(out).all():
            raise NonFiniteValue("a delta would make the model non-finite")
        return GlobalModel(model.spec, out)


def _decoder(codec: CodecName, spec: ModelSpec) -> Codec:
    if codec is CodecName.SPARSE:  # a delta may keep any share of the entries
        return codec_for(codec, density=1.0)
    return codec_for(codec)


@dataclass(frozen=True, slots=True)
class Compressed:
    """A compressed step: the delta to publish, the model it makes, the new residual."""

    delta: ModelDelta
    model: GlobalModel
    residual: F32Array


def compress(
    codec: Codec, held: GlobalModel, base: int, target: F32Array, residual: F32Array | None
) -> Compressed:
    """The delta from `held` (version `base`) towards `target` plus the residual: the
    published model is `held` plus the decoded delta, applied exactly as a receiver
    applies it, and the new residual is what that model still lags behind."""
    spec = held.spec
    if target.shape != held.weights.shape:
        raise ShapeMismatch(f"target {target.shape} and model {held.weights.shape} differ")
    want = target.astype(np.float64)
    if residual is not None:
        want += residual
    step = (want - held.weights).astype(np.float32)
    parts = spec.split(step)
    wires = tuple(codec.encode(parts[t.name])[0] for t in spec.tensors)
    delta = ModelDelta(base, model_hash(spec, held.weights), b"", codec.name, wires)
    checked = CheckedDelta.from_body(delta.to_body() | {"hash": bytes(32)}, spec)
    published = checked.apply(held)
    delta = ModelDelta(base, delta.base_hash, model_hash(spec, published.weights),
                       codec.name, wires)  # fmt: skip
    lag = (want - published.weights).astype(np.float32)
    return Compressed(delta, published, lag)


DOWNLINK_BUFFER = "downlink"  # the server-state buffer of the coordinator's residual


@dataclass(frozen=True, slots=True)
class CompressedDownlink:
    """A server strategy whose models go down as compressed deltas: it wraps `inner`
    (FedAvg, FedAdam, ...), whose step becomes the target, and publishes the model the
    delta in `codec` makes (`step`). Its state is the inner one's plus the coordinator's
    residual (buffer ``downlink``), saved and resumed with the rest."""

    inner: Strategy
    codec: Codec
    spec: ModelSpec

    @property
    def name(self) -> str:
        return self.inner.name

    def init_state(self, size: int) -> ServerState:
        state = self.inner.init_state(size)
        zeros = np.zeros(size, dtype=np.float32)
        return ServerState(state.step, {**state.buffers, DOWNLINK_BUFFER: zeros})

    def apply(
        self, weights: F32Array, state: ServerState, partial: Partial
    ) -> tuple[F32Array, ServerState]:
        compressed, new = self.step(weights, state, partial, 0)
        return compressed.model.weights, new

    def step(
        self, weights: F32Array, state: ServerState, partial: Partial, base: int
    ) -> tuple[Compressed, ServerState]:
        """The delta from `weights` (version `base`) after the round that folded `partial`,
        the model it makes and the next state."""
        buffers = dict(state.buffers)
        residual = buffers.pop(DOWNLINK_BUFFER, None)
        target, inner = self.inner.apply(weights, ServerState(state.step, buffers), partial)
        held = GlobalModel(self.spec, np.asarray(weights, dtype=np.float32))
        compressed = compress(self.codec, held, base, target, residual)
        return compressed, ServerState(
            inner.step, {**inner.buffers, DOWNLINK_BUFFER: compressed.residual}
        )


def downlink_strategy(
    inner: Strategy, codec: CodecName | None, spec: ModelSpec, density: float | None = None
) -> Strategy:
    """`inner`, its models sent down as deltas in `codec`; None: as full models only."""
    if codec is None:
        return inner
    c = codec_for(codec, density=density) if codec is CodecName.SPARSE else codec_for(codec)
    return CompressedDownlink(inner, c, spec)
