"""The key, ids and tiny model the microcontroller-format tests share (test_mcu_format*.py)."""

from __future__ import annotations

import numpy as np

from kernels.reference import mlp_spec
from tern.mcu import McuLayer

__all__ = ["DEVICE", "FLEET", "KEY", "RUN", "TINY_SEALED", "TINY_SPEC", "TINY_WEIGHTS", "layer"]

KEY = bytes(range(32))
FLEET, DEVICE = "demo", "esp-1"
RUN = 1_767_225_600_000  # a coordinator's run: ms since the epoch (0x19B_76DAA800)

TINY_SPEC = mlp_spec([2, 2, 2])
TINY_WEIGHTS = TINY_SPEC.flatten(
    {
        "w0": [[0.5, -1.0], [0.25, 0.75]],
        "b0": [0.1, -0.2],
        "w1": [[1.0, -0.5], [0.5, 2.0]],
        "b1": [0.0, 0.3],
    }
)
# seal_mcu(quantize(TINY_SPEC, TINY_WEIGHTS, 7, run=RUN).to_bytes(), KEY, "demo", "esp-1"):
# any change to the layout, the quantization rules or the tag shows up here. The header is
# TMCU, version 2, 2 layers, in_exp 5, flags 0, model_version 7, run (u64, little-endian).
TINY_SEALED = bytes.fromhex(
    "544d4355020205000700000000a8da769b010000"
    "020002000200820e19003f20825f333333009a9999ff"
    "820d18003f20e07e00000000cdcc4c00"
    "c6ed5b080c6ac8a72e906f1ac4fe2e515ea01553ea9cd286b411bad162033caa"
)


def layer(m: int, e_w: int, e_b: int, w: list[list[int]], b: list[int]) -> McuLayer:
    return McuLayer(m, e_w, e_b, np.array(w, dtype=np.int8), np.array(b, dtype=np.int64))
