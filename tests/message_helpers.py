"""The spec and CBOR helpers the message tests share (tests/test_messages*.py)."""

from __future__ import annotations

from typing import Any

import cbor2
import numpy as np
from hypothesis import strategies as st

from tern.aggregate import Partial
from tern.messages import Update
from tern.spec import ModelSpec
from tests.helpers import make_rng

__all__ = [
    "SPEC",
    "canonical_cbor",
    "random_partial",
    "received",
    "tensor_names",
    "via_cbor",
    "without_key",
]

SPEC = ModelSpec.of({"conv": (2, 3, 2), "dense": (4, 5), "bias": (7,)})  # 12 + 20 + 7


def via_cbor(value: object) -> Any:
    """What a receiver decodes: canonical CBOR out, CBOR in."""
    return cbor2.loads(cbor2.dumps(value, canonical=True))


def canonical_cbor(value: object) -> bytes:
    return cbor2.dumps(value, canonical=True)


def random_partial(seed: int = 0, spec: ModelSpec = SPEC, weight: float = 3.0) -> Partial:
    values = (make_rng(seed).standard_normal(spec.size) * weight).astype(np.float32)
    return Partial(values, weight, 3)


def received(update: Update) -> Update:
    return Update.from_body(via_cbor(update.to_body()))


tensor_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789", min_size=1, max_size=12)


def without_key(body: dict[str, object], key: str) -> dict[str, object]:
    return {k: v for k, v in body.items() if k != key}
