"""Building and opening envelopes the way the envelope tests need (tests/test_envelope*.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from nacl.signing import SigningKey

from tern.envelope import Envelope, Kind, canonical, open_envelope
from tern.errors import TernError

if TYPE_CHECKING:
    from conftest import ProtocolKit

__all__ = ["SLUG", "U32_MAX", "VALID_ID", "open_as_receiver", "rejection", "signed", "unsigned_map"]

SLUG = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
VALID_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
U32_MAX = 2**32 - 1


def rejection(fn: Callable[..., object], *args: object, **kwargs: object) -> TernError:
    """Call `fn`, which must raise a TernError carrying a slug reason; return the error."""
    with pytest.raises(TernError) as info:
        fn(*args, **kwargs)
    assert SLUG.fullmatch(info.value.reason), f"reason {info.value.reason!r} is not a slug"
    return info.value


def open_as_receiver(kit: ProtocolKit, data: bytes, **options: object) -> Envelope:
    """Open `data` as the kit's fleet would: the sender's key known, every kind accepted."""
    kwargs: dict[str, object] = {"fleet": kit.fleet, "kinds": set(Kind)}
    kwargs.update(options)
    return open_envelope(data, kit.keys, **kwargs)  # type: ignore[arg-type]


def unsigned_map(kit: ProtocolKit, **fields: object) -> dict[object, object]:
    """The wire map without ``sig``, with `fields` replacing the kit's defaults."""
    m: dict[object, object] = {
        "v": 2,
        "kind": "update",
        "fleet": kit.fleet,
        "run": 0,
        "round": kit.round,
        "model": kit.model_version,
        "sender": kit.sender,
        "body": {"weight": 1.0},
    }
    m.update(fields)
    return m


def signed(m: dict[object, object], key: SigningKey) -> bytes:
    """Sign any map the way `seal` does, without `seal`'s checks."""
    return canonical({**m, "sig": key.sign(canonical(m)).signature})
