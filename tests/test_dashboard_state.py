"""The viewer's model of a fleet (dashboard.state) and the terminal view drawn from it."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from dashboard.render import BLOCKS, screen, sparkline
from dashboard.state import FleetNode, ViewerState, filters
from tern import topics
from tern.reports import (
    Activity,
    FleetView,
    MemberView,
    Reading,
    Role,
    RoundMetrics,
    State,
    Status,
    Telemetry,
    ViewState,
)

FLEET = "plant-7"


def metrics(round: int, accuracy: float | None = 0.5, component: str = "coordinator") -> bytes:
    return RoundMetrics(
        component, round, round, 4, 1, {"bad_signature": 1}, 100, 200, accuracy, 0.7, 1.5
    ).to_json()


def status(id: str, role: str, state: State = State.ONLINE, **extra: object) -> bytes:
    return Status(id, role, state, "0.1.0", **extra).to_json()  # type: ignore[arg-type]


def view(gateway: str, members: dict[str, MemberView], parent: str = "coordinator") -> bytes:
    return FleetView(gateway, parent, 1_796_000_000.0, 3, members).to_json()


def fed(*messages: tuple[str, bytes]) -> ViewerState:
    state = ViewerState(FLEET)
    for topic, payload in messages:
        assert state.feed(topic, payload) is None, topic
    return state


def find(node: FleetNode, id: str) -> FleetNode:
    if node.id == id:
        return node
    for child in node.children:
        try:
            return find(child, id)
        except LookupError:
            pass
    raise LookupError(id)


def test_the_viewer_subscribes_to_metrics_status_views_and_telemetry() -> None:
    paths = {t.path for t in filters(FLEET)}

    assert paths == {
        topics.Topic(topics.TopicKind.METRICS, FLEET).path,
        topics.status_all(FLEET).path,
        topics.view_all(FLEET).path,
        topics.telemetry_all(FLEET).path,
    }


def test_each_new_coordinator_metrics_message_adds_a_round_to_the_history() -> None:
    m = topics.metrics(FLEET, "coordinator").path

    state = fed((m, metrics(1, 0.3)), (m, metrics(2, 0.5)), (m, metrics(2, 0.5)), (m, metrics(3)))

    assert [r.round for r in state.rounds] == [1, 2, 3]
    assert state.rounds[1].accuracy == 0.5


def test_a_round_number_going_back_starts_a_new_history() -> None:
    m = topics.metrics(FLEET, "coordinator").path

    state = fed((m, metrics(7)), (m, metrics(8)), (m, metrics(1)))

    assert [r.round for r in state.rounds] == [1]


def test_the_history_keeps_only_the_newest_rounds_beyond_its_cap() -> None:
    state = ViewerState(FLEET, max_rounds=3)
    for r in range(1, 6):
        state.feed(topics.metrics(FLEET, "coordinator").path, metrics(r))

    assert [r.round for r in state.rounds] == [3, 4, 5]


def test_gateway_metrics_are_kept_per_gateway_not_as_rounds() -> None:
    state = fed((topics.metrics(FLEET, "gw-1").path, metrics(4, None, "gw-1")))

    assert state.rounds == []
    assert state.gateway_rounds["gw-1"].rejected == {"bad_signature": 1}


def test_the_fleet_tree_places_devices_and_boards_under_their_gateways() -> None:
    reading = Reading(3, 0.9, 5120, 7, 881)
    state = fed(
        (topics.status(FLEET, "coordinator").path, status("coordinator", "coordinator")),
        (topics.status(FLEET, "gw-1").path, status("gw-1", "gateway")),
        (
            topics.view(FLEET, "gw-1").path,
            view(
                "gw-1",
                {
                    "dev-01": MemberView(Role.DEVICE, ViewState.ONLINE, Activity.TRAINING, 3),
                    "esp-1": MemberView(Role.BOARD, ViewState.ONLINE, telemetry=reading),
                    "gw-2": MemberView(Role.GATEWAY, ViewState.OFFLINE),
                },
            ),
        ),
        (
            topics.view(FLEET, "gw-2").path,
            view("gw-2", {"dev-02": MemberView(Role.DEVICE)}, "gw-1"),
        ),
    )

    tree = state.tree()

    assert (tree.id, tree.state) == ("coordinator", "online")
    assert [c.id for c in tree.children] == ["gw-1"]
    assert [c.id for c in find(tree, "gw-1").children] == ["gw-2", "dev-01", "esp-1"]
    assert find(tree, "dev-01").activity == "training"
    assert find(tree, "dev-01").last_round == 3
    assert find(tree, "esp-1").telemetry == reading
    assert find(tree, "dev-02").state == "unknown"


def test_a_members_own_status_and_telemetry_win_over_its_gateways_view() -> None:
    state = fed(
        (topics.view(FLEET, "gw-1").path, view("gw-1", {"esp-1": MemberView(Role.BOARD)})),
        (
            topics.status(FLEET, "esp-1").path,
            status("esp-1", "board", State.OFFLINE, detail="connection lost"),
        ),
        (topics.telemetry(FLEET, "esp-1").path, Telemetry("esp-1", 9, 1, 2, 0.5, 400).to_json()),
    )

    node = find(state.tree(), "esp-1")

    assert (node.state, node.detail) == ("offline", "connection lost")
    assert node.telemetry is not None and node.telemetry.model_version == 9


def test_members_heard_of_only_by_status_or_telemetry_hang_from_the_root() -> None:
    state = fed(
        (topics.status(FLEET, "esp-9").path, status("esp-9", "board")),
        (topics.telemetry(FLEET, "esp-8").path, Telemetry("esp-8", 1, 1, 2, 0.5, 400).to_json()),
    )

    assert [c.id for c in state.tree().children] == ["esp-9", "esp-8"]


def test_a_cleared_retained_status_is_forgotten() -> None:
    topic = topics.status(FLEET, "gw-1").path
    state = fed((topic, status("gw-1", "gateway")), (topic, b""))

    assert state.statuses == {}


HOSTILE = [
    ("tern/other-fleet/metrics/coordinator", metrics(1), "bad_topic"),
    ("tern/plant-7/model", b"x", "unwatched"),
    ("tern/plant-7/metrics/+", metrics(1), "bad_topic"),
    ("not/a/tern/topic", b"{}", "bad_topic"),
    ("tern/plant-7/metrics/coordinator", b"\xff\xfe", "malformed"),
    ("tern/plant-7/metrics/coordinator", b"[1, 2]", "malformed"),
    ("tern/plant-7/metrics/coordinator", b'{"round": NaN}', "malformed"),
    ("tern/plant-7/metrics/coordinator", b"[" * 100_000, "oversize"),
    ("tern/plant-7/metrics/coordinator", b"[" * 5_000 + b"]" * 5_000, "malformed"),
    ("tern/plant-7/metrics/gw-1", metrics(1), "mismatch"),
    ("tern/plant-7/status/gw-1", status("gw-2", "gateway"), "mismatch"),
    ("tern/plant-7/status/gw-1", b'{"id": "gw-1"}', "malformed"),
    ("tern/plant-7/status/gw-1", b" " * 5000, "oversize"),
    ("tern/plant-7/telemetry/esp-1", Telemetry("esp-2", 1, 1, 1, 0.5, 1).to_json(), "mismatch"),
    ("tern/plant-7/view/gw-1", b'{"gateway": "gw-1", "members": []}', "malformed"),
]


def test_hostile_messages_are_refused_with_a_reason_and_counted() -> None:
    state = ViewerState(FLEET)

    reasons = [state.feed(topic, payload) for topic, payload, _ in HOSTILE]

    assert reasons == [reason for _, _, reason in HOSTILE]
    assert sum(state.refused.values()) == len(HOSTILE)
    assert state.messages == 0
    assert state.rounds == [] and state.statuses == {} and state.views == {}


def test_new_members_beyond_the_cap_are_refused_as_full() -> None:
    state = ViewerState(FLEET, max_members=2)
    for i in range(3):
        reason = state.feed(topics.status(FLEET, f"dev-{i}").path, status(f"dev-{i}", "device"))

    assert reason == "full"
    assert sorted(state.statuses) == ["dev-0", "dev-1"]


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["metrics", "status", "view", "telemetry"]),
    payload=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda c: (
                st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=6)
            ),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
    ),
)
def test_no_payload_crashes_the_viewer(kind: str, payload: bytes) -> None:
    state = ViewerState(FLEET)

    reason = state.feed(f"tern/{FLEET}/{kind}/gw-1", payload)

    assert (reason is None) == (state.messages == 1)
    assert state.tree().id == "coordinator"


def test_the_sparkline_spans_the_blocks_from_lowest_to_highest() -> None:
    assert sparkline([0.1, None, 0.5, 0.9]) == BLOCKS[0] + " " + BLOCKS[4] + BLOCKS[-1]
    assert sparkline([0.5, 0.5]) == BLOCKS[-1] * 2
    assert sparkline([]) == ""
    assert len(sparkline([0.5] * 100, width=10)) == 10


def test_the_screen_shows_rounds_gateways_and_broker_text_without_obeying_markup() -> None:
    state = fed(
        (topics.metrics(FLEET, "coordinator").path, metrics(1, 0.25)),
        (topics.metrics(FLEET, "coordinator").path, metrics(2, 0.75)),
        (topics.metrics(FLEET, "gw-1").path, metrics(2, None, "gw-1")),
        (
            topics.status(FLEET, "dev-01").path,
            status("dev-01", "device", State.OFFLINE, detail="[bold red]x[/]"),
        ),
    )
    console = Console(width=140, record=True, color_system=None)

    console.print(screen(state, "title"))
    text = console.export_text()

    assert "0.750" in text and "0.250" in text
    assert "gw-1" in text and "bad_signature 1" in text
    assert "[bold red]x[/]" in text
    assert BLOCKS[0] + BLOCKS[-1] in text
