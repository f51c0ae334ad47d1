"""CBOR diagnostic notation (tern.diag)."""

from __future__ import annotations

import math

from cbor2 import CBORTag

from tern.diag import diag


def test_diag_renders_scalars_as_rfc_8949_diagnostic_notation() -> None:
    assert diag(None) == "null"
    assert diag(True) == "true"
    assert diag(-3) == "-3"
    assert diag(1.0) == "1.0"
    assert diag(math.nan) == "NaN"
    assert diag(-math.inf) == "-Infinity"
    assert diag('a"b') == '"a\\"b"'
    assert diag(b"\x01\xff") == "h'01ff'"


def test_diag_renders_tags_and_nested_containers() -> None:
    value = CBORTag(40, [[2], CBORTag(85, b"\x00" * 8)])

    assert diag(value) == "40([[2], 85(h'0000000000000000')])"
    assert diag({"a": [1, 2]}) == '{\n  "a": [1, 2]\n}'


def test_diag_elides_long_byte_strings_unless_asked() -> None:
    data = bytes(range(40))

    assert diag(data, max_bytes=4) == "h'00010203...'/40 bytes/"
    assert diag(data, max_bytes=None) == "h'" + data.hex() + "'"
