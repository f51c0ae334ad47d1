"""The fleet file (tern.fleet) and the login files next to the keys (tern.logins)."""

from __future__ import annotations

import base64
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from broker.lifecycle import load_login, login_path
from tern.errors import MalformedMessage, TernError
from tern.fleet import COORDINATOR, DEFAULT_MAX_PARAMS, MAX_FLEET_BYTES, Fleet, GatewayEntry
from tern.logins import OBSERVER, Login, check_password, hash_password, new_login
from tern.spec import MAX_PARAMS


def _key(i: int) -> SigningKey:
    return SigningKey(bytes([i]) * 32)


def _fleet() -> Fleet:
    return Fleet(
        "demo",
        _key(1).verify_key,
        {
            "gw-1": GatewayEntry(_key(2).verify_key, COORDINATOR, {"dev-1": _key(3).verify_key}),
            "gw-1a": GatewayEntry(_key(4).verify_key, "gw-1", {"dev-2": _key(5).verify_key}),
            "gw-2": GatewayEntry(_key(6).verify_key, COORDINATOR, {"dev-3": _key(7).verify_key}),
        },
    )


def test_fleet_round_trips_through_json() -> None:
    fleet = _fleet()

    again = Fleet.from_json(fleet.to_json())

    assert again.to_json() == fleet.to_json()


def test_fleet_answers_topology_questions() -> None:
    fleet = _fleet()

    assert fleet.children(COORDINATOR) == ["gw-1", "gw-2"]
    assert fleet.devices_below("gw-1") == ["dev-1", "dev-2"]
    assert fleet.devices == ["dev-1", "dev-2", "dev-3"]
    assert fleet.gateway_of("dev-2") == "gw-1a"
    assert (fleet.height("gw-1"), fleet.height("gw-1a")) == (2, 1)


def test_fleet_rejects_unknown_parents_cycles_and_repeated_ids() -> None:
    k = _key(1).verify_key
    with pytest.raises(MalformedMessage, match="unknown parent"):
        Fleet("f", k, {"g": GatewayEntry(k, "nowhere", {})})
    with pytest.raises(MalformedMessage, match="cycle"):
        Fleet("f", k, {"a": GatewayEntry(k, "b", {}), "b": GatewayEntry(k, "a", {})})
    with pytest.raises(MalformedMessage, match="repeat"):
        Fleet(
            "f",
            k,
            {
                "a": GatewayEntry(k, COORDINATOR, {"d": k}),
                "b": GatewayEntry(k, COORDINATOR, {"d": k}),
            },
        )


@pytest.mark.parametrize(
    "text",
    ["", "[]", '{"fleet": "f"}', json.dumps({"fleet": "f", "coordinator": "zz", "gateways": {}})],
)
def test_fleet_file_errors_are_tern_errors(text: str) -> None:
    with pytest.raises(TernError):
        Fleet.from_json(text)


# -- logins, model size and weight bounds ----------------------------------------------


def _with_limits() -> Fleet:
    return replace(
        _fleet(),
        logins={"gw-1": hash_password("pw"), OBSERVER: hash_password("look")},
        max_params=4096,
        max_weight={"dev-1": 500.0, "dev-3": 2},
    )


def test_logins_and_limits_round_trip_through_json() -> None:
    fleet = _with_limits()

    again = Fleet.from_json(fleet.to_json())

    assert again == fleet
    assert check_password(again.logins["gw-1"], "pw")
    assert (again.max_params, dict(again.max_weight)) == (4096, {"dev-1": 500.0, "dev-3": 2.0})


def test_an_old_style_fleet_file_parses_and_prints_the_same() -> None:
    old = json.loads(_fleet().to_json())

    fleet = Fleet.from_json(json.dumps(old))

    assert set(json.loads(fleet.to_json())) == {"fleet", "coordinator", "gateways"}
    assert (dict(fleet.logins), fleet.max_params, dict(fleet.max_weight)) == (
        {},
        DEFAULT_MAX_PARAMS,
        {},
    )


def test_members_and_their_client_ids() -> None:
    fleet = _fleet()

    assert fleet.members == ["coordinator", "dev-1", "dev-2", "dev-3", "gw-1", "gw-1a", "gw-2"]
    assert fleet.client_ids(COORDINATOR) == {"coordinator"}
    assert fleet.client_ids("gw-1a") == {"tern-demo-gw-1a-up", "tern-demo-gw-1a-down"}
    assert fleet.client_ids("dev-2") == {"tern-demo-dev-2"}
    with pytest.raises(TernError, match="not a member"):
        fleet.client_ids("stranger")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"logins": {"stranger": hash_password("x")}}, "not in the fleet"),
        ({"logins": {"gw-1": "plain text"}}, "hash"),
        ({"max_params": 0}, "max_params"),
        ({"max_params": MAX_PARAMS + 1}, "max_params"),
        ({"max_params": True}, "max_params"),
        ({"max_params": 1.5}, "max_params"),
        ({"max_weight": {"gw-1": 2.0}}, "not a device"),
        ({"max_weight": {"dev-1": 0.5}}, "finite number >= 1"),
        ({"max_weight": {"dev-1": math.inf}}, "finite"),
        ({"max_weight": {"dev-1": math.nan}}, "finite"),
        ({"max_weight": {"dev-1": 10**400}}, "finite"),
        ({"max_weight": {"dev-1": "5"}}, "finite"),
    ],
)
def test_fleet_rejects_bad_logins_and_limits(change: dict[str, object], message: str) -> None:
    with pytest.raises(MalformedMessage, match=message):
        replace(_fleet(), **change)  # type: ignore[arg-type]


def test_no_member_may_be_called_observer() -> None:
    k = _key(1).verify_key
    with pytest.raises(MalformedMessage, match="observer"):
        Fleet("f", k, {"g": GatewayEntry(k, COORDINATOR, {OBSERVER: k})})


def _doc(**change: object) -> str:
    doc = json.loads(_with_limits().to_json())
    doc.update(change)
    return json.dumps(doc)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # RecursionError inside json
        '{"fleet": ' + "9" * 5000 + "}",  # int beyond Python's int-to-str limit: ValueError
        "\ud800",
        _doc(fleet=7),
        _doc(fleet="x" * 10_000),
        _doc(coordinator=["not", "a", "key"]),
        _doc(coordinator="zz"),
        _doc(gateways=[]),
        _doc(gateways={"gw-1": "key"}),
        _doc(gateways={"gw-1": {"key": "00" * 32, "parent": 5, "devices": {}}}),
        _doc(gateways={"gw-1": {"key": "00" * 32, "parent": "coordinator", "devices": []}}),
        _doc(gateways={"gw-1": {"key": "00" * 32, "parent": "coordinator", "devices": {}, "x": 1}}),
        _doc(gateways={"gw-1": {"key": "00" * 32, "parent": "p" * 5000, "devices": {}}}),
        _doc(logins={"gw-1": 7}),
        _doc(logins=["gw-1"]),
        _doc(max_params="big"),
        _doc(max_params=10**300),
        _doc(max_weight={"dev-1": None}),
        _doc(unknown_key=1),
        json.dumps({"fleet": "f"}),
    ],
)
def test_every_malformed_fleet_file_is_a_malformed_message(text: str) -> None:
    with pytest.raises(MalformedMessage) as caught:
        Fleet.from_json(text)

    assert len(str(caught.value)) < 400  # never the unbounded input itself


def test_an_oversized_fleet_file_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedMessage, match="at most"):
        Fleet.from_json(" " * (MAX_FLEET_BYTES + 1))


# -- login files -----------------------------------------------------------------------


def test_a_login_round_trips_and_keeps_its_password_out_of_repr() -> None:
    login = new_login("gw-1")

    assert Login.from_json(login.to_json()) == login
    assert json.loads(login.to_json()) == {"username": "gw-1", "password": login.password}
    assert login.password not in repr(login)


def test_new_logins_carry_256_random_bits_as_url_safe_text() -> None:
    passwords = {new_login("dev-1").password for _ in range(50)}

    assert len(passwords) == 50
    for password in passwords:
        assert len(base64.urlsafe_b64decode(password + "=")) == 32


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[" * 100_000,
        '{"username": "a", "password": ' + "1" * 5000 + "}",
        '{"username": "a"}',
        '{"username": "a", "password": "p", "extra": 1}',
        '{"username": 1, "password": "p"}',
        '{"username": "a", "password": ["p"]}',
        '{"username": "a/b", "password": "p"}',
        '{"username": "a", "password": ""}',
        '{"username": "a", "password": "with space"}',
        '{"username": "' + "u" * 3000 + '", "password": "p"}',
        " " * 5000,
    ],
)
def test_every_malformed_login_is_a_malformed_message(text: str) -> None:
    with pytest.raises(MalformedMessage) as caught:
        Login.from_json(text)

    assert len(str(caught.value)) < 300


def test_a_login_file_lives_next_to_the_key(tmp_path: Path) -> None:
    key = tmp_path / "gw-1.key"
    login = new_login("gw-1")

    assert login_path(key) == tmp_path / "gw-1.login"
    assert load_login(key) is None
    login_path(key).write_text(login.to_json() + "\n")
    assert load_login(key) == login
    login_path(key).write_bytes(b"\xff\xfe")
    with pytest.raises(MalformedMessage):
        load_login(key)
    login_path(key).write_text("x" * 100_000)
    with pytest.raises(MalformedMessage):
        load_login(key)
