"""The CPython side of the firmware: one error base, a subclass per way it can fail."""

from __future__ import annotations

__all__ = [
    "DepsError",
    "DepsHashMismatch",
    "DepsUnavailable",
    "FirmwareError",
    "ProvisionError",
    "SimError",
]


class FirmwareError(Exception):
    """Base of every error of the `firmware` package (fetching, provisioning, simulating)."""


class DepsError(FirmwareError):
    """A MicroPython dependency could not be made available."""


class DepsUnavailable(DepsError):
    """The dependency is not cached and could not be downloaded (offline, HTTP error)."""

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"cannot download {url}: {cause}")
        self.url = url
        self.cause = cause


class DepsHashMismatch(DepsError):
    """Downloaded or cached bytes do not have the pinned SHA-256: never used."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: sha256 {actual} differs from the pinned {expected}")
        self.what = what
        self.expected = expected
        self.actual = actual


class ProvisionError(FirmwareError):
    """A board cannot be provisioned as asked (bad arguments, boards file, mpremote)."""


class SimError(FirmwareError):
    """A simulated board could not start or stop as asked."""
