"""A gateway's view of what is below it, as a pure state machine.

It hears, on the gateway's own broker, the statuses of its devices, boards and child
gateways, its boards' telemetry, and its child gateways' views; it keeps each member's
last state and publishes the gateway's view (`tern.reports.FleetView`), retained, on its
parent's broker when something changed, at most once every `every` seconds. Its child
gateways' views go up unchanged once checked, so one subscription to ``view/+`` on the top
broker sees the whole tree (topics.md, "Fleet view").

Only the gateway's own members count: a status or telemetry under any other id, a view
from a gateway that is not below it, or a payload that does not parse is refused and
counted by reason as ``view_<reason>`` (in the gateway's metrics, `rejected`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

from tern import topics
from tern.errors import TernError, brief
from tern.fleet import Fleet
from tern.reports import (
    FleetView,
    MemberView,
    Reading,
    Role,
    State,
    Status,
    Telemetry,
    ViewState,
)
from tern.rounds.events import Link, Linked, Note, Publish, Received, SetTimer, Timer

__all__ = ["VIEW_TIMER", "SetBoards", "ViewMachine"]

VIEW_TIMER = "view"
_KINDS = (topics.TopicKind.STATUS, topics.TopicKind.TELEMETRY, topics.TopicKind.VIEW)


@dataclass(frozen=True, slots=True)
class SetBoards:
    """Event: the gateway's registered boards are these now (a reloaded boards file)."""

    boards: tuple[str, ...]


class ViewMachine:
    """The view of gateway `gateway` of `fleet`, with its registered `boards`."""

    def __init__(
        self, fleet: Fleet, gateway: str, boards: Iterable[str] = (), *, every: float = 1.0
    ) -> None:
        self.fleet, self.id, self.every = fleet, gateway, every
        self.parent = fleet.gateways[gateway].parent
        self.members: dict[str, MemberView] = {}
        self._roles: dict[str, Role] = {}
        for d in fleet.gateways[gateway].devices:
            self._roles[d] = Role.DEVICE
        for g in fleet.children(gateway):
            self._roles[g] = Role.GATEWAY
        self.set_boards(boards)
        # gateways whose views this one relays: its descendants, -> their parent
        self._below = {g: fleet.gateways[g].parent for g in _descendants(fleet, gateway)}
        self._relayed: dict[str, bytes] = {}  # gateway -> its last view, as relayed
        # boards in those views, by gateway (their statuses come relayed): bounded by the
        # fleet's gateways and the members a view may list
        self._boards_below: dict[str, frozenset[str]] = {}
        self.round: int | None = None
        self.rejected: Counter[str] = Counter()  # view_<reason>
        self._dirty = True
        self._published_at: float | None = None
        self._timer_set = False

    def set_boards(self, boards: Iterable[str]) -> None:
        """The gateway's registered boards now (a reloaded boards file)."""
        for m in [m for m, r in self._roles.items() if r is Role.BOARD]:
            del self._roles[m]
            self.members.pop(m, None)
        for b in boards:
            self._roles.setdefault(b, Role.BOARD)
        self._dirty = True

    def offer(self, event: object, now: float) -> list[object] | None:
        """The actions for `event` when it is this machine's, else None (the round
        machine's): each message's topic is parsed once, here."""
        if isinstance(event, SetBoards):
            self.set_boards(event.boards)
            return self._changed(now)
        if isinstance(event, Timer):
            if event.key != VIEW_TIMER:
                return None
            self._timer_set = False
            return self._publish(now) if self._dirty else []
        if isinstance(event, Received) and event.link is Link.DOWN:
            parsed = topics.parse_in(event.topic, self.fleet.fleet)
            if parsed is None or parsed.kind not in _KINDS:
                return None
            return self._received(parsed, event.payload, now)
        return None

    def view(self, now: float) -> FleetView:
        members = {m: self.members.get(m, MemberView(r)) for m, r in self._roles.items()}
        return FleetView(self.id, self.parent, now, self.round, members)

    # -- events -------------------------------------------------------------------------

    def handle(self, event: object, now: float) -> list[object]:
        if isinstance(event, Linked) and event.link is Link.UP:
            # (re)connected upstream: the broker may have lost what was retained there
            f = self.fleet.fleet
            again = [Publish(Link.UP, topics.view(f, g), v, retain=True)
                     for g, v in sorted(self._relayed.items())]  # fmt: skip
            return [*self._publish(now), *again]
        return self.offer(event, now) or []

    def _received(self, parsed: topics.Topic, payload: bytes, now: float) -> list[object]:
        if parsed.sender is None:
            return []
        try:
            if parsed.kind is topics.TopicKind.VIEW:
                return self._on_view(parsed.sender, payload, now)
            if parsed.sender not in self._roles and self._below_board(parsed.sender):
                return []  # a child gateway relays its boards: they are in its view
            if parsed.kind is topics.TopicKind.STATUS:
                changed = self._on_status(parsed.sender, payload)
            else:
                changed = self._on_telemetry(parsed.sender, payload)
        except TernError as exc:
            return self._refuse(parsed, exc)
        return self._changed(now) if changed else []

    def round_closed(self, round: int, now: float) -> list[object]:
        """A round closed at the gateway: its number goes in the view."""
        if self.round == round:
            return []
        self.round = round
        return self._changed(now)

    # -- what arrives -------------------------------------------------------------------

    def _role_of(self, member: str, wanted: tuple[Role, ...]) -> Role:
        role = self._roles.get(member)
        if role is None:
            raise _Refused("not_member", f"{member} is not a device, board or gateway here")
        if role not in wanted:
            raise _Refused("wrong_role", f"{member} is a {role}")
        return role

    def _on_status(self, member: str, data: bytes) -> bool:
        role = self._role_of(member, (Role.DEVICE, Role.BOARD, Role.GATEWAY))
        status = Status.from_json(data)
        if status.id != member:
            raise _Refused("wrong_id", f"a status of another id on {member}'s topic")
        if status.role != str(role):
            raise _Refused("wrong_role", f"{member} says it is a {brief(status.role, 20)}")
        old = self.members.get(member, MemberView(role))
        online = status.state is State.ONLINE
        new = replace(
            old,
            state=ViewState.ONLINE if online else ViewState.OFFLINE,
            activity=status.activity if online else None,
            last_round=old.last_round if status.last_round is None else status.last_round,
            last_error=old.last_error if status.last_error is None else status.last_error or None,
        )
        self.members[member] = new
        return new != old

    def _on_telemetry(self, member: str, data: bytes) -> bool:
        role = self._role_of(member, (Role.BOARD,))
        t = Telemetry.from_json(data)
        if t.device != member:
            raise _Refused("wrong_id", f"telemetry of another id on {member}'s topic")
        old = self.members.get(member, MemberView(role))
        new = replace(old, telemetry=Reading.of(t))
        self.members[member] = new
        return new != old

    def _on_view(self, gateway: str, data: bytes, now: float) -> list[object]:
        if gateway not in self._below:
            raise _Refused("not_below", f"{gateway} is not a gateway below {self.id}")
        if self._relayed.get(gateway) == data:
            return []  # a retained copy again (a reconnect)
        view = FleetView.from_json(data)
        if view.gateway != gateway or view.parent != self._below[gateway]:
            raise _Refused("wrong_id", f"a view of another gateway on {gateway}'s topic")
        entry = self.fleet.gateways[gateway]
        children = set(self.fleet.children(gateway))
        members = set(self.fleet.members)
        for m, mv in view.members.items():
            ok = (
                (mv.role is Role.DEVICE and m in entry.devices)
                or (mv.role is Role.GATEWAY and m in children)
                or (mv.role is Role.BOARD and m not in members)
            )
            if not ok:
                raise _Refused("wrong_member", f"{gateway}'s view lists {m} as a {mv.role}")
        boards = frozenset(m for m, mv in view.members.items() if mv.role is Role.BOARD)
        self._boards_below[gateway] = boards
        self._relayed[gateway] = data
        return [Publish(Link.UP, topics.view(self.fleet.fleet, gateway), data, retain=True)]

    def _below_board(self, member: str) -> bool:
        return any(member in boards for boards in self._boards_below.values())

    def _refuse(self, parsed: topics.Topic, exc: TernError) -> list[object]:
        self.rejected[f"view_{exc.reason}"] += 1
        what, who = str(parsed.kind), parsed.sender or ""
        text = "gateway %s: refused a %s from %s (%s): %s"
        args = (self.id, what, who, exc.reason, exc.message)
        return [Note(logging.WARNING, who, f"view_{exc.reason}", text, args)]

    # -- what goes up -------------------------------------------------------------------

    def _changed(self, now: float) -> list[object]:
        self._dirty = True
        if self._timer_set:
            return []
        last = self._published_at
        if last is None or now - last >= self.every:
            return self._publish(now)
        self._timer_set = True
        return [SetTimer(VIEW_TIMER, last + self.every)]

    def _publish(self, now: float) -> list[object]:
        self._dirty = False
        self._published_at = now
        data = self.view(now).to_json()
        return [Publish(Link.UP, topics.view(self.fleet.fleet, self.id), data, retain=True)]


class _Refused(TernError):
    """A status, telemetry or view this gateway does not take (its `reason` says why)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _descendants(fleet: Fleet, gateway: str) -> list[str]:
    out: list[str] = []
    for child in fleet.children(gateway):
        out += [child, *_descendants(fleet, child)]
    return out
