"""Parts of the gateway's round machine (`tern.rounds.gateway`) kept apart to keep it
small: relaying a kernel, folding and sending a plain round's partial, and the failure a
gateway sends its parent in place of a partial."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tern import topics
from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.messages import Failure, RoundSchedule, cohort_message, open_kernel
from tern.rounds.collecting import CollectingRound
from tern.rounds.events import Link, Publish
from tern.rounds.gateway_secagg import close_secagg
from tern.rounds.secagg_round import SecAggRound

if TYPE_CHECKING:
    from tern.rounds.gateway import GatewayMachine

__all__ = ["close_cohort", "close_plain", "failure_up", "relay_kernel"]


def relay_kernel(g: GatewayMachine, digest: str, data: bytes) -> list[object]:
    """A kernel from upstream: check the coordinator's signature and its hash, relay it."""
    topic = topics.kernel(g.fleet.fleet, digest)
    if g._retained.get(topic) == data:
        return []  # relayed already (a retained copy after a reconnect)
    try:
        open_kernel(data, g.fleet, digest)
    except TernError as exc:
        g.feed.rejected[f"kernel_{exc.reason}"] += 1
        return g._refused("kernel", exc)
    kernels = [t for t in g._retained if t.kind is topics.TopicKind.KERNEL]
    for old in kernels[:-3]:  # the kernels in use lately are enough to restore
        del g._retained[old]
    return [g._relay(topic, data)]


def close_cohort(
    g: GatewayMachine, rnd: CollectingRound | SecAggRound
) -> tuple[list[object], bytes, int, dict[str, int], int]:
    """Close a round of either kind: `close_plain` or `close_secagg`, and the bytes the
    round received from below."""
    if isinstance(rnd, SecAggRound):
        return (*close_secagg(g, rnd), rnd.bytes_in)
    return (*close_plain(g, rnd), rnd.collector.bytes_in)


def close_plain(
    g: GatewayMachine, rnd: CollectingRound
) -> tuple[list[object], bytes, int, dict[str, int]]:
    """Fold a plain round (its cohort aggregator) and send the partial up, or a failure
    with the reasons when nothing folded: the actions, the bytes sent, the devices
    counted and the failures below, by reason."""
    f, s = g.fleet.fleet, rnd.schedule
    result = rnd.close()
    collector = rnd.collector
    failed = dict(sorted(collector.failed.items()))
    message = cohort_message(collector.spec, result, failed)
    if message is None:
        return [], b"", result.count, failed
    kind, body = message
    env = Envelope(kind, f, s.round, s.model_version, g.id, body, run=rnd.run)
    data = seal(env, g.key)
    topic = topics.partial(f, g.parent, g.id)
    g._sent_up = (rnd.stamp, topic, data)
    return [Publish(Link.UP, topic, data)], data, result.count, failed


def failure_up(
    g: GatewayMachine, run: int, s: RoundSchedule, failed: dict[str, int]
) -> tuple[tuple[int, int, float], topics.Topic, bytes]:
    """(round stamp, topic, sealed failure) for the gateway's parent."""
    body = Failure(failed).to_body()
    env = Envelope(Kind.FAILURE, g.fleet.fleet, s.round, s.model_version, g.id, body, run=run)
    topic = topics.partial(g.fleet.fleet, g.parent, g.id)
    return ((run, s.round, s.deadline), topic, seal(env, g.key))
