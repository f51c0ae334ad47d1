"""A gateway's own broker: the embedded broker its devices, child gateways and boards use,
with the fleet's logins and rights (broker.fleet_access) and safe limits.

The policy follows the boards file: a reload swaps it while the broker runs (clients
already connected stay connected). Everything the broker refuses is counted in
`refused` and reaches the gateway's metrics as ``access_<reason>``.
"""

from __future__ import annotations

from collections import Counter

from broker.access import AccessControl
from broker.acl import AccessPolicy
from broker.embedded import EmbeddedBroker
from broker.errors import BrokerError
from broker.limits import fleet_limits
from gateway.access import gateway_policy
from gateway.boards import Boards, BoardsError, load_boards
from gateway.config import GatewayConfig, GatewayError
from tern.fleet import Fleet

__all__ = ["OwnBroker", "read_boards"]


def read_boards(path: str, fleet: Fleet, gateway: str) -> Boards:
    """The boards file of `gateway` in `fleet`; BoardsError if it lists another's boards."""
    boards = load_boards(path)
    if (boards.fleet, boards.gateway) != (fleet.fleet, gateway):
        raise BoardsError(
            f"lists boards of gateway {boards.gateway!r} in fleet {boards.fleet!r}, "
            f"not {gateway!r} in {fleet.fleet!r}",
            path,
        )
    return boards


class OwnBroker:
    """The embedded broker of gateway `config.id`, on `config.listen_host`:`listen_port`."""

    def __init__(self, config: GatewayConfig, fleet: Fleet, boards: Boards | None) -> None:
        self.id, self.fleet = config.id, fleet
        self._access = AccessControl(self._policy(boards))
        # Packets as large as the fleet's largest model; the gateway's own client (which
        # relays every board's model at once) and its child gateways are not rate-limited.
        limits = fleet_limits(fleet, config.id)
        self._broker = EmbeddedBroker(
            config.listen_host, config.listen_port, access=self._access, limits=limits
        )

    def start(self, timeout: float) -> OwnBroker:
        self._broker.start(timeout)
        return self

    def stop(self, timeout: float) -> None:
        self._broker.stop(timeout)

    @property
    def url(self) -> str:
        return self._broker.url

    @property
    def refused(self) -> Counter[str]:
        """Everything the broker has refused, by reason (its access policy and its limits)."""
        return self._broker.refused

    def set_boards(self, boards: Boards) -> None:
        """Apply the rights of `boards` from the next connection on."""
        self._access.set_policy(self._policy(boards))

    def _policy(self, boards: Boards | None) -> AccessPolicy:
        try:
            return gateway_policy(self.fleet, self.id, boards)
        except BrokerError as exc:
            raise GatewayError(f"gateway {self.id}: {exc}") from exc
