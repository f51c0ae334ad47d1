"""The access policy as pure functions (no broker): filters, checks, and password hashes."""

from __future__ import annotations

import base64

import pytest

from broker.acl import (
    AccessPolicy,
    Account,
    Refusal,
    Rights,
    check_connect,
    check_publish,
    check_subscribe,
    covers,
    is_filter,
    matches,
)
from tern.logins import (
    MAX_ITERATIONS,
    check_password,
    hash_password,
    is_password_hash,
)

# Written by the real `mosquitto_passwd -b` (Mosquitto 2.0.11) for the password "secret".
MOSQUITTO_HASH = (
    "$7$101$JydUkPlqYwIzHI4J$trPI1rvyrQILkTTvafsR+7RMkgEyX6njCE4+2LC5w4f/5o6+kK1iF3+cGfDEbY9g"
    "zlSES1xbtKxMKwYbmUby1Q=="
)
SALT = bytes(range(12))


# -- filters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a", False),
        ("a/+", "a/", True),  # an empty level is a level
        ("+/+", "/x", True),
        ("+", "/x", False),
        ("a/#", "a", True),  # '#' also matches its parent level
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("#", "anything/at/all", True),
        ("#", "$SYS/broker", False),  # wildcards never match a '$' topic at the start
        ("+/broker", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("a/b", "a/+", False),  # a wildcard is never a publishable topic
        ("a/#/b", "a/x/b", False),  # not a valid filter
        ("a/b+", "a/b+", False),
        ("", "", False),
    ],
)
def test_a_filter_matches_topics_as_mqtt_says(
    topic_filter: str, topic: str, expected: bool
) -> None:
    assert matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("allowed", "requested", "expected"),
    [
        ("tern/f/#", "tern/f/status/+", True),
        ("tern/f/#", "tern/f/#", True),
        ("tern/f/#", "tern/f", True),
        ("tern/f/#", "tern/#", False),
        ("tern/f/#", "#", False),
        ("tern/f/status/+", "tern/f/status/gw-1", True),
        ("tern/f/status/+", "tern/f/status/+", True),
        ("tern/f/status/+", "tern/f/status/#", False),  # '#' also matches tern/f/status
        ("tern/f/status/+", "tern/f/status/a/b", False),
        ("tern/f/status/gw-1", "tern/f/status/+", False),
        ("tern/f/+/x", "tern/f/#", False),
        ("tern/f/model", "tern/f/model", True),
        ("tern/f/model", "tern/f/model/x", False),
        ("tern/f/model", "tern/f", False),
        ("#", "$SYS/#", False),
        ("+/#", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("tern/f/#", "tern/f/a#", False),  # not a valid filter
        ("tern/+#", "tern/f", False),
    ],
)
def test_covers_says_whether_every_topic_of_a_filter_is_allowed(
    allowed: str, requested: str, expected: bool
) -> None:
    assert covers(allowed, requested) is expected


def test_filters_are_valid_only_with_whole_level_wildcards() -> None:
    assert is_filter("a/+/b/#") and is_filter("#") and is_filter("/")
    for bad in ["", "a/#/b", "a/b#", "a+/b", "a\x00", 7, None, "x" * 70000]:
        assert not is_filter(bad), bad


def test_rights_refuse_invalid_filters() -> None:
    with pytest.raises(ValueError, match="publish"):
        Rights(publish=("a/#/b",))


# -- a small policy --------------------------------------------------------------------

ALICE = hash_password("alice-pw", salt=SALT)
BOB = hash_password("bob-pw", salt=SALT)
POLICY = AccessPolicy(
    accounts={
        "alice": Account(
            ALICE,
            Rights(
                publish=("t/a/#", "t/shared/+"),
                retain=("t/a/kept",),
                subscribe=("t/b/+",),
                deny=("t/shared/bob", "t/a/secret/#"),
            ),
            frozenset({"alice-1"}),
        ),
        "bob": Account(BOB, Rights(subscribe=("t/#",)), None),
    },
    reserved_client_ids={"alice-1": "alice", "bob-board": "bob"},
)


def test_anonymous_connect_is_refused_unless_the_policy_gives_rights() -> None:
    assert check_connect(POLICY, "x", None, None) is Refusal.ANONYMOUS
    assert check_connect(POLICY, "x", "", "") is Refusal.ANONYMOUS
    open_policy = AccessPolicy(
        anonymous=Rights(publish=("open/+",)), reserved_client_ids={"r": "u"}
    )
    assert check_connect(open_policy, "x", None, None) is None
    assert check_connect(open_policy, "r", None, None) is Refusal.CLIENT_ID
    assert check_publish(open_policy, None, "open/1") is None
    assert check_publish(open_policy, None, "closed/1") is Refusal.PUBLISH


def test_a_user_connects_only_with_its_password() -> None:
    assert check_connect(POLICY, "alice-1", "alice", "alice-pw") is None
    assert check_connect(POLICY, "alice-1", "alice", "alice-pW") is Refusal.BAD_PASSWORD
    assert check_connect(POLICY, "alice-1", "alice", None) is Refusal.BAD_PASSWORD
    assert check_connect(POLICY, "alice-1", "alice", "bob-pw") is Refusal.BAD_PASSWORD
    assert check_connect(POLICY, "alice-1", "mallory", "alice-pw") is Refusal.UNKNOWN_USER


def test_client_ids_are_reserved_for_their_user() -> None:
    assert check_connect(POLICY, "alice-1", "bob", "bob-pw") is Refusal.CLIENT_ID
    assert check_connect(POLICY, "bob-board", "alice", "alice-pw") is Refusal.CLIENT_ID
    assert check_connect(POLICY, "alice-2", "alice", "alice-pw") is Refusal.CLIENT_ID  # listed
    assert check_connect(POLICY, "bob-board", "bob", "bob-pw") is None
    assert check_connect(POLICY, "anything-else", "bob", "bob-pw") is None  # not listed


def test_a_policy_cannot_give_a_user_another_user_s_client_id() -> None:
    with pytest.raises(ValueError, match="reserved"):
        AccessPolicy(
            {"u": Account(ALICE, Rights(), frozenset({"c"}))}, reserved_client_ids={"c": "v"}
        )


def test_publishing_needs_a_matching_filter_and_no_matching_deny() -> None:
    assert check_publish(POLICY, "alice", "t/a/x/y") is None
    assert check_publish(POLICY, "alice", "t/shared/alice") is None
    assert check_publish(POLICY, "alice", "t/shared/bob") is Refusal.PUBLISH  # denied
    assert check_publish(POLICY, "alice", "t/a/secret") is Refusal.PUBLISH  # deny '#'
    assert check_publish(POLICY, "alice", "t/b/x") is Refusal.PUBLISH
    assert check_publish(POLICY, "alice", "t/a/+") is Refusal.PUBLISH  # not a topic
    assert check_publish(POLICY, "bob", "t/a/x") is Refusal.PUBLISH  # reads only
    assert check_publish(POLICY, "mallory", "t/a/x") is Refusal.PUBLISH
    assert check_publish(POLICY, None, "t/a/x") is Refusal.PUBLISH


def test_retaining_needs_a_retain_filter_too() -> None:
    assert check_publish(POLICY, "alice", "t/a/kept", retain=True) is None
    assert check_publish(POLICY, "alice", "t/a/other", retain=True) is Refusal.RETAIN
    assert check_publish(POLICY, "alice", "t/b/kept", retain=True) is Refusal.PUBLISH


def test_subscribing_needs_a_filter_that_covers_the_request() -> None:
    assert check_subscribe(POLICY, "alice", "t/b/+") is None
    assert check_subscribe(POLICY, "alice", "t/b/one") is None
    assert check_subscribe(POLICY, "alice", "t/b/#") is Refusal.SUBSCRIBE
    assert check_subscribe(POLICY, "alice", "#") is Refusal.SUBSCRIBE
    assert check_subscribe(POLICY, "bob", "t/a/#") is None
    assert check_subscribe(POLICY, "bob", "#") is Refusal.SUBSCRIBE
    assert check_subscribe(POLICY, None, "t/b/+") is Refusal.SUBSCRIBE


def test_a_last_will_must_be_publishable_and_retainable_when_retained() -> None:
    assert check_connect(POLICY, "alice-1", "alice", "alice-pw", "t/a/kept", True) is None
    assert check_connect(POLICY, "alice-1", "alice", "alice-pw", "t/a/x", False) is None
    refused = check_connect(POLICY, "alice-1", "alice", "alice-pw", "t/a/x", True)
    assert refused is Refusal.WILL
    assert check_connect(POLICY, "alice-1", "alice", "alice-pw", "t/b/x") is Refusal.WILL


def test_refusal_values_are_the_counter_keys() -> None:
    assert {str(r) for r in Refusal} == {
        "anonymous",
        "unknown_user",
        "bad_password",
        "client_id_reserved",
        "publish_denied",
        "subscribe_denied",
        "retain_denied",
        "will_denied",
    }


def test_secrets_stay_out_of_reprs() -> None:
    assert ALICE not in repr(POLICY) and "alice-pw" not in repr(POLICY)


# -- password hashes -------------------------------------------------------------------


def test_hashes_are_mosquitto_s_pbkdf2_sha512_format() -> None:
    salt = base64.b64decode(MOSQUITTO_HASH.split("$")[3])

    assert hash_password("secret", salt=salt) == MOSQUITTO_HASH
    assert check_password(MOSQUITTO_HASH, "secret")
    assert not check_password(MOSQUITTO_HASH, "Secret")


def test_a_hash_has_a_fresh_salt_each_time() -> None:
    first, second = hash_password("pw"), hash_password("pw")

    assert first != second
    assert check_password(first, "pw") and check_password(second, "pw")
    _, seven, iterations, salt, digest = first.split("$")
    assert (seven, iterations) == ("7", "101")
    assert (len(base64.b64decode(salt)), len(base64.b64decode(digest))) == (12, 64)


def test_other_iteration_counts_verify_up_to_the_bound() -> None:
    hashed = hash_password("pw", iterations=1000)

    assert hashed.startswith("$7$1000$") and check_password(hashed, "pw")
    with pytest.raises(ValueError, match="iterations"):
        hash_password("pw", iterations=MAX_ITERATIONS + 1)
    with pytest.raises(ValueError, match="salt"):
        hash_password("pw", salt=b"short")


@pytest.mark.parametrize(
    "hashed",
    [
        "",
        "secret",
        "$6$101$JydUkPlqYwIzHI4J$" + "A" * 88,  # another scheme
        MOSQUITTO_HASH.replace("$101$", "$0$"),
        MOSQUITTO_HASH.replace("$101$", "$0101$"),
        MOSQUITTO_HASH.replace("$101$", f"${MAX_ITERATIONS + 1}$"),
        MOSQUITTO_HASH.replace("$101$", "$99999999999999999999$"),
        MOSQUITTO_HASH.replace("$101$", "$-1$"),
        MOSQUITTO_HASH.replace("JydUkPlqYwIzHI4J", "JydUkPlq"),  # 6-byte salt
        MOSQUITTO_HASH.replace("JydUkPlqYwIzHI4J", "JydUkPlqYwIzHI4!"),  # not base64
        MOSQUITTO_HASH[:-8] + "=",  # truncated digest
        MOSQUITTO_HASH + "$",
        MOSQUITTO_HASH + "x" * 10_000,
        None,
        7,
        b"$7$",
    ],
)
def test_a_malformed_hash_never_verifies_and_never_raises(hashed: object) -> None:
    assert check_password(hashed, "secret") is False  # type: ignore[arg-type]
    assert is_password_hash(hashed) is False


@pytest.mark.parametrize("password", [None, b"secret", 7, "\ud800", "x" * 70_000])
def test_a_password_of_the_wrong_kind_never_verifies(password: object) -> None:
    assert check_password(MOSQUITTO_HASH, password) is False  # type: ignore[arg-type]


def test_long_deny_lists_match_whether_or_not_they_come_sorted() -> None:
    members = [f"t/status/m{i}" for i in range(1000)]

    for deny in (tuple(members), tuple(sorted(members)), tuple(sorted(members, reverse=True))):
        rights = Rights(publish=("t/status/+",), deny=(*deny, "t/secret/#"))

        assert not rights.may_publish("t/status/m500")
        assert not rights.may_publish("t/status/m999")
        assert rights.may_publish("t/status/board-7")
