"""What a receiver accepts of each kind of message: bytes and CBOR data items.

Every receiver checks a message against the caps of the kind it expects before it
decodes anything (`tern.cbor`). Caps of messages that carry tensors come from what
the receiver already trusts, never from the message: the fleet file's `max_params`
for a model, the spec of the last verified model and the schedule's codec for an
update. The rest are small and fixed, or follow the fleet file (a schedule lists at
most every device). Each bound is the largest valid message of its kind, with room
for the longest ids, so a refused message costs no more than an accepted one would.
"""

from __future__ import annotations

from tern.cbor import Caps
from tern.codecs import CodecName
from tern.sparse import max_count, sparse_payload_bound
from tern.spec import MAX_TENSORS, ModelSpec

__all__ = [
    "FAILURE_CAPS",
    "KERNEL_CAPS",
    "MAX_REASONS",
    "contribution_caps",
    "largest_message",
    "model_caps",
    "schedule_caps",
]

MAX_REASONS = 64  # reasons in one failure tally (topics.md "failure")
MAX_KERNEL_BYTES = 1 << 20  # the shipped MLP kernel is ~16 KB
_MAX_DIMS = 8

# The envelope around any body: 9 keys, ids of up to 64 characters, a 64-byte signature.
_ENVELOPE_BYTES = 512
_ENVELOPE_ITEMS = 19
# A failure tally: up to 64 reasons of up to 64 ASCII characters and a count each.
_TALLY_BYTES = 16 + MAX_REASONS * (2 + 64 + 5)
_TALLY_ITEMS = 2 + 2 * MAX_REASONS

FAILURE_CAPS = Caps(_ENVELOPE_BYTES + _TALLY_BYTES, _ENVELOPE_ITEMS + 1 + _TALLY_ITEMS)
KERNEL_CAPS = Caps(_ENVELOPE_BYTES + 256 + MAX_KERNEL_BYTES, _ENVELOPE_ITEMS + 16)

# bytes per element on the wire, and framing bytes and items per tensor, by codec
_ELEMENT = {CodecName.FLOAT32: 4.0, CodecName.FLOAT16: 2.0, CodecName.TERNARY: 0.2}
_TENSOR_BYTES = {CodecName.FLOAT32: 16, CodecName.FLOAT16: 16, CodecName.TERNARY: 48}
_TENSOR_ITEMS = {CodecName.FLOAT32: 5, CodecName.FLOAT16: 5, CodecName.TERNARY: 8}
# A sparse tensor (tern.sparse): a map of six keys (34 bytes with their heads), a double
# scale, count and rice as integers up to 2**32, two byte-string heads; its payload bytes
# come from the count its density allows (`sparse_payload_bound`).
_SPARSE_BYTES = 72
_SPARSE_ITEMS = 13
_DIM_BYTES = 9  # a dimension up to 2**28 takes at most 5 bytes; room to spare
_UPDATE_BYTES = 64  # the update body's own keys and scalars
_UPDATE_ITEMS = 10


def model_caps(max_params: int) -> Caps:
    """A global model of at most `max_params` float32 parameters (the fleet file's bound)."""
    per_tensor = 24 + 128 + 2 * _MAX_DIMS * _DIM_BYTES  # spec entry with its name, and framing
    return Caps(
        _ENVELOPE_BYTES + 64 + 4 * max_params + MAX_TENSORS * per_tensor,
        _ENVELOPE_ITEMS + 8 + MAX_TENSORS * (8 + 2 * _MAX_DIMS),
    )


# A schedule's `policy` at its largest (tern.policy): two aggregator names, a strategy
# name and 8 parameters, every name 32 characters, every value a double: 488 bytes and
# 28 items, with their key.
_POLICY_BYTES = 512
_POLICY_ITEMS = 28
# Its `secagg` terms at their largest: a scale (a double) for each of MAX_TENSORS
# tensors and seven named numbers; its `dp` terms: four named values.
_PRIVACY_BYTES = 16 + 9 * MAX_TENSORS + 8 * (16 + 9) + 4 * (16 + 12)
_PRIVACY_ITEMS = 4 + MAX_TENSORS + 2 * 8 + 2 * 4


# The schedule's compression keys: `partials` and `downlink` (codec names), `density` (a
# float) and `model_hash` (32 bytes), with their keys.
_COMPRESSION_BYTES = 128
_COMPRESSION_ITEMS = 8


def schedule_caps(devices: int) -> Caps:
    """A round schedule of a fleet of `devices` devices (it may list every one)."""
    return Caps(
        _ENVELOPE_BYTES + 1024 + _POLICY_BYTES + _PRIVACY_BYTES + _COMPRESSION_BYTES + 66 * devices,
        _ENVELOPE_ITEMS + 64 + _POLICY_ITEMS + _PRIVACY_ITEMS + _COMPRESSION_ITEMS + devices,
    )


def _payload_bytes(codec: CodecName, n: int, density: float | None) -> int:
    if codec is CodecName.SPARSE:
        if density is None:
            raise ValueError("the caps of a sparse codec need the schedule's density")
        return _SPARSE_BYTES + sparse_payload_bound(n, max_count(density, n))
    return _TENSOR_BYTES[codec] + int(_ELEMENT[codec] * n)


def _update_caps(spec: ModelSpec, codec: CodecName, tally: bool, density: float | None) -> Caps:
    size = _ENVELOPE_BYTES + _UPDATE_BYTES + (_TALLY_BYTES if tally else 0)
    items = _ENVELOPE_ITEMS + _UPDATE_ITEMS + (_TALLY_ITEMS if tally else 0)
    per_items = _SPARSE_ITEMS if codec is CodecName.SPARSE else _TENSOR_ITEMS[codec]
    for t in spec.tensors:
        dims = len(t.shape)
        size += _payload_bytes(codec, t.size, density) + dims * _DIM_BYTES + 1
        items += per_items + dims
    return Caps(size, items)


def contribution_caps(
    spec: ModelSpec, codec: CodecName, *, partial: bool, density: float | None = None
) -> Caps:
    """What a sender below a receiver may send in a round on model `spec`: an update in
    the round's `codec` (a device's, or a gateway's `partial` with its failure tally),
    or a failure report, whichever is larger. A sparse codec needs the schedule's
    `density` (ValueError without); the other codecs ignore it."""
    update = _update_caps(spec, codec, partial, density)
    return Caps(
        max(update.max_bytes, FAILURE_CAPS.max_bytes),
        max(update.max_items, FAILURE_CAPS.max_items),
    )


def largest_message(max_params: int, devices: int) -> int:
    """The most bytes any receiver of a fleet accepts in one message: a global model of
    `max_params`, a schedule that lists all `devices`, or a kernel, whichever is larger.
    An update or a partial answers a model of at most `max_params` and is never larger
    than it (fewer framing bytes a tensor); failures, board models and JSON reports are
    smaller still. Every broker of the fleet must carry a message this large."""
    return max(
        model_caps(max_params).max_bytes,
        schedule_caps(devices).max_bytes,
        KERNEL_CAPS.max_bytes,
    )
