"""tern firmware: ESP32 boards.

`esp32/` is the MicroPython firmware copied to a board (not imported from here). The
CPython side: `provision` (``tern firmware provision``), `config` (a board's
config.json), `sim` (the firmware under CPython: simulated boards), `deps` (umqtt.simple
from PyPI, sha256-pinned) and `shims/` (MicroPython module names over CPython's).
"""
