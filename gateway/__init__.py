"""tern gateway: relays model and schedule to its devices, sends one partial aggregate up."""

from gateway.config import DEFAULT_MARGIN, GatewayConfig, GatewayError
from gateway.service import Gateway
from gateway.tree import depth, expected_contributors

__all__ = [
    "DEFAULT_MARGIN",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "depth",
    "expected_contributors",
]
