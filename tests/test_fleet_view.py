"""The fleet view: statuses with activity, a gateway's view of its own members, relayed up.

Pure tests of the payloads (tern.reports) and of the view machine (tern.fleetview), then
a two-level fleet on real brokers where one subscription on the top broker sees every
device of the tree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.fleet_access import broker_policy
from broker.limits import fleet_limits
from coordinator import Coordinator, CoordinatorConfig
from device import NumpyTrainer
from tern import topics
from tern.errors import MalformedMessage, PayloadTooLarge, TernError
from tern.fleet import COORDINATOR
from tern.fleetview import VIEW_TIMER, SetBoards, ViewMachine
from tern.reports import (
    MAX_VIEW_BYTES,
    MAX_VIEW_MEMBERS,
    Activity,
    FleetView,
    MemberView,
    Reading,
    Role,
    State,
    Status,
    Telemetry,
    ViewState,
)
from tern.rounds.events import Link, Linked, Publish, Received, SetTimer, Timer
from tests.fleet_fixtures import FleetRig, build_fleet
from tests.helpers import wait_until
from tests.mqtt_fixtures import Inbox, MakeTransport
from tests.rights_helpers import WAIT, Serve, member, serving
from tests.rights_helpers import F as RIGHTS_FLEET

LAYOUT = {"gw-1": (COORDINATOR, ["dev-01", "dev-02"]), "gw-1a": ("gw-1", ["dev-03"])}
KIT = build_fleet(LAYOUT, "view-fleet")
F = KIT.fleet.fleet


def status(member: str, role: str = "device", **extra: object) -> bytes:
    return Status(member, role, State.ONLINE, "0.1.0", **extra).to_json()  # type: ignore[arg-type]


def down(kind: str, member: str, payload: bytes) -> Received:
    topic = {"status": topics.status, "telemetry": topics.telemetry, "view": topics.view}[kind]
    return Received(Link.DOWN, topic(F, member).path, payload)


def views(actions: list[object]) -> list[Publish]:
    return [a for a in actions if isinstance(a, Publish) and a.topic.kind is topics.TopicKind.VIEW]


# -- payloads -----------------------------------------------------------------------------


def test_a_status_without_the_new_keys_still_parses() -> None:
    old = b'{"id":"dev-01","role":"device","state":"online","version":"0.1.0","detail":""}'

    parsed = Status.from_json(old)

    assert (parsed.activity, parsed.last_round, parsed.last_error) == (None, None, None)
    assert set(json.loads(parsed.to_json())) == {"id", "role", "state", "version", "detail"}


def test_a_status_carries_activity_last_round_and_last_error() -> None:
    s = Status("dev-01", "device", State.ONLINE, "0.1.0", "", Activity.TRAINING, 7, "late: x")

    assert Status.from_json(s.to_json()) == s


@pytest.mark.parametrize(
    "extra",
    [
        {"activity": "sleeping"},
        {"last_round": -1},
        {"last_round": True},
        {"last_round": 2**60},
        {"last_error": "x" * 201},
        {"last_error": 5},
        {"mood": "fine"},
    ],
)
def test_a_status_with_a_bad_new_key_is_refused(extra: dict[str, object]) -> None:
    doc = {"id": "dev-01", "role": "device", "state": "online", "version": "0.1.0", **extra}

    with pytest.raises(MalformedMessage):
        Status.from_json(json.dumps(doc).encode())


def a_view(members: int = 3) -> FleetView:
    listed = {f"dev-{i:03d}": MemberView(Role.DEVICE, ViewState.ONLINE, Activity.IDLE, 4)
              for i in range(members)}  # fmt: skip
    listed["esp-1"] = MemberView(Role.BOARD, ViewState.ONLINE, telemetry=Reading(2, 0.5, 90, 4, 7))
    return FleetView("gw-1", COORDINATOR, 1_764_561_600.25, 4, listed)


def test_a_fleet_view_survives_its_json() -> None:
    view = a_view()

    assert FleetView.from_json(view.to_json()) == view


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(extra=1),
        lambda d: d.pop("round"),
        lambda d: d.update(gateway="no/slash"),
        lambda d: d.update(round=-3),
        lambda d: d.update(at="yesterday"),
        lambda d: d["members"].update({"x+": {"role": "device", "state": "online"}}),
        lambda d: d["members"].update({"d9": {"role": "robot", "state": "online"}}),
        lambda d: d["members"].update({"d9": {"role": "device", "state": "asleep"}}),
        lambda d: d["members"].update({"d9": {"role": "device", "state": "online", "x": 1}}),
        lambda d: d["members"]["esp-1"]["telemetry"].update(confidence=2),
        lambda d: d["members"].update(
            {f"m{i}": {"role": "board", "state": "unknown"} for i in range(MAX_VIEW_MEMBERS)}
        ),
    ],
)
def test_a_malformed_fleet_view_is_refused(change: object) -> None:
    doc = json.loads(a_view().to_json())
    change(doc)  # type: ignore[operator]

    with pytest.raises(TernError):
        FleetView.from_json(json.dumps(doc).encode())


def test_a_fleet_view_past_its_cap_is_refused_before_it_is_parsed() -> None:
    data = b'{"members":{},"pad":"' + b"x" * MAX_VIEW_BYTES + b'"}'

    with pytest.raises(PayloadTooLarge):
        FleetView.from_json(data)


def test_a_view_too_large_for_its_cap_leaves_out_errors_and_lists_at_most_the_cap() -> None:
    members = {f"device-{i:04d}-{'x' * 40}": MemberView(Role.DEVICE, ViewState.ONLINE,
                                                       last_error="e" * 200)
               for i in range(MAX_VIEW_MEMBERS + 10)}  # fmt: skip
    view = FleetView("gw-1", COORDINATOR, 1.0, None, members)

    data = view.to_json()
    back = FleetView.from_json(data)

    assert len(data) <= MAX_VIEW_BYTES
    assert len(back.members) == MAX_VIEW_MEMBERS and back.omitted == 10
    assert all(m.last_error is None for m in back.members.values())


# -- the view machine ---------------------------------------------------------------------


def test_a_gateway_views_its_own_devices_and_child_gateways_from_their_statuses() -> None:
    m = ViewMachine(KIT.fleet, "gw-1")
    m.handle(Linked(Link.UP), 0.0)

    m.handle(down("status", "dev-01", status("dev-01", activity=Activity.TRAINING)), 5.0)
    m.handle(down("status", "gw-1a", status("gw-1a", "gateway")), 5.1)
    failed = status("dev-02", activity=Activity.IDLE, last_round=3, last_error="kernel_fuel: x")
    m.handle(down("status", "dev-02", failed), 5.2)
    view = m.view(6.0)

    assert set(view.members) == {"dev-01", "dev-02", "gw-1a"}
    assert view.members["dev-01"].activity is Activity.TRAINING
    assert view.members["dev-02"] == MemberView(
        Role.DEVICE, ViewState.ONLINE, Activity.IDLE, 3, "kernel_fuel: x"
    )
    assert view.members["gw-1a"].state is ViewState.ONLINE
    assert m.rejected == {}


def test_an_offline_device_keeps_its_last_round_and_loses_its_activity() -> None:
    m = ViewMachine(KIT.fleet, "gw-1")
    m.handle(down("status", "dev-01", status("dev-01", activity=Activity.IDLE, last_round=9)), 0)

    offline = Status("dev-01", "device", State.OFFLINE, "0.1.0").to_json()
    m.handle(down("status", "dev-01", offline), 1.0)

    assert m.view(2.0).members["dev-01"] == MemberView(Role.DEVICE, ViewState.OFFLINE, None, 9)


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (down("status", "dev-03", status("dev-03")), "view_not_member"),  # gw-1a's device
        (down("status", "stranger", status("stranger")), "view_not_member"),
        (down("status", "dev-01", status("dev-02")), "view_wrong_id"),
        (down("status", "dev-01", status("dev-01", "gateway")), "view_wrong_role"),
        (down("status", "dev-01", b"{not json"), "view_malformed"),
        (down("status", "dev-01", b" " * 5000), "view_oversize"),
        (down("telemetry", "dev-01", Telemetry("dev-01", 1, 1, 1, 0.5, 9).to_json()),
         "view_wrong_role"),
        (down("view", "gw-2", b"{}"), "view_not_below"),
        (down("view", "gw-1a", FleetView("gw-1", COORDINATOR, 1.0, None).to_json()),
         "view_wrong_id"),
        (down("view", "gw-1a", FleetView("gw-1a", COORDINATOR, 1.0, None).to_json()),
         "view_wrong_id"),
        (down("view", "gw-1a", FleetView("gw-1a", "gw-1", 1.0, None, {
            "dev-01": MemberView(Role.DEVICE)}).to_json()), "view_wrong_member"),
        (down("view", "gw-1a", FleetView("gw-1a", "gw-1", 1.0, None, {
            "dev-03": MemberView(Role.BOARD)}).to_json()), "view_wrong_member"),
    ],
)  # fmt: skip
def test_a_hostile_status_telemetry_or_view_is_refused_counted_and_not_kept(
    event: Received, reason: str
) -> None:
    m = ViewMachine(KIT.fleet, "gw-1")
    before = m.view(0.0)

    actions = m.handle(event, 1.0)

    assert m.rejected == {reason: 1}
    assert views(actions) == []
    assert m.view(0.0) == before
    assert any(getattr(a, "level", 0) == logging.WARNING for a in actions)


def test_a_child_gateway_s_view_goes_up_unchanged_once_and_again_after_a_reconnect() -> None:
    m = ViewMachine(KIT.fleet, "gw-1")
    data = FleetView("gw-1a", "gw-1", 3.0, 2, {"dev-03": MemberView(Role.DEVICE)}).to_json()

    first = m.handle(down("view", "gw-1a", data), 1.0)
    again = m.handle(down("view", "gw-1a", data), 1.5)
    reconnect = m.handle(Linked(Link.UP, again=True), 2.0)

    assert [(p.topic, p.payload, p.retain, p.link) for p in views(first)] == [
        (topics.view(F, "gw-1a"), data, True, Link.UP)
    ]
    assert views(again) == []
    assert {p.topic.sender for p in views(reconnect)} == {"gw-1", "gw-1a"}


def test_a_board_its_child_gateway_relays_is_left_to_the_child_s_view() -> None:
    m = ViewMachine(KIT.fleet, "gw-1")
    child = FleetView("gw-1a", "gw-1", 1.0, None, {"esp-9": MemberView(Role.BOARD)})
    m.handle(down("view", "gw-1a", child.to_json()), 1.0)

    m.handle(down("status", "esp-9", status("esp-9", "board")), 1.1)
    m.handle(down("status", "esp-8", status("esp-8", "board")), 1.2)

    assert m.rejected == {"view_not_member": 1}
    assert "esp-9" not in m.view(2.0).members


def test_the_view_goes_up_at_most_once_a_second() -> None:
    m = ViewMachine(KIT.fleet, "gw-1", every=1.0)
    m.handle(Linked(Link.UP), 10.0)

    burst = [m.handle(down("status", d, status(d, activity=a)), t) for d, a, t in (
        ("dev-01", Activity.TRAINING, 10.2), ("dev-02", Activity.TRAINING, 10.4),
        ("dev-01", Activity.IDLE, 10.6))]  # fmt: skip
    due = m.handle(Timer(VIEW_TIMER), 11.0)

    assert [views(a) for a in burst] == [[], [], []]
    assert [a for a in burst[0] if isinstance(a, SetTimer)] == [SetTimer(VIEW_TIMER, 11.0)]
    (published,) = views(due)
    members = FleetView.from_json(published.payload).members
    assert (members["dev-01"].activity, members["dev-02"].activity) == (
        Activity.IDLE,
        Activity.TRAINING,
    )


def test_a_board_s_telemetry_is_in_the_view_and_a_reloaded_boards_file_drops_old_boards() -> None:
    m = ViewMachine(KIT.fleet, "gw-1", ["esp-1"])
    t = Telemetry("esp-1", 4, 12, 2, 0.75, 880)

    m.handle(down("telemetry", "esp-1", t.to_json()), 1.0)
    kept = m.view(1.0).members["esp-1"]
    m.handle(SetBoards(("esp-2",)), 2.0)

    assert kept.telemetry == Reading(2, 0.75, 880, 4, 12)
    assert set(m.view(3.0).members) == {"dev-01", "dev-02", "gw-1a", "esp-2"}


# -- on real brokers -----------------------------------------------------------------------


@pytest.fixture(params=["amqtt", "mosquitto"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Serve]:
    with serving(str(request.param), tmp_path) as start:
        yield start


def test_a_gateway_publishes_its_view_and_its_descendants_and_no_other_gateway_s(
    serve: Serve, make_transport: MakeTransport
) -> None:
    f = RIGHTS_FLEET  # gw-1 (gw-1a below it) and gw-2 under the coordinator
    top = serve(COORDINATOR)
    seen = Inbox()
    member(make_transport, top, "observer").subscribe(topics.view_all(f), seen)
    gateway = member(make_transport, top, "gw-1")

    gateway.publish(topics.view(f, "gw-2"), b"forged", retain=True, wait=True)
    gateway.publish(topics.view(f, "gw-1a"), b"relayed", retain=True, wait=True)
    gateway.publish(topics.view(f, "gw-1"), b"own", retain=True, wait=True)

    seen.wait_for(lambda m: m.payload == b"own", WAIT)
    assert [(m.topic, m.payload) for m in seen.messages] == [
        (topics.view(f, "gw-1a").path, b"relayed"),
        (topics.view(f, "gw-1").path, b"own"),
    ]


# -- end to end ---------------------------------------------------------------------------


def test_one_subscription_on_the_top_broker_sees_every_device_of_a_two_level_tree(
    stack: ExitStack, make_transport: MakeTransport, tmp_path: Path
) -> None:
    top = EmbeddedBroker(port=0, access=AccessControl(broker_policy(KIT.fleet, COORDINATOR)),
                         limits=fleet_limits(KIT.fleet, COORDINATOR)).start()  # fmt: skip
    stack.callback(top.stop)
    inbox = Inbox()
    observer = make_transport(top.url, "watcher", login=KIT.login("observer"))
    observer.subscribe(topics.view_all(F), inbox)
    rig = FleetRig(KIT, top.url, stack)
    rig.gateway("gw-1")
    rig.gateway("gw-1a")
    for dev in KIT.fleet.devices:
        rig.device(dev, trainer=NumpyTrainer())

    def coordinator(rounds: int) -> Coordinator:
        config = CoordinatorConfig(
            broker_url=top.url, state_dir=tmp_path / "coordinator", layers=(8, 4, 3),
            rounds=rounds, round_timeout=5.0, login=KIT.logins[COORDINATOR],
        )  # fmt: skip
        c = Coordinator(config, KIT.fleet, KIT.coordinator_key)
        stack.callback(c.stop)
        return c

    with coordinator(1) as c:
        assert c.wait_finished(30)
    # dev-02 goes away; a client with its login then says it is a gateway
    rig.devices["dev-02"].stop()
    fake = make_transport(rig.gateways["gw-1"].downstream_url, f"tern-{F}-dev-02",
                          login=KIT.login("dev-02"))  # fmt: skip
    fake.publish(topics.status(F, "dev-02"), status("dev-02", "gateway"), wait=True)
    fake.close()
    with coordinator(2) as c:
        assert c.wait_finished(30)

    def latest() -> dict[str, MemberView]:
        seen: dict[str, FleetView] = {}
        for message in list(inbox.messages):
            view = FleetView.from_json(message.payload)
            seen[view.gateway] = view
        return {m: v for view in seen.values() for m, v in view.members.items()}

    def settled() -> bool:
        members = latest()
        return all(members.get(d, MemberView(Role.DEVICE)).last_round == 2
                   for d in ("dev-01", "dev-03")) and "dev-02" in members  # fmt: skip

    wait_until(settled, 15)
    members = latest()
    assert {m for m in members if m.startswith("dev-")} == set(KIT.fleet.devices)
    assert members["dev-01"].state is ViewState.ONLINE
    assert members["dev-03"].activity is Activity.IDLE
    assert members["dev-02"] == MemberView(Role.DEVICE, ViewState.OFFLINE, None, 1)
    assert members["gw-1a"] == MemberView(Role.GATEWAY, ViewState.ONLINE)
    assert rig.gateways["gw-1"].metrics[2].rejected.get("view_wrong_role") == 1
    assert np.isfinite(rig.gateways["gw-1"].metrics[2].round_seconds)
