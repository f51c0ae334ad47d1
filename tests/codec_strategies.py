"""Hypothesis strategies and wire helpers the codec tests share (tests/test_codecs*.py)."""

from __future__ import annotations

from typing import Any

import cbor2
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tern.quantize import TernaryRule

__all__ = ["ALL_RULES", "f32_arrays", "finite_f32", "shapes", "shapes_1d_up", "wire_roundtrip"]

ALL_RULES = list(TernaryRule)

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7)
# 0-d tensors have their own explicit test (test_codec_roundtrip_keeps_shape), so a
# failure there does not hide what the property tests check for every other shape.
shapes_1d_up = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=7)
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def f32_arrays(
    elements: st.SearchStrategy[float] = finite_f32, *, scalars: bool = True
) -> st.SearchStrategy[Any]:
    return hnp.arrays(np.float32, shapes if scalars else shapes_1d_up, elements=elements)


def wire_roundtrip(wire: object) -> object:
    """What a receiver decodes: canonical CBOR out, CBOR in."""
    return cbor2.loads(cbor2.dumps(wire, canonical=True))
