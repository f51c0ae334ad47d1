"""Who may do what on each broker of a fleet: the policy built from the fleet file.

A fleet has one broker per level: the coordinator's (``broker = "coordinator"``), and
each gateway's own downstream broker (``broker = <gateway id>``) that its devices, child
gateways and boards connect to. Every member logs in with its id as user name and the
password its ``<id>.login`` file holds (the fleet file keeps the hash); the observer
login reads everything and publishes nothing; anonymous clients are refused. The
builders below hold the rights table of topics.md ("Who may do what on each broker"):
the coordinator publishes the model, schedule and kernels and hears partials; a gateway
relays them down on its own broker and hears its devices, child gateways and boards; a
device publishes only its own update and status, a board only its own telemetry and
status; a gateway on its parent's broker publishes its partial, metrics and view (and
relays its descendants' views), and relays status and telemetry, never under another
member's id.

Every member's client ids (`Fleet.client_ids`) and every board id are reserved on every
broker: nobody else may connect with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.acl import AccessPolicy, Account, Rights
from broker.errors import BrokerConfigError
from tern import topics
from tern.caps import largest_message
from tern.errors import TernError, brief
from tern.fleet import COORDINATOR, Fleet
from tern.logins import OBSERVER, hash_password, is_observer

if TYPE_CHECKING:  # gateway.boards imports the gateway package, which imports this module
    from gateway.boards import Boards

__all__ = ["MAX_MQTT_PACKET", "broker_policy", "max_packet_bytes"]

MAX_MQTT_PACKET = 268_435_455  # the largest remaining length MQTT can encode (+ header)
# MQTT around a message: the PUBLISH fixed header (at most 5 bytes), the topic (its
# 2-byte length and at most three 64-character ids and a kind: well under 300 bytes)
# and the packet id.
_MQTT_FRAMING = 1024


def max_packet_bytes(fleet: Fleet) -> int:
    """The largest MQTT packet a broker of `fleet` needs to accept: the largest message
    its receivers accept (`tern.caps.largest_message`: a model of the fleet's
    `max_params`, a schedule listing every device, or a kernel) with its MQTT framing;
    never more than MQTT can carry."""
    largest = largest_message(fleet.max_params, len(fleet.devices))
    return min(MAX_MQTT_PACKET, largest + _MQTT_FRAMING)


def broker_policy(fleet: Fleet, broker: str, boards: Boards | None = None) -> AccessPolicy:
    """The rights on `broker` (``coordinator`` or a gateway id) of `fleet`.

    BrokerConfigError when `broker` is not in the fleet or a member that connects to it
    has no login in the fleet file; BoardsError when `boards` is not this gateway's or a
    board's id or user collides with a member, the observer or another board.
    """
    f = fleet.fleet
    if broker != COORDINATOR and broker not in fleet.gateways:
        raise BrokerConfigError(f"{brief(broker, 64)} is not the coordinator or a gateway of {f!r}")
    rights: dict[str, Rights] = {}
    # Every member's status and telemetry topic, built once and sorted: each child
    # gateway's deny list is all of them but its own, sorted too, which `Rights` keeps
    # as it is (one tuple of shared strings per gateway, nothing more).
    voiced = sorted(
        (path, m)
        for m in fleet.members
        for path in (topics.status(f, m).path, topics.telemetry(f, m).path)
    )
    if broker == COORDINATOR:
        rights[COORDINATOR] = _coordinator(fleet)
        for gw in fleet.children(COORDINATOR):
            rights[gw] = _child_gateway(fleet, COORDINATOR, gw, voiced)
    else:
        rights[broker] = _own_gateway(fleet, broker)
        for device in fleet.gateways[broker].devices:
            rights[device] = _device(f, broker, device)
        for child in fleet.children(broker):
            rights[child] = _child_gateway(fleet, broker, child, voiced)
    missing = sorted(user for user in rights if user not in fleet.logins)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise BrokerConfigError(
            f"fleet {f!r} has no login for {', '.join(missing[:5])}{more}, who connect to the"
            f" {broker} broker: make the fleet with `tern fleet init` (it writes the logins)"
        )
    accounts = {
        user: Account(fleet.logins[user], r, fleet.client_ids(user)) for user, r in rights.items()
    }
    observer = Rights(subscribe=(topics.everything(f),))
    for user in filter(is_observer, fleet.logins):  # `observer` and every `observer-NAME`
        accounts[user] = Account(fleet.logins[user], observer)
    reserved = {cid: member for member in fleet.members for cid in fleet.client_ids(member)}
    if boards is not None:
        _add_boards(fleet, broker, boards, accounts, reserved)
    return AccessPolicy(accounts, reserved, anonymous=None)


def _coordinator(fleet: Fleet) -> Rights:
    f, me = fleet.fleet, COORDINATOR
    own = (
        topics.global_model(f).path,
        topics.model_delta(f).path,
        topics.round_schedule(f).path,
        topics.kernels(f).path,
        topics.metrics(f, me).path,
        topics.status(f, me).path,
        _chunks(f, me),
    )
    heard = (topics.partials_to(f, me).path, *(_chunks(f, g) for g in fleet.children(me)))
    return Rights(publish=own, retain=own, subscribe=heard)


def _chunks(f: str, member: str) -> str:
    """The chunks `member` keeps (retained) of its messages too large for the broker
    (tern.chunks): its own to publish, its peers' to read."""
    return topics.chunks_of(f, member).path


def _downlink(f: str) -> tuple[str, ...]:
    """What a gateway relays down to everyone below it, retained."""
    return (
        topics.global_model(f).path,
        topics.model_delta(f).path,
        topics.round_schedule(f).path,
        topics.kernels(f).path,
    )


def _child_gateway(
    fleet: Fleet, parent: str, gateway: str, voiced: list[tuple[str, str]]
) -> Rights:
    """A gateway on its parent's broker: its partial and metrics, the status and
    telemetry it relays for its boards, never under another member's id, and its own
    view and those of the gateways below it (relayed)."""
    f = fleet.fleet
    relayed = (topics.status_all(f).path, topics.telemetry_all(f).path)
    deny = tuple(path for path, member in voiced if member != gateway)
    metrics = topics.metrics(f, gateway).path
    views = tuple(topics.view(f, g).path for g in fleet.gateways_below(gateway))
    # A child gateway is a member of its parent's cohort under secure aggregation.
    inbox = () if parent == COORDINATOR else (topics.inbox(f, gateway, parent).path,)
    chunks = _chunks(f, gateway)
    return Rights(
        publish=(topics.partial(f, parent, gateway).path, metrics, *relayed, *views, chunks),
        retain=(metrics, topics.status_all(f).path, *views, chunks),
        subscribe=(*_downlink(f), *inbox, _chunks(f, parent)),
        deny=deny,
    )


def _own_gateway(fleet: Fleet, gateway: str) -> Rights:
    f = fleet.fleet
    sent = (*_downlink(f), topics.mcu_models(f).path, _chunks(f, gateway))
    inboxes = topics.inbox(f, None, gateway).path  # its cohort's secure aggregation
    heard = (
        topics.updates_to(f, gateway).path,
        topics.partials_to(f, gateway).path,
        topics.telemetry_all(f).path,
        topics.status_all(f).path,
        topics.view_all(f).path,
        *(_chunks(f, m) for m in (*fleet.gateways[gateway].devices, *fleet.children(gateway))),
    )
    return Rights(publish=(*sent, inboxes), retain=sent, subscribe=heard)


def _device(f: str, gateway: str, device: str) -> Rights:
    status, chunks = topics.status(f, device).path, _chunks(f, device)
    return Rights(
        publish=(topics.update(f, gateway, device).path, status, chunks),
        retain=(status, chunks),
        subscribe=(*_downlink(f), topics.inbox(f, device, gateway).path, _chunks(f, gateway)),
    )


def _board(f: str, board: str) -> Rights:
    status = topics.status(f, board).path
    return Rights(
        publish=(topics.telemetry(f, board).path, status),
        retain=(status,),
        subscribe=(topics.mcu_model(f, board).path,),
    )


def _add_boards(
    fleet: Fleet,
    broker: str,
    boards: Boards,
    accounts: dict[str, Account],
    reserved: dict[str, str],
) -> None:
    from gateway.boards import BoardsError  # see the TYPE_CHECKING import above

    if broker == COORDINATOR or (boards.fleet, boards.gateway) != (fleet.fleet, broker):
        raise BoardsError(
            f"lists the boards of gateway {boards.gateway!r} in fleet {boards.fleet!r},"
            f" not of the {broker} broker of {fleet.fleet!r}"
        )
    taken = {*fleet.members, *filter(is_observer, fleet.logins), OBSERVER}
    for board, entry in boards.boards.items():
        try:
            topics.validate_id(entry.mqtt_user, "MQTT user")
        except TernError as exc:
            raise BoardsError(f"board {board}: {exc.message}") from None
        if board in taken or board in reserved:
            raise BoardsError(f"board {board}: its id is a member's id or client id")
        if entry.mqtt_user in taken or entry.mqtt_user in accounts or is_observer(entry.mqtt_user):
            raise BoardsError(f"board {board}: MQTT user {entry.mqtt_user!r} is taken")
        # The boards file holds passwords in clear (a board sends one); hash them here,
        # so that one policy type serves both brokers.
        secret = hash_password(entry.mqtt_password)
        accounts[entry.mqtt_user] = Account(secret, _board(fleet.fleet, board), frozenset({board}))
        reserved[board] = entry.mqtt_user
