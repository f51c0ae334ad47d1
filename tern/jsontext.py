"""Bounded, strict JSON objects: the one parser for every JSON text tern reads.

Status, metrics and telemetry from the network (`tern.reports`), and fleet, login and
high-water-mark files from disk, all go through `parse_json`: a size cap before any
parsing, no NaN or Infinity, deep nesting and 5,000-digit integers refused, and an
object expected at the top.
"""

from __future__ import annotations

import json
from typing import Any

from tern.errors import MalformedMessage, PayloadTooLarge

__all__ = ["MAX_JSON_BYTES", "parse_json"]

MAX_JSON_BYTES = 64 * 1024  # metrics: tallies of many reasons


def parse_json(data: bytes | str, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from `data` (bytes as received, or text as read from a file, whose
    length is then counted in characters); MalformedMessage or PayloadTooLarge otherwise."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(len(data), max_bytes)
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
        value = json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedMessage(f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise MalformedMessage(f"{what}: a JSON object is expected")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
