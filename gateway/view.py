"""The gateway's view of what is below it (tern.fleetview), wired to its loop.

One loop runs both of the gateway's machines: the round machine (tern.rounds.gateway)
and the view machine (tern.fleetview.ViewMachine), which takes the statuses, telemetry
and child gateways' views that arrive downstream and publishes the gateway's view
upstream. The boards' relay (gateway.mcu) hears the same statuses and telemetry.
"""

from __future__ import annotations

from collections.abc import Callable

from broker.transport import Message, Transport
from gateway.mcu import BoardRelay
from tern import topics
from tern.fleet import COORDINATOR, Fleet
from tern.fleetview import ViewMachine
from tern.rounds.events import Link, Linked
from tern.rounds.gateway import CohortClosed, GatewayMachine

__all__ = ["GatewayMachines", "subscribe_above", "subscribe_below"]

Handler = Callable[[Message], None]


def subscribe_above(up: Transport, fleet: Fleet, gateway: str, handler: Handler) -> None:
    """What `gateway` hears on its parent's broker: the coordinator's model, schedule and
    kernels, and, below another gateway, that gateway's secure aggregation messages to it
    (a member of its parent's cohort)."""
    f = fleet.fleet
    # the full model until a schedule says deltas come, then only while it cannot follow
    # them (tern.rounds.follow unsubscribes and subscribes again)
    for flt in (topics.global_model(f), topics.model_delta(f), topics.round_schedule(f),
                topics.kernels(f)):  # fmt: skip
        up.subscribe(flt, handler)
    parent = fleet.gateways[gateway].parent
    if parent != COORDINATOR:
        up.subscribe(topics.inbox(f, gateway, parent), handler)


def subscribe_below(
    down: Transport, fleet: str, gateway: str, handler: Handler, boards: BoardRelay | None
) -> None:
    """Everything `gateway` hears on its own broker, posted by `handler` to its loop: its
    devices' updates, its child gateways' partials and views, and every status and
    telemetry (also handed to its boards' relay, when it has boards)."""
    down.subscribe(topics.updates_to(fleet, gateway), handler)
    down.subscribe(topics.partials_to(fleet, gateway), handler)
    down.subscribe(topics.view_all(fleet), handler)
    on_telemetry, on_status = handler, handler
    if boards is not None:
        on_telemetry = _both(boards.on_telemetry, handler)
        on_status = _both(boards.on_status, handler)
    down.subscribe(topics.telemetry_all(fleet), on_telemetry)
    down.subscribe(topics.status_all(fleet), on_status)


def _both(first: Handler, second: Handler) -> Handler:
    def on_message(message: Message) -> None:
        first(message)
        second(message)

    return on_message


class GatewayMachines:
    """The round machine and the view machine behind one `handle`; `on_again_down` runs
    when the downstream link is back after a reconnect (the boards' models to restore)."""

    def __init__(
        self, rounds: GatewayMachine, view: ViewMachine, on_again_down: Callable[[], None]
    ) -> None:
        self.rounds, self.view, self._on_again_down = rounds, view, on_again_down

    def handle(self, event: object, now: float) -> list[object]:
        mine = self.view.offer(event, now)
        if mine is not None:
            return mine
        actions = self.rounds.handle(event, now)
        if isinstance(event, Linked):
            if event.link is Link.UP:
                actions += self.view.handle(event, now)
            elif event.again:
                self._on_again_down()
        for action in actions:
            if isinstance(action, CohortClosed):
                actions = actions + self.view.round_closed(action.metrics.round, now)
        return actions
