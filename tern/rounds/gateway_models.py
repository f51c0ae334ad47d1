"""How a gateway keeps the coordinator's model and passes it down (tern.rounds.follow):
it follows the deltas from upstream, relays every fresh delta to its own broker as it
came (the coordinator's signature stays on it), and keeps there, retained, the full
model of the version it holds, for devices and child gateways that cannot follow."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tern import topics
from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.rounds.device import SaveMarks
from tern.rounds.follow import Adopted

if TYPE_CHECKING:
    from tern.rounds.gateway import GatewayMachine

__all__ = ["on_model", "passed_down"]


def on_model(g: GatewayMachine, data: bytes, now: float, *, full: bool) -> list[object]:
    """A full model or a delta from upstream."""
    out: list[object] = []
    try:
        if full:
            adopted = g.follower.on_full(data)
        else:
            _, adopted = g.follower.on_delta(data)
            topic = topics.model_delta(g.fleet.fleet)
            if g._retained.get(topic) != data:
                out.append(g._relay(topic, data))  # its devices may hold the base
    except TernError as exc:
        return g._refused("model" if full else "delta", exc)
    return [*out, *passed_down(g, adopted, data if full else None), *g._maybe_open(now)]


def passed_down(g: GatewayMachine, adopted: list[Adopted], data: bytes | None) -> list[object]:
    """What a gateway does with models it now holds: its marks, the full model for its
    own broker (the coordinator's bytes when they came as such, else sealed by the
    gateway: receivers check it against the coordinator's signed hash), its boards'."""
    from tern.rounds.gateway import ModelTaken  # the machine's own action

    out: list[object] = [SaveMarks(g.feed.marks)] if adopted else []
    out += g.follower.subscription()
    f = g.fleet.fleet
    for a in adopted:
        if a.envelope.sender == COORDINATOR and a.envelope.kind is Kind.MODEL and data is not None:
            sealed = data
        else:
            env = Envelope(Kind.MODEL, f, a.envelope.round, a.stamp.version, g.id,
                           a.model.to_body(), run=a.stamp.run)  # fmt: skip
            sealed = seal(env, g.key)
        out.append(g._relay(topics.global_model(f), sealed))
        out.append(ModelTaken(a.stamp.run, a.stamp.version, a.model))
    return out
