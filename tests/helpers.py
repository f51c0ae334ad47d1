"""Shared test helpers that parametrization needs at import time (fixtures are in conftest)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

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


def unavailable(reason: str) -> NoReturn:
    """A test needs something absent here (node, PyPI, mosquitto): skip with the reason,
    or fail when TERN_REQUIRE_ALL=1 (CI sets it: there everything must run)."""
    if os.environ.get("TERN_REQUIRE_ALL") == "1":
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def first_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """The first line `proc` prints on stdout, read on a thread so the wait has a deadline
    (b"" when none came within `timeout`)."""
    lines: list[bytes] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else b""


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)
