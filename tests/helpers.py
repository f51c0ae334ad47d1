"""Shared test helpers that parametrization needs at import time (fixtures are in conftest)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tern.codecs import Float16Codec, Float32Codec, TernaryCodec
from tern.quantize import TernaryRule


def make_rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def all_codecs() -> list[Any]:
    """Every codec, ternary under every rule (the stochastic one seeded)."""
    return [
        pytest.param(Float32Codec(), id="float32"),
        pytest.param(Float16Codec(), id="float16"),
        *[
            pytest.param(TernaryCodec(rule=r, rng=make_rng(7)), id=f"ternary-{r}")
            for r in TernaryRule
        ],
    ]
