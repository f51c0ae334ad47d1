"""The chunk rows of a fleet's broker rights (topics.md "Chunks"): every member publishes
and retains its own chunks, and reads the chunks of whoever it reads messages from."""

from __future__ import annotations

import pytest

from broker.acl import check_publish, check_subscribe
from broker.fleet_access import broker_policy
from broker.mosquitto_config import acl_file_text
from tern import topics
from tern.fleet import COORDINATOR
from tests.fleet_fixtures import RIGHTS_LAYOUT, build_fleet

F = "plant-7"
FLEET = build_fleet(RIGHTS_LAYOUT, fleet_id=F).fleet
POLICIES = {b: broker_policy(FLEET, b) for b in (COORDINATOR, "gw-1")}
HEX = "cd" * 32


def chunk(sender: str) -> str:
    return topics.chunk(F, sender, HEX).path


# (broker, user, chunk sender, may publish and retain)
PUBLISH_ROWS = [
    (COORDINATOR, COORDINATOR, COORDINATOR, True),
    (COORDINATOR, COORDINATOR, "gw-1", False),
    (COORDINATOR, "gw-1", "gw-1", True),
    (COORDINATOR, "gw-1", COORDINATOR, False),
    (COORDINATOR, "gw-1", "gw-2", False),
    ("gw-1", "gw-1", "gw-1", True),
    ("gw-1", "gw-1", COORDINATOR, False),
    ("gw-1", "gw-1", "dev-01", False),
    ("gw-1", "dev-01", "dev-01", True),
    ("gw-1", "dev-01", "dev-02", False),
    ("gw-1", "dev-01", "gw-1", False),
    ("gw-1", "gw-1a", "gw-1a", True),
    ("gw-1", "gw-1a", "dev-03", False),
]


@pytest.mark.parametrize(("broker", "user", "sender", "allowed"), PUBLISH_ROWS)
def test_a_member_publishes_and_retains_only_its_own_chunks(
    broker: str, user: str, sender: str, allowed: bool
) -> None:
    policy = POLICIES[broker]
    assert (check_publish(policy, user, chunk(sender), retain=False) is None) is allowed
    assert (check_publish(policy, user, chunk(sender), retain=True) is None) is allowed


# (broker, user, chunk sender, may read)
READ_ROWS = [
    (COORDINATOR, COORDINATOR, "gw-1", True),
    (COORDINATOR, COORDINATOR, "gw-2", True),
    (COORDINATOR, COORDINATOR, "gw-1a", False),  # not its child: below gw-1
    (COORDINATOR, "gw-1", COORDINATOR, True),
    (COORDINATOR, "gw-1", "gw-2", False),
    ("gw-1", "gw-1", "dev-01", True),
    ("gw-1", "gw-1", "gw-1a", True),
    ("gw-1", "gw-1", "dev-03", False),  # gw-1a's device, on gw-1a's broker
    ("gw-1", "dev-01", "gw-1", True),
    ("gw-1", "dev-01", "dev-02", False),
    ("gw-1", "dev-01", COORDINATOR, False),
    ("gw-1", "gw-1a", "gw-1", True),
    ("gw-1", "gw-1a", "dev-01", False),
]


@pytest.mark.parametrize(("broker", "user", "sender", "allowed"), READ_ROWS)
def test_a_member_reads_the_chunks_of_whoever_it_hears(
    broker: str, user: str, sender: str, allowed: bool
) -> None:
    policy = POLICIES[broker]
    assert (check_subscribe(policy, user, chunk(sender)) is None) is allowed
    whole = topics.chunks_of(F, sender).path
    assert (check_subscribe(policy, user, whole) is None) is allowed
    assert check_subscribe(policy, user, topics.chunks_of(F, None).path) is not None


def test_mosquitto_acl_says_the_same_chunk_rights() -> None:
    acl = acl_file_text(POLICIES["gw-1"])
    device = acl.split("user dev-01\n")[1].split("\n\n")[0].splitlines()
    assert f"topic write {topics.chunks_of(F, 'dev-01').path}" in device
    assert f"topic read {topics.chunks_of(F, 'gw-1').path}" in device
    own = acl.split("user gw-1\n")[1].split("\n\n")[0].splitlines()
    assert f"topic write {topics.chunks_of(F, 'gw-1').path}" in own
    assert f"topic read {topics.chunks_of(F, 'gw-1a').path}" in own
