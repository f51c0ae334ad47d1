"""The access policy as pure functions (no broker), and the gateway's policy built from it."""

from __future__ import annotations

import pytest

from broker.acl import AccessPolicy, Account, Refusal, check_connect, check_publish, check_subscribe
from gateway.access import gateway_policy, gateway_user
from gateway.boards import BoardEntry, Boards, BoardsError
from tern import topics

FLEET = "plant-7"
GW = "gw-1"
DOWN_ID = "tern-plant-7-gw-1-down"
BOARD = BoardEntry(bytes(32), "esp-1", "board-secret")
POLICY = gateway_policy(FLEET, GW, DOWN_ID, "gw-secret", Boards(FLEET, GW, {"esp-1": BOARD}))
ME = gateway_user(GW)


def test_anonymous_clients_connect_unless_they_take_a_reserved_client_id() -> None:
    assert check_connect(POLICY, "tern-plant-7-dev-01", None, None) is None
    assert check_connect(POLICY, "esp-1", None, None) is Refusal.CLIENT_ID
    assert check_connect(POLICY, DOWN_ID, None, None) is Refusal.CLIENT_ID


def test_a_board_connects_with_its_password_and_only_with_it() -> None:
    assert check_connect(POLICY, "esp-1", "esp-1", "board-secret") is None
    assert check_connect(POLICY, "esp-1", "esp-1", "board-secreT") is Refusal.BAD_PASSWORD
    assert check_connect(POLICY, "esp-1", "esp-1", None) is Refusal.BAD_PASSWORD
    assert check_connect(POLICY, "esp-1", "nobody", "board-secret") is Refusal.UNKNOWN_USER


def test_a_user_cannot_take_another_user_s_client_id() -> None:
    assert check_connect(POLICY, DOWN_ID, "esp-1", "board-secret") is Refusal.CLIENT_ID
    assert check_connect(POLICY, DOWN_ID, ME, "gw-secret") is None
    assert check_connect(POLICY, "esp-1", ME, "gw-secret") is Refusal.CLIENT_ID


def test_only_the_gateway_publishes_what_it_relays_and_the_board_models() -> None:
    relayed = [
        topics.global_model(FLEET).path,
        topics.round_schedule(FLEET).path,
        topics.kernel(FLEET, "ab" * 32).path,
        topics.mcu_model(FLEET, "esp-1").path,
    ]
    for topic in relayed:
        assert check_publish(POLICY, ME, topic) is None, topic
        assert check_publish(POLICY, None, topic) is Refusal.PUBLISH, topic
        assert check_publish(POLICY, "esp-1", topic) is Refusal.PUBLISH, topic


def test_a_board_publishes_its_own_telemetry_and_status_only() -> None:
    own = [topics.telemetry(FLEET, "esp-1").path, topics.status(FLEET, "esp-1").path]
    for topic in own:
        assert check_publish(POLICY, "esp-1", topic) is None
        assert check_publish(POLICY, None, topic) is Refusal.PUBLISH
        assert check_publish(POLICY, ME, topic) is Refusal.PUBLISH
    others = [topics.telemetry(FLEET, "esp-2").path, topics.update(FLEET, GW, "dev-01").path]
    for topic in others:
        assert check_publish(POLICY, "esp-1", topic) is Refusal.PUBLISH


def test_anonymous_clients_publish_what_the_policy_does_not_reserve() -> None:
    for topic in [
        topics.update(FLEET, GW, "dev-01").path,
        topics.partial(FLEET, GW, "gw-2").path,
        topics.status(FLEET, "dev-01").path,
        topics.telemetry(FLEET, "esp-9").path,  # not a registered board
        "dashboards/anything",
    ]:
        assert check_publish(POLICY, None, topic) is None, topic


def test_a_board_subscribes_to_its_own_model_only() -> None:
    assert check_subscribe(POLICY, "esp-1", topics.mcu_model(FLEET, "esp-1").path) is None
    for other in [topics.mcu_model(FLEET, "esp-2").path, "tern/plant-7/mcu/+", "#"]:
        assert check_subscribe(POLICY, "esp-1", other) is Refusal.SUBSCRIBE
    assert check_subscribe(POLICY, None, "#") is None
    assert check_subscribe(POLICY, ME, "tern/plant-7/update/gw-1/+") is None


def test_a_last_will_goes_only_where_its_client_may_publish() -> None:
    status = topics.status(FLEET, "esp-1").path
    assert check_connect(POLICY, "esp-1", "esp-1", "board-secret", status) is None
    assert check_connect(POLICY, "intruder", None, None, status) is Refusal.WILL
    mcu = topics.mcu_model(FLEET, "esp-1").path
    assert check_connect(POLICY, "intruder", None, None, mcu) is Refusal.WILL
    device_status = topics.status(FLEET, "dev-01").path
    assert check_connect(POLICY, "tern-plant-7-dev-01", None, None, device_status) is None


def test_a_policy_without_anonymous_wants_a_user() -> None:
    closed = AccessPolicy({"u": Account("p")}, allow_anonymous=False)
    assert check_connect(closed, "c", None, None) is Refusal.ANONYMOUS
    assert check_connect(closed, "c", "u", "p") is None


def test_a_reserved_prefix_ends_with_a_slash() -> None:
    with pytest.raises(ValueError, match="ends with '/'"):
        AccessPolicy(reserved_prefixes={"tern/x/kernel": frozenset({"u"})})


def test_board_users_must_be_distinct_from_each_other_and_the_gateway() -> None:
    twin = BoardEntry(bytes([1]) * 32, "esp-1", "other")
    with pytest.raises(BoardsError, match="taken"):
        gateway_policy(FLEET, GW, DOWN_ID, "s", Boards(FLEET, GW, {"esp-1": BOARD, "esp-2": twin}))
    impostor = BoardEntry(bytes(32), ME, "x")
    with pytest.raises(BoardsError, match="taken"):
        gateway_policy(FLEET, GW, DOWN_ID, "s", Boards(FLEET, GW, {"esp-3": impostor}))


def test_passwords_stay_out_of_reprs() -> None:
    assert "gw-secret" not in repr(POLICY) and "board-secret" not in repr(POLICY)
