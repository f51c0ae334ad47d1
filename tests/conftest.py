"""Shared fixtures for the protocol-layer tests: fixed keys, a small spec, sealed messages.

Everything here is deterministic (keys from fixed seeds, no global randomness) and
session-scoped, so hypothesis tests can use it without re-running setup per example.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import pytest
from nacl.signing import SigningKey, VerifyKey

from tern.aggregate import Partial
from tern.codecs import CodecName, codec_for
from tern.envelope import Envelope, Kind, seal
from tern.messages import GlobalModel, RoundSchedule, Update, encode_update
from tern.spec import ModelSpec

pytest_plugins = ["tests.mqtt_fixtures"]


@dataclass(frozen=True)
class ProtocolKit:
    """One sender of one fleet, with helpers to build, seal and open its messages."""

    key: SigningKey
    spec: ModelSpec
    fleet: str = "plant-7"
    sender: str = "dev-03"
    round: int = 12
    model_version: int = 11

    @property
    def keys(self) -> Mapping[str, VerifyKey]:
        """What a receiver knows: this sender's verify key."""
        return {self.sender: self.key.verify_key}

    def envelope(self, kind: Kind, body: object, **fields: object) -> Envelope:
        env = Envelope(kind, self.fleet, self.round, self.model_version, self.sender, body)
        return replace(env, **fields)

    def seal(self, kind: Kind, body: object, **fields: object) -> bytes:
        return seal(self.envelope(kind, body, **fields), self.key)

    def partial(self) -> Partial:
        """A fixed partial aggregate over `spec` with values of both signs and zeros."""
        values = np.linspace(-1.5, 1.5, self.spec.size, dtype=np.float32)
        values[::4] = 0.0
        return Partial(values, 2.0, 2)

    def update(self, codec: CodecName) -> Update:
        update, _ = encode_update(codec_for(codec, density=0.5), self.spec, self.partial())
        return update

    def sealed_update(self, codec: CodecName, kind: Kind = Kind.UPDATE) -> bytes:
        return self.seal(kind, self.update(codec).to_body())

    def global_model(self) -> GlobalModel:
        weights = np.linspace(-0.5, 0.5, self.spec.size, dtype=np.float32)
        return GlobalModel(self.spec, weights)

    def schedule(self) -> RoundSchedule:
        return RoundSchedule(
            round=self.round,
            model_version=self.model_version,
            codec=CodecName.TERNARY,
            deadline=1_700_000_000.5,
            min_contributors=2,
            participants=("dev-01", "dev-03"),
            seed=7,
        )


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    """The sender's key, from a fixed seed."""
    return SigningKey(bytes(range(32)))


@pytest.fixture(scope="session")
def other_key() -> SigningKey:
    """A second, unrelated key, from another fixed seed."""
    return SigningKey(bytes(range(32, 64)))


@pytest.fixture(scope="session")
def small_spec() -> ModelSpec:
    """Two tensors, 9 parameters: a 6-trit tensor (padding in its last byte) and a 3-trit one."""
    return ModelSpec.of({"w": (2, 3), "b": (3,)})


@pytest.fixture(scope="session")
def kit(signing_key: SigningKey, small_spec: ModelSpec) -> ProtocolKit:
    return ProtocolKit(signing_key, small_spec)
