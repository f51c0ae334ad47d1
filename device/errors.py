"""The device agent's error base."""

from __future__ import annotations

__all__ = ["DeviceError", "LateRound"]


class DeviceError(Exception):
    """Base of the device agent's errors; `reason` is what a failed round reports."""

    reason = "device_error"


class LateRound(DeviceError):
    """The round's deadline passed before this device could train."""

    reason = "late"
