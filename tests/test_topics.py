"""Topics: every builder's path, parsing back, filters, id rules, and topics.md in step."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tern import topics
from tern.errors import TopicError
from tern.topics import Topic, TopicKind

REPO = Path(__file__).resolve().parents[1]
VALID_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
valid_ids = st.from_regex(VALID_ID, fullmatch=True)

# (builder, its arguments, the path it must produce)
BUILT_PATHS: list[tuple[Callable[..., Topic], tuple[str, ...], str]] = [
    (topics.global_model, ("plant-7",), "tern/plant-7/model"),
    (topics.round_schedule, ("plant-7",), "tern/plant-7/schedule"),
    (topics.update, ("plant-7", "gw-1", "dev-03"), "tern/plant-7/update/gw-1/dev-03"),
    (topics.updates_to, ("plant-7", "gw-1"), "tern/plant-7/update/gw-1/+"),
    (topics.partial, ("plant-7", "coord", "gw-1"), "tern/plant-7/partial/coord/gw-1"),
    (topics.partials_to, ("plant-7", "coord"), "tern/plant-7/partial/coord/+"),
    (topics.mcu_model, ("plant-7", "dev-03"), "tern/plant-7/mcu/dev-03"),
    (topics.telemetry, ("plant-7", "dev-03"), "tern/plant-7/telemetry/dev-03"),
    (topics.telemetry_all, ("plant-7",), "tern/plant-7/telemetry/+"),
    (topics.metrics, ("plant-7", "gw-1"), "tern/plant-7/metrics/gw-1"),
    (topics.status, ("plant-7", "gw-1"), "tern/plant-7/status/gw-1"),
    (topics.status_all, ("plant-7",), "tern/plant-7/status/+"),
]
FILTER_BUILDERS = {topics.updates_to, topics.partials_to, topics.telemetry_all, topics.status_all}
CONCRETE_BUILDERS = [(b, len(args)) for b, args, _ in BUILT_PATHS if b not in FILTER_BUILDERS]


def builder_id(value: object) -> str | None:
    return getattr(value, "__name__", None)


BAD_IDS = [
    "",
    "a/b",
    "/",
    "+",
    "#",
    "a+",
    "a#b",
    "x" * 65,
    "-lead",
    ".lead",
    "_lead",
    "sp ace",
    "tab\t",
    "new\nline",
    "caf\u00e9",
    "a\x00",
    5,
    b"gw-1",
    1.5,
]


@pytest.mark.parametrize(("builder", "args", "path"), BUILT_PATHS, ids=builder_id)
def test_each_builder_produces_its_documented_path(
    builder: Callable[..., Topic], args: tuple[str, ...], path: str
) -> None:
    topic = builder(*args)

    assert topic.path == path
    assert str(topic) == path
    assert topic.is_filter == (builder in FILTER_BUILDERS)


@pytest.mark.parametrize(
    ("builder", "args", "path"),
    [case for case in BUILT_PATHS if case[0] not in FILTER_BUILDERS],
    ids=builder_id,
)
def test_parse_of_a_concrete_path_gives_back_the_built_topic(
    builder: Callable[..., Topic], args: tuple[str, ...], path: str
) -> None:
    parsed = topics.parse(path)

    assert parsed == builder(*args)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), index=st.integers(0, len(CONCRETE_BUILDERS) - 1))
def test_parse_inverts_every_concrete_builder_for_any_valid_ids(
    data: st.DataObject, index: int
) -> None:
    builder, arity = CONCRETE_BUILDERS[index]
    args = data.draw(st.tuples(*[valid_ids] * arity))
    topic = builder(*args)

    parsed = topics.parse(topic.path)

    assert parsed == topic
    assert parsed.path == topic.path
    assert not parsed.is_filter
    assert topic.matches(parsed.path)


@settings(max_examples=150, deadline=None)
@given(value=st.text(max_size=70) | valid_ids)
def test_an_id_is_accepted_only_if_it_is_a_safe_single_topic_level(value: str) -> None:
    try:
        topic = topics.update("plant-7", value, value)
    except TopicError:
        accepted = False
    else:
        accepted = True

    if accepted:
        assert 1 <= len(value) <= 64
        assert not set(value) & set("/+#\x00 \n")
        assert topics.parse(topic.path) == topic
    else:
        assert re.fullmatch(VALID_ID, value, flags=re.ASCII) is None


# -- filters -------------------------------------------------------------------------

MATCHES = [
    (topics.updates_to("f", "gw-1"), "tern/f/update/gw-1/dev-03", True),
    (topics.updates_to("f", "gw-1"), "tern/f/update/gw-1/dev-99", True),
    (topics.updates_to("f", "gw-1"), "tern/f/update/gw-2/dev-03", False),
    (topics.updates_to("f", "gw-1"), "tern/g/update/gw-1/dev-03", False),
    (topics.updates_to("f", "gw-1"), "tern/f/partial/gw-1/dev-03", False),
    (topics.updates_to("f", "gw-1"), "tern/f/update/gw-1", False),
    (topics.updates_to("f", "gw-1"), "tern/f/update/gw-1/+", False),
    (topics.partials_to("f", "coord"), "tern/f/partial/coord/gw-1", True),
    (topics.partials_to("f", "coord"), "tern/f/partial/gw-1/gw-2", False),
    (topics.partials_to("f", "coord"), "tern/f/update/coord/gw-1", False),
    (topics.partials_to("f", "coord"), "tern/g/partial/coord/gw-1", False),
    (topics.telemetry_all("f"), "tern/f/telemetry/dev-03", True),
    (topics.telemetry_all("f"), "tern/f/telemetry/gw-1", True),
    (topics.telemetry_all("f"), "tern/g/telemetry/dev-03", False),
    (topics.telemetry_all("f"), "tern/f/metrics/dev-03", False),
    (topics.telemetry_all("f"), "tern/f/status/dev-03", False),
    (topics.status_all("f"), "tern/f/status/gw-1", True),
    (topics.status_all("f"), "tern/f/status/coord", True),
    (topics.status_all("f"), "tern/f/telemetry/gw-1", False),
    (topics.status_all("f"), "tern/g/status/gw-1", False),
    (topics.status_all("f"), "tern/f/status/gw-1/extra", False),
    (topics.status_all("f"), "tern/f/status", False),
    (topics.update("f", "gw-1", "dev-03"), "tern/f/update/gw-1/dev-03", True),
    (topics.update("f", "gw-1", "dev-03"), "tern/f/update/gw-1/dev-04", False),
    (topics.global_model("f"), "tern/f/model", True),
    (topics.global_model("f"), "tern/g/model", False),
    (topics.global_model("f"), "tern/f/schedule", False),
]


@pytest.mark.parametrize(("subscription", "topic", "expected"), MATCHES, ids=str)
def test_a_topic_matches_exactly_the_concrete_topics_under_it(
    subscription: Topic, topic: str, expected: bool
) -> None:
    matched = subscription.matches(topic)

    assert matched is expected


def test_matches_accepts_a_topic_value_as_well_as_a_string() -> None:
    subscription = topics.updates_to("f", "gw-1")

    hit = subscription.matches(topics.update("f", "gw-1", "dev-03"))
    miss = subscription.matches(topics.update("f", "gw-2", "dev-03"))

    assert (hit, miss) == (True, False)


@pytest.mark.parametrize(
    "garbage", ["", "tern", "tern/f", "x/f/model", "tern/f/bogus", "tern//model"]
)
def test_matches_is_false_for_strings_that_are_not_topics(garbage: str) -> None:
    matched = topics.status_all("f").matches(garbage)

    assert matched is False


# -- invalid ids ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
@pytest.mark.parametrize(("builder", "args", "path"), BUILT_PATHS, ids=builder_id)
def test_every_builder_rejects_an_invalid_id_in_every_position(
    builder: Callable[..., Topic], args: tuple[str, ...], path: str, bad: object
) -> None:
    for position in range(len(args)):
        with_bad = (*args[:position], bad, *args[position + 1 :])

        with pytest.raises(TopicError) as info:
            builder(*with_bad)

        assert info.value.reason == "bad_topic"


def test_concrete_builders_reject_none_as_an_id() -> None:
    # None is how a Topic spells "+": a concrete builder must not hand back a filter.
    built_filters = []
    for builder, arity in CONCRETE_BUILDERS:
        for position in range(arity):
            args: list[str | None] = ["plant-7", "gw-1", "dev-03"][:arity]
            args[position] = None
            try:
                topic = builder(*args)
            except TopicError:
                continue
            built_filters.append(f"{builder.__name__}{tuple(args)} -> {topic.path}")

    assert built_filters == []


@pytest.mark.parametrize("value", ["a", "0", "A.b_c-d", "x" * 64, "9" * 64, "dev-03"])
def test_validate_id_accepts_ids_of_1_to_64_safe_characters(value: str) -> None:
    returned = topics.validate_id(value)

    assert returned == value


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (TopicKind.GLOBAL_MODEL, {"receiver": "gw-1"}),
        (TopicKind.ROUND_SCHEDULE, {"sender": "coord"}),
        (TopicKind.MCU_MODEL, {"sender": "coord"}),
        (TopicKind.TELEMETRY, {"receiver": "gw-1"}),
        (TopicKind.STATUS, {"receiver": "gw-1"}),
    ],
)
def test_a_topic_refuses_an_id_level_its_kind_does_not_have(
    kind: TopicKind, fields: dict[str, str]
) -> None:
    with pytest.raises(TopicError) as info:
        Topic(kind, "plant-7", **fields)

    assert info.value.reason == "bad_topic"


# -- parse ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "",
        "tern",
        "tern/plant-7",
        "/tern/plant-7/model",
        "Tern/plant-7/model",
        "mqtt/plant-7/model",
        "$SYS/broker/uptime",
        "tern/plant-7/bogus",
        "tern/plant-7/Model",
        "tern/plant-7/model/",
        "tern/plant-7/model/extra",
        "tern/plant-7/schedule/x",
        "tern/plant-7/update/gw-1",
        "tern/plant-7/update/gw-1/dev-03/x",
        "tern/plant-7/update/gw-1/",
        "tern/plant-7/mcu",
        "tern/plant-7/telemetry",
        "tern/plant-7/telemetry/a/b",
        "tern//model",
        "tern/-x/model",
        "tern/plant-7/update//dev-03",
    ],
)
def test_parse_rejects_foreign_topics_and_wrong_level_counts(path: str) -> None:
    with pytest.raises(TopicError) as info:
        topics.parse(path)

    assert info.value.reason == "bad_topic"


@pytest.mark.parametrize(
    "path",
    [
        "tern/plant-7/update/gw-1/+",
        "tern/plant-7/update/+/dev-03",
        "tern/plant-7/update/+/+",
        "tern/plant-7/partial/coord/+",
        "tern/plant-7/telemetry/+",
        "tern/plant-7/status/#",
        "tern/+/model",
        "tern/#",
        "tern/plant-7/#",
        "tern/plant-7/+",
    ],
)
def test_parse_rejects_filters(path: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(path)


@settings(max_examples=200, deadline=None)
@given(
    path=st.text(max_size=80)
    | st.lists(
        st.sampled_from(["tern", "plant-7", "update", "model", "+", "#", "", "gw-1"]), max_size=7
    ).map("/".join)
)
def test_parse_of_any_text_returns_a_concrete_topic_or_raises_topic_error(path: str) -> None:
    try:
        parsed = topics.parse(path)
    except TopicError:
        return

    assert parsed.path == path
    assert not parsed.is_filter


# -- topics.md -----------------------------------------------------------------------


def test_topics_md_documents_the_path_of_every_topic_kind() -> None:
    doc = REPO / "topics.md"
    assert doc.is_file(), "topics.md is missing at the repository root"
    text = doc.read_text(encoding="utf-8")

    undocumented = [
        f"tern/{{fleet}}/{kind}"
        for kind in TopicKind
        if not re.search(rf"tern/(?:\{{fleet\}}|<fleet>)/{re.escape(str(kind))}(?![\w-])", text)
    ]

    assert undocumented == [], "topics.md does not mention these topic patterns"


def test_topics_md_gives_each_topic_kind_its_number_of_id_levels() -> None:
    text = (REPO / "topics.md").read_text(encoding="utf-8")
    placeholder = r"/(?:\{[\w-]+\}|<[\w-]+>)"

    wrong = {}
    for kind in TopicKind:
        pattern = (
            rf"tern/(?:\{{fleet\}}|<fleet>)/{re.escape(str(kind))}((?:{placeholder})*)(?![\w/-])"
        )
        documented = {m.group(1).count("/") for m in re.finditer(pattern, text)}
        if len(topics._LEVELS[kind]) not in documented:
            wrong[str(kind)] = (len(topics._LEVELS[kind]), sorted(documented))

    assert wrong == {}, "kind: (id levels in tern.topics, id levels documented in topics.md)"
