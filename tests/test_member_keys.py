"""A component built with a key that is not its own in the fleet file refuses to start:
its messages would be refused by every receiver, round after round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from device.agent import DeviceAgent, DeviceError
from gateway.config import GatewayConfig, GatewayError
from gateway.service import Gateway
from tern.fleet import COORDINATOR
from tests.fleet_fixtures import build_fleet

KIT = build_fleet({"gw-1": (COORDINATOR, ["dev-1"])})
X, Y = np.zeros((4, 8), dtype=np.float32), np.zeros(4, dtype=np.int64)


def test_a_device_with_another_members_key_is_refused() -> None:
    with pytest.raises(DeviceError, match="does not match"):
        DeviceAgent("dev-1", KIT.fleet, KIT.keys["gw-1"], "mqtt://127.0.0.1:1", X, Y)


def test_a_device_not_in_the_fleet_is_refused() -> None:
    with pytest.raises(DeviceError, match="not a member"):
        DeviceAgent("dev-9", KIT.fleet, SigningKey.generate(), "mqtt://127.0.0.1:1", X, Y)


def test_a_gateway_with_a_key_not_its_own_is_refused(tmp_path: Path) -> None:
    config = GatewayConfig("gw-1", "mqtt://127.0.0.1:1", state_dir=tmp_path)

    with pytest.raises(GatewayError, match="does not match"):
        Gateway(config, KIT.fleet, SigningKey.generate())
