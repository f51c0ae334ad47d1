"""What a viewer of one fleet knows, built from the JSON topics it receives (pure, no I/O).

`ViewerState.feed(topic, payload)` takes each message a viewer's subscriptions deliver
(`FILTERS`): the coordinator's round metrics (retained, so the viewer keeps a history of
every new one it sees), each gateway's metrics, every status, each gateway's view of the
members below it, and board telemetry. Every payload goes through `tern.reports`' strict
parsers; whatever is refused (not a topic of the fleet, too large, malformed, a payload
naming someone other than its topic, beyond the viewer's caps) is counted by reason and
otherwise ignored: any byte from the broker is hostile, and a viewer never crashes on one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TypeVar

from tern import topics
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.reports import FleetView, MemberView, Reading, RoundMetrics, Status, Telemetry
from tern.topics import Topic, TopicKind

__all__ = ["MAX_MEMBERS", "MAX_ROUNDS", "FleetNode", "ViewerState", "filters"]

MAX_ROUNDS = 10_000  # coordinator rounds kept (the oldest go first)
MAX_MEMBERS = 10_000  # ids with a status, view or telemetry (new ones beyond it are refused)

_T = TypeVar("_T")
_WATCHED = (TopicKind.METRICS, TopicKind.STATUS, TopicKind.VIEW, TopicKind.TELEMETRY)


def filters(fleet: str) -> tuple[Topic, ...]:
    """What a viewer subscribes to on the top broker (the observer may read all of them)."""
    return tuple(Topic(kind, fleet) for kind in _WATCHED)


@dataclass(frozen=True, slots=True)
class FleetNode:
    """One component in the fleet tree, with what is known of its state."""

    id: str
    role: str  # coordinator | gateway | device | board
    state: str  # online | offline | unknown
    activity: str | None = None
    last_round: int | None = None
    last_error: str | None = None
    detail: str = ""
    telemetry: Reading | None = None  # a board's last prediction
    children: tuple[FleetNode, ...] = ()


class ViewerState:
    """A fleet's rounds, gateways, members and telemetry as one viewer has seen them."""

    def __init__(
        self, fleet: str, *, max_rounds: int = MAX_ROUNDS, max_members: int = MAX_MEMBERS
    ) -> None:
        self.fleet = topics.validate_id(fleet, "fleet")
        self.max_rounds, self.max_members = max_rounds, max_members
        self._rounds: dict[int, RoundMetrics] = {}
        self.gateway_rounds: dict[str, RoundMetrics] = {}  # the last metrics of each gateway
        self.statuses: dict[str, Status] = {}
        self.views: dict[str, FleetView] = {}
        self.telemetry: dict[str, Telemetry] = {}
        self.refused: Counter[str] = Counter()
        self.messages = 0  # taken (refused ones are in `refused`)

    # -- input ----------------------------------------------------------------------

    def feed(self, topic: str, payload: bytes) -> str | None:
        """Take one message; None when taken, else why it was refused (also counted)."""
        reason = self._take(topic, payload)
        if reason is None:
            self.messages += 1
        else:
            self.refused[reason] += 1
        return reason

    def _take(self, topic: str, payload: bytes) -> str | None:
        parsed = topics.parse_in(topic, self.fleet)
        if parsed is None:
            return "bad_topic"
        if parsed.kind not in _WATCHED or parsed.sender is None:
            return "unwatched"
        sender = parsed.sender
        if not payload:  # a retained message cleared: forget it
            self._forget(parsed.kind, sender)
            return None
        try:
            return self._parse(parsed.kind, sender, payload)
        except TernError as exc:
            return exc.reason

    def _parse(self, kind: TopicKind, sender: str, payload: bytes) -> str | None:
        if kind is TopicKind.METRICS:
            metrics = RoundMetrics.from_json(payload)
            if metrics.component != sender:
                return "mismatch"
            return self._metrics(metrics)
        if kind is TopicKind.STATUS:
            status = Status.from_json(payload)
            if status.id != sender:
                return "mismatch"
            return self._keep(self.statuses, sender, status)
        if kind is TopicKind.VIEW:
            view = FleetView.from_json(payload)
            if view.gateway != sender:
                return "mismatch"
            return self._keep(self.views, sender, view)
        telemetry = Telemetry.from_json(payload)
        if telemetry.device != sender:
            return "mismatch"
        return self._keep(self.telemetry, sender, telemetry)

    def _metrics(self, metrics: RoundMetrics) -> str | None:
        if metrics.component != COORDINATOR:
            return self._keep(self.gateway_rounds, metrics.component, metrics)
        last = max(self._rounds, default=None)
        if last is not None and metrics.round < last:
            self._rounds.clear()  # a round number going back: the coordinator began a new run
        self._rounds[metrics.round] = metrics
        while len(self._rounds) > self.max_rounds:
            del self._rounds[min(self._rounds)]
        return None

    def _keep(self, table: dict[str, _T], key: str, value: _T) -> str | None:
        if key not in table and len(table) >= self.max_members:
            return "full"
        table[key] = value
        return None

    def _forget(self, kind: TopicKind, sender: str) -> None:
        """A retained message cleared: the coordinator's rounds stay (they are history)."""
        if kind is TopicKind.STATUS:
            self.statuses.pop(sender, None)
        elif kind is TopicKind.VIEW:
            self.views.pop(sender, None)
        elif kind is TopicKind.TELEMETRY:
            self.telemetry.pop(sender, None)
        else:
            self.gateway_rounds.pop(sender, None)

    # -- what a view shows ------------------------------------------------------------

    @property
    def rounds(self) -> list[RoundMetrics]:
        """The coordinator's closed rounds seen so far, oldest first."""
        return [self._rounds[r] for r in sorted(self._rounds)]

    def gateway_ids(self) -> list[str]:
        ids = set(self.views) | set(self.gateway_rounds)
        ids |= {s.id for s in self.statuses.values() if s.role == "gateway"}
        for view in self.views.values():
            ids |= {m for m, info in view.members.items() if info.role == "gateway"}
        return sorted(ids)

    def tree(self) -> FleetNode:
        """The coordinator, its gateways (at any depth) and each gateway's members."""
        gateways = self.gateway_ids()
        parent = {g: self.views[g].parent if g in self.views else COORDINATOR for g in gateways}
        for view in self.views.values():  # a child gateway not yet seen with its own view
            for m, info in view.members.items():
                if info.role == "gateway" and m not in self.views:
                    parent[m] = view.gateway
        placed: set[str] = {COORDINATOR, *gateways}

        def gateway(gid: str, seen: frozenset[str]) -> FleetNode:
            view = self.views.get(gid)
            members = [] if view is None else sorted(view.members)
            leaves = [self._member(gid, m) for m in members if m not in parent]
            placed.update(m for m in members if m not in parent)
            kids = [gateway(c, seen | {c}) for c in gateways if parent[c] == gid and c not in seen]
            return self._node(gid, "gateway", None, children=(*kids, *leaves))

        tops = [gateway(g, frozenset({g})) for g in gateways if parent[g] not in parent]
        others = [
            self._node(s.id, s.role, None)
            for s in sorted(self.statuses.values(), key=lambda s: s.id)
            if s.id not in placed
        ]
        others += [
            self._node(d, "board", None)
            for d in sorted(self.telemetry)
            if d not in placed and d not in self.statuses
        ]
        return self._node(COORDINATOR, "coordinator", None, children=(*tops, *others))

    def _member(self, gateway: str, member: str) -> FleetNode:
        info = self.views[gateway].members[member]
        return self._node(member, str(info.role), info)

    def _node(
        self,
        id: str,
        role: str,
        info: MemberView | None,
        children: tuple[FleetNode, ...] = (),
    ) -> FleetNode:
        """`id`'s node: its own status when the viewer has one, else its gateway's view."""
        status = self.statuses.get(id)
        own = self.telemetry.get(id)
        reading = Reading.of(own) if own is not None else info.telemetry if info else None
        if status is not None:
            return FleetNode(
                id,
                role,
                str(status.state),
                None if status.activity is None else str(status.activity),
                status.last_round,
                status.last_error,
                status.detail,
                reading,
                children,
            )
        if info is None:
            return FleetNode(id, role, "unknown", telemetry=reading, children=children)
        return FleetNode(
            id,
            role,
            str(info.state),
            None if info.activity is None else str(info.activity),
            info.last_round,
            info.last_error,
            telemetry=reading,
            children=children,
        )
