"""Who may do what on a gateway's own broker: the fleet's policy for that broker.

The gateway's own client logs in with its id and the password of its ``<id>.login``
file; its devices and child gateways with theirs; registered boards with the MQTT user
and password of their boards-file entry; the observer reads everything; anonymous
clients are refused. `broker.fleet_access` holds the rights table.

This holds on the embedded downstream broker. An external downstream broker
(``--downstream``) enforces whatever its own configuration says: `tern mosquitto-config
--broker <gateway>` writes the same rights for Mosquitto.
"""

from __future__ import annotations

from broker.acl import AccessPolicy
from broker.fleet_access import broker_policy
from gateway.boards import Boards
from tern.fleet import Fleet

__all__ = ["gateway_policy"]


def gateway_policy(fleet: Fleet, gateway: str, boards: Boards | None) -> AccessPolicy:
    """The policy of `gateway`'s own broker, with `boards` registered on it."""
    return broker_policy(fleet, gateway, boards)
