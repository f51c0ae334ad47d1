"""Parts of the gateway's round machine (`tern.rounds.gateway`) kept apart to keep it
small: relaying a kernel, folding and sending a plain round's partial (in the schedule's
`partials` codec, with the gateway's error feedback: `tern.rounds.uplink`), and the
failure a gateway sends its parent in place of a partial."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tern import topics
from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.messages import Failure, RoundSchedule, cohort_message, open_kernel
from tern.rounds.collecting import CollectingRound
from tern.rounds.events import Link, Note, Publish
from tern.rounds.secagg_round import SecAggRound
from tern.secagg.ring import decode_sum

if TYPE_CHECKING:
    from tern.rounds.gateway import GatewayMachine

__all__ = ["close_cohort", "close_plain", "close_secagg", "relay_kernel", "send_up"]


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
    s = rnd.schedule
    result = rnd.close()
    collector = rnd.collector
    failed = dict(sorted(collector.failed.items()))
    encoded = g.uplink.encode(rnd.run, s, collector.terms, result) if result.count else None
    message = cohort_message(collector.spec, result, failed, encoded)
    if message is None:
        return [], b"", result.count, failed
    sent, data = send_up(g, rnd.run, s, *message)
    return sent, data, result.count, failed


def send_up(
    g: GatewayMachine, run: int, s: RoundSchedule, kind: Kind, body: object
) -> tuple[list[object], bytes]:
    """Seal `body` as `kind` for the gateway's parent in round `s` and publish it; kept
    (`_sent_up`) to send again when the coordinator's schedule comes again."""
    env = Envelope(kind, g.fleet.fleet, s.round, s.model_version, g.id, body, run=run)
    data = seal(env, g.key)
    topic = topics.partial(g.fleet.fleet, g.parent, g.id)
    g._sent_up = ((run, s.round, s.deadline), topic, data)
    return [Publish(Link.UP, topic, data)], data


def close_secagg(
    g: GatewayMachine, rnd: SecAggRound
) -> tuple[list[object], bytes, int, dict[str, int]]:
    """What a closed cohort sends up (actions), the bytes it sent, how many devices its
    sum counts and the failures below it, by reason. A cohort that failed tells its
    parent why, for every device below (``secagg_<stage>``)."""
    s = rnd.schedule
    sa = s.secagg
    assert sa is not None
    failed = dict(sorted(rnd.failed.items()))
    if rnd.result is None:
        stage = (rnd.stages.failure.split(":", 1)[0] or "secagg")[:24]
        lost = max(sum(rnd.stands_for.values()) - sum(failed.values()), 0)
        if lost:
            failed[f"secagg_{stage}"] = failed.get(f"secagg_{stage}", 0) + lost
        out: list[object] = [Note(logging.WARNING, "", "secagg_failed",
                                  "gateway %s: round %d: secure aggregation failed (%s)",
                                  (g.id, s.round, rnd.stages.failure))]  # fmt: skip
        if not failed:
            return out, b"", 0, failed
        sent, data = send_up(g, rnd.run, s, Kind.FAILURE, Failure(failed).to_body())
        return [*out, *sent], data, 0, failed
    ints = rnd.result
    count = int(ints[-1])
    if g.member is not None and g.member.stamp == rnd.stamp:
        actions = g.member.contribute(ints)  # masked into the parent's cohort
        data = g.member.client.last or b""
        return actions, data, count, failed
    # Not a member of its parent's cohort (its parent is the coordinator): the exact sum,
    # decoded, goes up in the schedule's partials codec like a plain round's fold.
    result = decode_sum(rnd.terms.spec, ints, sa)
    encoded = g.uplink.encode(rnd.run, s, rnd.terms, result) if result.count else None
    message = cohort_message(rnd.terms.spec, result, failed, encoded)
    if message is None:
        return [], b"", count, failed
    sent, data = send_up(g, rnd.run, s, *message)
    return sent, data, count, failed
