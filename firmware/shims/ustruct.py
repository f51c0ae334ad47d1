"""MicroPython's ``ustruct`` under CPython: the standard ``struct`` module, renamed."""

from struct import calcsize, pack, pack_into, unpack, unpack_from

__all__ = ["calcsize", "pack", "pack_into", "unpack", "unpack_from"]
