"""A fleet's broker rights (broker.fleet_access), row by row, as pure checks (no broker).

The same policies run on real brokers in tests/test_mosquitto_rights.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from broker.acl import AccessPolicy, Refusal, check_connect, check_publish, check_subscribe
from broker.errors import BrokerConfigError
from broker.fleet_access import MAX_MQTT_PACKET, broker_policy, max_packet_bytes
from broker.mosquitto_config import acl_file_text, password_file_text
from gateway.access import gateway_policy
from gateway.boards import BoardEntry, Boards, BoardsError
from tern import topics
from tern.caps import KERNEL_CAPS, largest_message, model_caps, schedule_caps
from tern.fleet import COORDINATOR, Fleet
from tern.logins import OBSERVER
from tests.fleet_fixtures import RIGHTS_LAYOUT, build_fleet

F = "plant-7"
KIT = build_fleet(RIGHTS_LAYOUT, fleet_id=F)
FLEET = KIT.fleet
BOARDS = Boards(F, "gw-1", {"esp-1": BoardEntry(bytes(32), "esp-1", "board-pw")})
POLICIES = {
    COORDINATOR: broker_policy(FLEET, COORDINATOR),
    "gw-1": broker_policy(FLEET, "gw-1", BOARDS),
}
HEX = "ab" * 32
TWIN = BoardEntry(bytes(32), "twin", "pw")

MODEL = topics.global_model(F).path
SCHEDULE = topics.round_schedule(F).path
KERNEL = topics.kernel(F, HEX).path
KERNELS = topics.kernels(F).path


def _connect(policy: AccessPolicy, client_id: str, user: str | None, **kw: object) -> object:
    password = "board-pw" if user == "esp-1" else KIT.logins[user].password if user else None
    return check_connect(policy, client_id, user, password, **kw)  # type: ignore[arg-type]


# (broker, user, topic, may publish, may retain)
PUBLISH_ROWS = [
    # the coordinator's broker
    (COORDINATOR, COORDINATOR, MODEL, True, True),
    (COORDINATOR, COORDINATOR, SCHEDULE, True, True),
    (COORDINATOR, COORDINATOR, KERNEL, True, True),
    (COORDINATOR, COORDINATOR, topics.metrics(F, COORDINATOR).path, True, True),
    (COORDINATOR, COORDINATOR, topics.status(F, COORDINATOR).path, True, True),
    (COORDINATOR, COORDINATOR, topics.partial(F, COORDINATOR, "gw-1").path, False, False),
    (COORDINATOR, COORDINATOR, topics.status(F, "gw-1").path, False, False),
    (COORDINATOR, "gw-1", topics.partial(F, COORDINATOR, "gw-1").path, True, False),
    (COORDINATOR, "gw-1", topics.metrics(F, "gw-1").path, True, True),
    (COORDINATOR, "gw-1", topics.status(F, "gw-1").path, True, True),
    (COORDINATOR, "gw-1", topics.status(F, "esp-1").path, True, True),  # a board it relays
    (COORDINATOR, "gw-1", topics.telemetry(F, "esp-1").path, True, False),
    (COORDINATOR, "gw-1", topics.partial(F, COORDINATOR, "gw-2").path, False, False),
    (COORDINATOR, "gw-1", topics.metrics(F, "gw-2").path, False, False),
    (COORDINATOR, "gw-1", topics.status(F, "gw-2").path, False, False),
    (COORDINATOR, "gw-1", topics.status(F, "dev-01").path, False, False),
    (COORDINATOR, "gw-1", topics.status(F, COORDINATOR).path, False, False),
    (COORDINATOR, "gw-1", topics.telemetry(F, "dev-01").path, False, False),
    (COORDINATOR, "gw-1", MODEL, False, False),
    (COORDINATOR, "gw-1", SCHEDULE, False, False),
    (COORDINATOR, "gw-1", KERNEL, False, False),
    (COORDINATOR, "gw-1", topics.update(F, "gw-1", "dev-01").path, False, False),
    (COORDINATOR, OBSERVER, topics.status(F, "gw-1").path, False, False),
    # fleet views: a gateway's own and its descendants', up on its parent's broker
    (COORDINATOR, "gw-1", topics.view(F, "gw-1").path, True, True),
    (COORDINATOR, "gw-1", topics.view(F, "gw-1a").path, True, True),
    (COORDINATOR, "gw-1", topics.view(F, "gw-2").path, False, False),
    (COORDINATOR, "gw-2", topics.view(F, "gw-1a").path, False, False),
    (COORDINATOR, OBSERVER, topics.view(F, "gw-1").path, False, False),
    ("gw-1", "gw-1a", topics.view(F, "gw-1a").path, True, True),
    ("gw-1", "gw-1a", topics.view(F, "gw-1").path, False, False),
    ("gw-1", "gw-1", topics.view(F, "gw-1").path, False, False),  # its own goes up
    ("gw-1", "dev-01", topics.view(F, "gw-1a").path, False, False),
    ("gw-1", "esp-1", topics.view(F, "gw-1a").path, False, False),
    (COORDINATOR, OBSERVER, MODEL, False, False),
    # gateway gw-1's own broker
    ("gw-1", "gw-1", MODEL, True, True),
    ("gw-1", "gw-1", SCHEDULE, True, True),
    ("gw-1", "gw-1", KERNEL, True, True),
    ("gw-1", "gw-1", topics.mcu_model(F, "esp-1").path, True, True),
    ("gw-1", "gw-1", topics.update(F, "gw-1", "dev-01").path, False, False),
    ("gw-1", "gw-1", topics.status(F, "dev-01").path, False, False),
    ("gw-1", "gw-1", topics.telemetry(F, "esp-1").path, False, False),
    ("gw-1", "dev-01", topics.update(F, "gw-1", "dev-01").path, True, False),
    ("gw-1", "dev-01", topics.status(F, "dev-01").path, True, True),
    ("gw-1", "dev-01", topics.update(F, "gw-1", "dev-02").path, False, False),
    ("gw-1", "dev-01", topics.update(F, "gw-2", "dev-01").path, False, False),
    ("gw-1", "dev-01", topics.partial(F, "gw-1", "dev-01").path, False, False),
    ("gw-1", "dev-01", topics.status(F, "dev-02").path, False, False),
    ("gw-1", "dev-01", topics.telemetry(F, "dev-01").path, False, False),
    ("gw-1", "dev-01", MODEL, False, False),
    ("gw-1", "dev-01", SCHEDULE, False, False),
    ("gw-1", "dev-01", KERNEL, False, False),
    ("gw-1", "dev-01", topics.mcu_model(F, "esp-1").path, False, False),
    ("gw-1", "gw-1a", topics.partial(F, "gw-1", "gw-1a").path, True, False),
    ("gw-1", "gw-1a", topics.metrics(F, "gw-1a").path, True, True),
    ("gw-1", "gw-1a", topics.status(F, "gw-1a").path, True, True),
    ("gw-1", "gw-1a", topics.status(F, "esp-9").path, True, True),  # its own board's
    ("gw-1", "gw-1a", topics.telemetry(F, "esp-9").path, True, False),
    ("gw-1", "gw-1a", topics.partial(F, "gw-1", "gw-2").path, False, False),
    ("gw-1", "gw-1a", topics.update(F, "gw-1", "dev-03").path, False, False),
    ("gw-1", "gw-1a", topics.status(F, "dev-03").path, False, False),
    ("gw-1", "gw-1a", topics.telemetry(F, "dev-01").path, False, False),
    ("gw-1", "gw-1a", topics.status(F, "gw-1").path, False, False),
    ("gw-1", "gw-1a", MODEL, False, False),
    ("gw-1", "esp-1", topics.telemetry(F, "esp-1").path, True, False),
    ("gw-1", "esp-1", topics.status(F, "esp-1").path, True, True),
    ("gw-1", "esp-1", topics.telemetry(F, "esp-2").path, False, False),
    ("gw-1", "esp-1", topics.status(F, "dev-01").path, False, False),
    ("gw-1", "esp-1", topics.mcu_model(F, "esp-1").path, False, False),
    ("gw-1", OBSERVER, topics.telemetry(F, "esp-1").path, False, False),
    ("gw-1", OBSERVER, "elsewhere/topic", False, False),
    # secure aggregation: a gateway writes to each member of its cohort's inbox
    ("gw-1", "gw-1", topics.inbox(F, "dev-01", "gw-1").path, True, False),
    ("gw-1", "gw-1", topics.inbox(F, "gw-1a", "gw-1").path, True, False),
    ("gw-1", "gw-1", topics.inbox(F, "dev-01", "gw-2").path, False, False),
    ("gw-1", "dev-01", topics.inbox(F, "dev-02", "gw-1").path, False, False),
    ("gw-1", "dev-01", topics.inbox(F, "dev-01", "gw-1").path, False, False),
    ("gw-1", "gw-1a", topics.inbox(F, "dev-03", "gw-1a").path, False, False),
]


@pytest.mark.parametrize(("broker", "user", "topic", "publish", "retain"), PUBLISH_ROWS)
def test_who_may_publish_and_retain_where(
    broker: str, user: str, topic: str, publish: bool, retain: bool
) -> None:
    policy = POLICIES[broker]

    published = check_publish(policy, user, topic)
    retained = check_publish(policy, user, topic, retain=True)

    assert published is (None if publish else Refusal.PUBLISH)
    expected = None if retain else Refusal.RETAIN if publish else Refusal.PUBLISH
    assert retained is expected


# (broker, user, filter, may subscribe)
SUBSCRIBE_ROWS = [
    (COORDINATOR, COORDINATOR, topics.partials_to(F, COORDINATOR).path, True),
    (COORDINATOR, COORDINATOR, topics.partial(F, COORDINATOR, "gw-1").path, True),
    (COORDINATOR, COORDINATOR, topics.status_all(F).path, False),
    (COORDINATOR, COORDINATOR, "#", False),
    (COORDINATOR, "gw-1", MODEL, True),
    (COORDINATOR, "gw-1", SCHEDULE, True),
    (COORDINATOR, "gw-1", KERNELS, True),
    (COORDINATOR, "gw-1", KERNEL, True),
    (COORDINATOR, "gw-1", topics.partials_to(F, COORDINATOR).path, False),
    (COORDINATOR, "gw-1", topics.status_all(F).path, False),
    (COORDINATOR, "gw-1", f"{topics.ROOT}/{F}/#", False),
    (COORDINATOR, OBSERVER, f"{topics.ROOT}/{F}/#", True),
    (COORDINATOR, OBSERVER, topics.partials_to(F, COORDINATOR).path, True),
    (COORDINATOR, OBSERVER, topics.metrics(F, "gw-1").path, True),
    (COORDINATOR, OBSERVER, "#", False),
    (COORDINATOR, OBSERVER, f"{topics.ROOT}/other-fleet/#", False),
    ("gw-1", "gw-1", topics.updates_to(F, "gw-1").path, True),
    ("gw-1", "gw-1", topics.partials_to(F, "gw-1").path, True),
    ("gw-1", "gw-1", topics.telemetry_all(F).path, True),
    ("gw-1", "gw-1", topics.status_all(F).path, True),
    ("gw-1", "gw-1", topics.view_all(F).path, True),
    ("gw-1", "dev-01", topics.view_all(F).path, False),
    (COORDINATOR, "gw-1", topics.view_all(F).path, False),
    (COORDINATOR, OBSERVER, topics.view_all(F).path, True),
    ("gw-1", "gw-1", topics.updates_to(F, "gw-2").path, False),
    ("gw-1", "gw-1", "#", False),
    ("gw-1", "dev-01", MODEL, True),
    ("gw-1", "dev-01", SCHEDULE, True),
    ("gw-1", "dev-01", KERNEL, True),
    ("gw-1", "dev-01", KERNELS, True),
    ("gw-1", "dev-01", "#", False),
    ("gw-1", "dev-01", f"{topics.ROOT}/{F}/#", False),
    ("gw-1", "dev-01", topics.updates_to(F, "gw-1").path, False),
    ("gw-1", "dev-01", topics.update(F, "gw-1", "dev-02").path, False),
    ("gw-1", "dev-01", topics.mcu_model(F, "esp-1").path, False),
    ("gw-1", "gw-1a", MODEL, True),
    ("gw-1", "gw-1a", KERNELS, True),
    ("gw-1", "gw-1a", topics.updates_to(F, "gw-1").path, False),
    ("gw-1", "esp-1", topics.mcu_model(F, "esp-1").path, True),
    ("gw-1", "esp-1", topics.mcu_model(F, "esp-2").path, False),
    ("gw-1", "esp-1", MODEL, False),
    ("gw-1", OBSERVER, f"{topics.ROOT}/{F}/#", True),
    ("gw-1", OBSERVER, topics.updates_to(F, "gw-1").path, True),
    ("gw-1", "dev-01", topics.inbox(F, "dev-01", "gw-1").path, True),
    ("gw-1", "dev-01", topics.inbox(F, "dev-02", "gw-1").path, False),
    ("gw-1", "dev-01", topics.inbox(F, None, "gw-1").path, False),
    ("gw-1", "gw-1a", topics.inbox(F, "gw-1a", "gw-1").path, True),
    ("gw-1", "gw-1a", topics.inbox(F, "dev-01", "gw-1").path, False),
    (COORDINATOR, "gw-1", topics.inbox(F, "gw-1", COORDINATOR).path, False),
]


@pytest.mark.parametrize(("broker", "user", "topic_filter", "allowed"), SUBSCRIBE_ROWS)
def test_who_may_subscribe_to_what(
    broker: str, user: str, topic_filter: str, allowed: bool
) -> None:
    assert check_subscribe(POLICIES[broker], user, topic_filter) is (
        None if allowed else Refusal.SUBSCRIBE
    )


# (broker, client id, user, expected)
CONNECT_ROWS = [
    (COORDINATOR, "coordinator", COORDINATOR, None),
    (COORDINATOR, "tern-plant-7-gw-1-up", "gw-1", None),
    (COORDINATOR, "tern-plant-7-gw-2-up", "gw-2", None),
    (COORDINATOR, "dashboard-1", OBSERVER, None),
    (COORDINATOR, "tern-plant-7-gw-1a-up", "gw-1a", Refusal.UNKNOWN_USER),  # not its parent
    (COORDINATOR, "tern-plant-7-dev-01", "dev-01", Refusal.UNKNOWN_USER),
    (COORDINATOR, "whoever", None, Refusal.ANONYMOUS),
    (COORDINATOR, "coordinator", None, Refusal.ANONYMOUS),
    (COORDINATOR, "coordinator", "gw-1", Refusal.CLIENT_ID),
    (COORDINATOR, "coordinator", OBSERVER, Refusal.CLIENT_ID),
    (COORDINATOR, "tern-plant-7-gw-2-up", "gw-1", Refusal.CLIENT_ID),
    (COORDINATOR, "tern-plant-7-dev-01", OBSERVER, Refusal.CLIENT_ID),
    (COORDINATOR, "gw-1-own-choice", "gw-1", Refusal.CLIENT_ID),  # members use their own
    ("gw-1", "tern-plant-7-gw-1-down", "gw-1", None),
    ("gw-1", "tern-plant-7-dev-01", "dev-01", None),
    ("gw-1", "tern-plant-7-gw-1a-up", "gw-1a", None),
    ("gw-1", "esp-1", "esp-1", None),
    ("gw-1", "dashboard-1", OBSERVER, None),
    ("gw-1", "coordinator", COORDINATOR, Refusal.UNKNOWN_USER),
    ("gw-1", "tern-plant-7-dev-04", "dev-04", Refusal.UNKNOWN_USER),  # gw-2's device
    ("gw-1", "tern-plant-7-dev-02", "dev-01", Refusal.CLIENT_ID),
    ("gw-1", "esp-1", "dev-01", Refusal.CLIENT_ID),
    ("gw-1", "esp-1", OBSERVER, Refusal.CLIENT_ID),
    ("gw-1", "esp-2", "esp-1", Refusal.CLIENT_ID),
    ("gw-1", "tern-plant-7-gw-1-down", OBSERVER, Refusal.CLIENT_ID),
    ("gw-1", "tern-plant-7-dev-01", None, Refusal.ANONYMOUS),
]


@pytest.mark.parametrize(("broker", "client_id", "user", "expected"), CONNECT_ROWS)
def test_who_may_connect_with_which_client_id(
    broker: str, client_id: str, user: str | None, expected: Refusal | None
) -> None:
    assert _connect(POLICIES[broker], client_id, user) is expected


def test_a_member_s_password_works_only_for_that_member() -> None:
    policy = POLICIES["gw-1"]
    wrong = KIT.logins["dev-02"].password

    assert check_connect(policy, "tern-plant-7-dev-01", "dev-01", wrong) is Refusal.BAD_PASSWORD
    assert check_connect(policy, "esp-1", "esp-1", "guess") is Refusal.BAD_PASSWORD
    assert check_connect(policy, "x", "stranger", "pw") is Refusal.UNKNOWN_USER


def test_last_wills_go_only_where_the_client_may_retain() -> None:
    coordinator, gateway = POLICIES[COORDINATOR], POLICIES["gw-1"]
    up, dev = "tern-plant-7-gw-1-up", "tern-plant-7-dev-01"
    own_status = topics.status(F, "gw-1").path

    assert _connect(coordinator, up, "gw-1", will_topic=own_status, will_retain=True) is None
    assert _connect(gateway, dev, "dev-01", will_topic=topics.status(F, "dev-01").path) is None
    refused = [
        _connect(gateway, dev, "dev-01", will_topic=topics.status(F, "dev-02").path),
        _connect(gateway, dev, "dev-01", will_topic=MODEL, will_retain=True),
        _connect(gateway, dev, "dev-01", will_topic=topics.update(F, "gw-1", "dev-01").path,
                 will_retain=True),
        _connect(gateway, "dash", OBSERVER, will_topic=topics.status(F, "gw-1").path),
    ]  # fmt: skip
    assert refused == [Refusal.WILL] * 4


def test_every_member_client_id_and_board_id_is_reserved_on_every_broker() -> None:
    for policy in POLICIES.values():
        for member in FLEET.members:
            for client_id in FLEET.client_ids(member):
                assert policy.reserved_client_ids[client_id] == member
    assert POLICIES["gw-1"].reserved_client_ids["esp-1"] == "esp-1"


def test_a_missing_login_is_a_config_error_that_names_the_member() -> None:
    logins = {u: h for u, h in FLEET.logins.items() if u != "dev-02"}
    fleet = replace(FLEET, logins=logins)

    broker_policy(fleet, COORDINATOR)  # dev-02 does not connect there
    with pytest.raises(BrokerConfigError, match="dev-02"):
        broker_policy(fleet, "gw-1")
    with pytest.raises(BrokerConfigError, match="not the coordinator or a gateway"):
        broker_policy(FLEET, "gw-9")


def test_without_an_observer_login_nobody_reads_everything() -> None:
    fleet = replace(FLEET, logins={u: h for u, h in FLEET.logins.items() if u != OBSERVER})

    policy = broker_policy(fleet, COORDINATOR)

    assert OBSERVER not in policy.accounts
    assert _connect(policy, "dash", OBSERVER) is Refusal.UNKNOWN_USER


@pytest.mark.parametrize(
    ("boards", "message"),
    [
        (Boards(F, "gw-2", {}), "gw-2"),
        (Boards("other", "gw-1", {}), "other"),
        (Boards(F, "gw-1", {"dev-02": BoardEntry(bytes(32), "b", "pw")}), "member"),
        (Boards(F, "gw-1", {"observer": BoardEntry(bytes(32), "b", "pw")}), "member"),
        (Boards(F, "gw-1", {"tern-plant-7-dev-01": BoardEntry(bytes(32), "b", "pw")}), "client"),
        (Boards(F, "gw-1", {"esp-1": BoardEntry(bytes(32), "gw-1", "pw")}), "taken"),
        (Boards(F, "gw-1", {"esp-1": BoardEntry(bytes(32), OBSERVER, "pw")}), "taken"),
        (
            Boards(
                F,
                "gw-1",
                {
                    "esp-1": BoardEntry(bytes(32), "u", "a"),
                    "esp-2": BoardEntry(bytes(32), "u", "b"),
                },
            ),
            "taken",
        ),
        (Boards(F, "gw-1", {"esp-1": BoardEntry(bytes(32), "bad user", "pw")}), "MQTT user"),
    ],
)
def test_boards_that_collide_are_refused(boards: Boards, message: str) -> None:
    with pytest.raises(BoardsError, match=message):
        broker_policy(FLEET, "gw-1", boards)


def test_boards_belong_on_a_gateway_s_broker_only() -> None:
    with pytest.raises(BoardsError):
        broker_policy(FLEET, COORDINATOR, Boards(F, COORDINATOR, {}))


def test_the_gateway_s_policy_is_the_fleet_s_policy_for_its_broker() -> None:
    mine = gateway_policy(FLEET, "gw-1", BOARDS)

    assert {u: a.rights for u, a in mine.accounts.items()} == {
        u: a.rights for u, a in POLICIES["gw-1"].accounts.items()
    }
    assert mine.reserved_client_ids == POLICIES["gw-1"].reserved_client_ids


def _with_devices(devices: int) -> Fleet:
    """FLEET with `devices` more devices on gw-1 (sharing one key: only the count matters)."""
    entry = FLEET.gateways["gw-1"]
    key = next(iter(entry.devices.values()))
    more = {f"extra-{i}": key for i in range(devices)}
    grown = replace(entry, devices={**entry.devices, **more})
    return replace(FLEET, gateways={**FLEET.gateways, "gw-1": grown})


def _publish_bytes(message: int) -> int:
    """An MQTT PUBLISH (QoS 1) of a `message`-byte payload on the longest topic a large
    message of a fleet with 64-character ids travels on."""
    f, a, b = "f" * 64, "a" * 64, "b" * 64
    carriers = [
        topics.global_model(f),
        topics.round_schedule(f),
        topics.kernel(f, HEX),
        topics.update(f, a, b),
        topics.partial(f, a, b),
    ]
    topic = max(len(t.path.encode()) for t in carriers)
    remaining = 2 + topic + 2 + message
    return 1 + len(remaining.to_bytes(4, "big").lstrip(b"\0")) + remaining  # at most 4


LARGE = _with_devices(30_000)  # a schedule listing them all is over 1.5 MiB


@pytest.mark.parametrize(
    ("fleet", "largest"),
    [
        (FLEET, model_caps(FLEET.max_params).max_bytes),
        (replace(FLEET, max_params=10), KERNEL_CAPS.max_bytes),
        (LARGE, model_caps(FLEET.max_params).max_bytes),
        (replace(LARGE, max_params=10), schedule_caps(len(LARGE.devices)).max_bytes),
    ],
    ids=["a-model", "a-kernel", "a-model-of-a-large-fleet", "a-schedule-of-a-large-fleet"],
)
def test_the_broker_carries_the_largest_message_a_receiver_accepts(
    fleet: Fleet, largest: int
) -> None:
    assert largest == largest_message(fleet.max_params, len(fleet.devices))
    assert _publish_bytes(largest) <= max_packet_bytes(fleet)
    assert max_packet_bytes(fleet) <= largest + 1024


def test_the_packet_size_never_exceeds_what_mqtt_can_carry() -> None:
    assert max_packet_bytes(replace(FLEET, max_params=1 << 28)) == MAX_MQTT_PACKET


def test_mosquitto_files_say_the_same_rights() -> None:
    policy = POLICIES["gw-1"]

    acl = acl_file_text(policy)
    passwords = password_file_text(policy)

    block = acl.split("user dev-01\n")[1].split("\n\n")[0].splitlines()
    assert block == [
        f"topic write {topics.update(F, 'gw-1', 'dev-01').path}",
        f"topic write {topics.status(F, 'dev-01').path}",
        f"topic write {topics.chunks_of(F, 'dev-01').path}",
        f"topic read {MODEL}",
        f"topic read {topics.model_delta(F).path}",
        f"topic read {SCHEDULE}",
        f"topic read {KERNELS}",
        f"topic read {topics.inbox(F, 'dev-01', 'gw-1').path}",
        f"topic read {topics.chunks_of(F, 'gw-1').path}",
    ]
    assert f"topic deny {topics.status(F, 'dev-01').path}" in acl.split("user gw-1a\n")[1]
    assert f"topic write {topics.view(F, 'gw-1a').path}\n" in acl.split("user gw-1a\n")[1]
    assert f"topic read {topics.view_all(F).path}\n" in acl.split("user gw-1\n")[1]
    assert f"user {OBSERVER}\ntopic read {topics.ROOT}/{F}/#\n" in acl
    assert acl.split("user ")[0].count("topic") == 0  # nothing for anonymous clients
    users = [line.split(":", 1)[0] for line in passwords.splitlines()]
    assert users == sorted(["gw-1", "dev-01", "dev-02", "gw-1a", "esp-1", OBSERVER])
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in passwords.splitlines())
