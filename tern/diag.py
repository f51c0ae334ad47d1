"""CBOR diagnostic notation (RFC 8949 section 8) of decoded values, for people.

Long byte strings are elided (``h'0a1b...'/200000 bytes/``) so a model update fits a
terminal; pass ``max_bytes=None`` for everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from cbor2 import CBORSimpleValue, CBORTag

__all__ = ["diag"]


def _float(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    text = repr(x)
    return text if any(c in text for c in ".en") else text + ".0"


def diag(value: object, max_bytes: int | None = 16, indent: int = 0) -> str:
    """Render `value` (as cbor2 decodes it) in diagnostic notation."""
    pad = "  " * (indent + 1)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bytes):
        if max_bytes is not None and len(value) > max_bytes:
            return f"h'{value[:max_bytes].hex()}...'/{len(value)} bytes/"
        return f"h'{value.hex()}'"
    if isinstance(value, CBORTag):
        return f"{value.tag}({diag(value.value, max_bytes, indent)})"
    if isinstance(value, CBORSimpleValue):
        return f"simple({value.value})"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = [
            f"{pad}{diag(k, max_bytes, indent + 1)}: {diag(v, max_bytes, indent + 1)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list | tuple):
        inner = [diag(v, max_bytes, indent + 1) for v in value]
        flat = "[" + ", ".join(inner) + "]"
        if len(flat) <= 72 and "\n" not in flat:
            return flat
        return "[\n" + ",\n".join(pad + i for i in inner) + "\n" + "  " * indent + "]"
    return repr(value)
