"""The fleet file (tern.fleet)."""

from __future__ import annotations

import json

import pytest
from nacl.signing import SigningKey

from tern.errors import MalformedMessage, TernError
from tern.fleet import COORDINATOR, Fleet, GatewayEntry


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
