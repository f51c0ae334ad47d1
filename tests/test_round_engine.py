"""The round engine's parts alone: stages, the aggregator seam, the loop, replays."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

from broker.loop import Loop
from broker.memory import MemoryBus
from tern import topics
from tern.aggregate import Accumulator, fold_sorted
from tern.aggregators import AGGREGATORS, ExactSum, UnknownAggregator, aggregator_for
from tern.collect import Collector
from tern.fleet import COORDINATOR
from tern.members import new_members
from tern.policy import KNOWN_AGGREGATORS
from tern.rounds.events import (
    CancelTimer,
    Link,
    Linked,
    Note,
    Publish,
    Received,
    SetTimer,
    Timer,
    Unlinked,
)
from tern.rounds.gateway import GatewayMachine
from tern.rounds.stages import Stage, StageError, Stages
from tests.test_collect import PEERS, SPEC, TERMS, _update, topic

# -- stages ---------------------------------------------------------------------------


def test_a_round_of_stages_goes_on_while_each_has_its_survivors() -> None:
    stages = Stages([Stage("keys", 10.0, 3), Stage("shares", 20.0, 3), Stage("unmask", 30.0, 2)])

    assert stages.close(5) and stages.current == Stage("shares", 20.0, 3)
    assert stages.close(3) and stages.close(2)
    assert stages.done and stages.succeeded
    assert stages.survivors == {"keys": 5, "shares": 3, "unmask": 2}


def test_a_stage_left_with_too_few_survivors_fails_the_round_there() -> None:
    stages = Stages([Stage("keys", 10.0, 3), Stage("shares", 20.0, 3)])

    assert not stages.close(2)

    assert stages.done and not stages.succeeded and stages.current is None
    assert stages.failure == "keys: 2 survivors, at least 3 needed"
    with pytest.raises(StageError):
        stages.close(5)


@pytest.mark.parametrize(
    "plan",
    [[], [Stage("a", 2.0), Stage("b", 1.0)], [Stage("a", 1.0), Stage("a", 2.0)],
     [Stage("a", float("nan"))], [Stage("a", 1.0, -1)]],
)  # fmt: skip
def test_a_stage_plan_that_cannot_run_is_refused(plan: list[Stage]) -> None:
    with pytest.raises(StageError):
        Stages(plan)


# -- the aggregator seam ------------------------------------------------------------------


def test_the_exact_sum_is_the_sorted_fold_of_the_decoded_contributions() -> None:
    collector = Collector(terms=TERMS, peers=PEERS)
    for d in ("dev-3", "dev-1", "dev-2"):
        collector.offer(_update(d, 1 + int(d[-1])), topic(d))
    decoded = []
    for d, update in collector.accepted.items():
        acc = Accumulator(SPEC.size)
        update.add_to(acc)
        decoded.append((d, acc.result()))

    folded = ExactSum().fold(collector.accepted, SPEC.size)

    assert folded.left_out == {}
    want = fold_sorted(decoded, SPEC.size)
    assert folded.partial.weighted_sum.tobytes() == want.weighted_sum.tobytes()
    assert (folded.partial.total_weight, folded.partial.count) == (want.total_weight, 3)


def test_every_aggregator_the_policy_knows_is_one_this_build_runs() -> None:
    assert set(AGGREGATORS) == set(KNOWN_AGGREGATORS)
    assert all(aggregator_for(name).name == name for name in AGGREGATORS)
    with pytest.raises(UnknownAggregator) as caught:
        aggregator_for("krum-of-the-future")
    assert caught.value.reason == "policy_unsupported"


def test_a_collector_folds_with_the_aggregator_it_is_given() -> None:
    class FirstOnly:
        name = "first"

        def fold(self, accepted, size):  # type: ignore[no-untyped-def]
            first = min(accepted)
            rest = {s: "not_first" for s in accepted if s != first}
            one = ExactSum().fold({first: accepted[first]}, size)
            return type(one)(one.partial, rest)

    collector = Collector(terms=TERMS, peers=PEERS, aggregator=FirstOnly())
    for d in ("dev-1", "dev-2"):
        collector.offer(_update(d, int(d[-1])), topic(d))

    result = collector.close()

    assert result.count == 1 and sorted(collector.accepted) == ["dev-1"]
    assert collector.rejected == Counter({"not_first": 1})


# -- the loop ------------------------------------------------------------------------------


def test_the_loop_fires_timers_in_order_and_a_cancelled_one_never() -> None:
    now = [100.0]
    seen: list[str] = []

    def machine(event: object, at: float) -> list[object]:
        if event == "go":
            return [SetTimer("b", 102.0), SetTimer("a", 101.0), SetTimer("c", 103.0),
                    CancelTimer("c")]  # fmt: skip
        if isinstance(event, Timer):
            seen.append(f"{event.key}@{at}")
        return []

    loop = Loop("t", machine, clock=lambda: now[0])
    loop.post("go")
    loop.run_pending()
    while (at := loop.next_timer()) is not None:
        now[0] = at
        loop.run_pending()

    assert seen == ["a@101.0", "b@102.0"]


def test_a_failing_action_or_machine_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = MemoryBus()
    out, inbox = bus.transport("out").connect(), []
    watcher = bus.transport("watcher").connect()
    watcher.subscribe("tern/f/status/+", lambda m: inbox.append(m.payload))
    status = topics.status("f", "x")

    def machine(event: object, at: float) -> list[object]:
        if event == "boom":
            raise RuntimeError("a bug")
        return [object(), Publish(Link.UP, status, b"still here")]  # no executor for object

    loop = Loop("t", machine, links={Link.UP: out})
    loop.post("boom")
    loop.post("fine")
    with caplog.at_level(logging.ERROR):
        loop.run_pending()
    bus.deliver()

    assert inbox == [b"still here"] and loop.failures == 2


def test_notes_are_rate_limited_per_key_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    def machine(event: object, at: float) -> list[object]:
        return [Note(logging.WARNING, "dev-1", "bad_signature", "refused %s", ("dev-1",)),
                Note(logging.WARNING, "", "", "round %d closed", (1,))]  # fmt: skip

    loop = Loop("t", machine)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            loop.post("x")
        loop.run_pending()

    assert [r.getMessage() for r in caplog.records].count("refused dev-1") == 1
    assert [r.getMessage() for r in caplog.records].count("round 1 closed") == 5


def test_the_loop_tells_its_machine_when_a_link_goes_down_and_comes_back() -> None:
    bus = MemoryBus()
    link = bus.transport("gw-1-up").connect()
    seen: list[object] = []
    loop = Loop("t", lambda event, at: seen.append(event) or [], links={Link.UP: link})
    loop.linked(Link.UP)
    loop.run_pending()

    bus.restart()
    loop.run_pending()
    loop.run_pending()  # down once is told once
    bus.up()
    loop.run_pending()

    assert seen == [Linked(Link.UP), Unlinked(Link.UP), Linked(Link.UP, again=True)]


# -- replays ---------------------------------------------------------------------------------


def test_a_log_of_events_replays_to_the_same_actions() -> None:
    members = new_members("plant", {"gw-1": (COORDINATOR, ["dev-1"])}, rng=np.random.default_rng(3))
    rng = np.random.default_rng(1)
    log: list[tuple[object, float]] = [
        (Received(Link.DOWN, "tern/plant/update/gw-1/dev-1", rng.bytes(64)), 5.0),
        (Received(Link.UP, "tern/plant/schedule", b"\xa1"), 6.0),
        (Timer("stage"), 7.0),
    ]

    def replay() -> list[object]:
        machine = GatewayMachine("gw-1", members.fleet, members.keys["gw-1"], depth=1, margin=0.5)
        return [a for event, now in log for a in machine.handle(event, now)]

    first, second = replay(), replay()

    assert first == second
    assert machine_refusals(first) == ["no_open_round", "malformed"]


def machine_refusals(actions: list[object]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Note) and a.key]
