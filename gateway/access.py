"""Who may do what on a gateway's own broker: the policy built from its boards file.

- The gateway logs in as ``gateway:<id>`` with a password it draws at each start (kept
  in memory only). Only it may publish what it relays to its devices (the global
  model, the round schedule, the kernels) and each board's sealed model.
- A registered board logs in with the MQTT user and password of its boards entry. It
  may publish only its own telemetry and status, subscribe only to its own model, and
  only it may use its device id as client id or publish on its telemetry and status.
- Anyone else (devices, child gateways, dashboards) connects without a user name and
  publishes everything else: device updates and partials are signed, so their
  signatures, not the broker, decide what counts.

This holds on the embedded downstream broker. An external downstream broker
(``--downstream``) enforces whatever its own configuration says.
"""

from __future__ import annotations

from broker.acl import AccessPolicy, Account
from gateway.boards import Boards, BoardsError
from tern import topics

__all__ = ["gateway_policy", "gateway_user"]


def gateway_user(gateway: str) -> str:
    """The gateway's own user name (a ':' keeps it apart from every device id)."""
    return f"gateway:{gateway}"


def gateway_policy(
    fleet: str, gateway: str, client_id: str, password: str, boards: Boards | None
) -> AccessPolicy:
    """The policy of `gateway`'s broker, whose own client connects as `client_id`."""
    me = gateway_user(gateway)
    only_me = frozenset({me})
    accounts = {me: Account(password)}
    reserved = {
        topics.global_model(fleet).path: only_me,
        topics.round_schedule(fleet).path: only_me,
    }
    prefixes = {topics.kernels(fleet).path.removesuffix("+"): only_me}
    client_ids = {client_id: me}
    for device, entry in ({} if boards is None else boards.boards).items():
        if entry.mqtt_user in accounts:
            raise BoardsError(f"board {device}: MQTT user {entry.mqtt_user!r} is taken")
        own = (topics.telemetry(fleet, device).path, topics.status(fleet, device).path)
        accounts[entry.mqtt_user] = Account(
            entry.mqtt_password,
            publish=frozenset(own),
            subscribe=frozenset({topics.mcu_model(fleet, device).path}),
        )
        reserved.update(dict.fromkeys(own, frozenset({entry.mqtt_user})))
        reserved[topics.mcu_model(fleet, device).path] = only_me
        client_ids[device] = entry.mqtt_user
    return AccessPolicy(accounts, reserved, prefixes, client_ids)
