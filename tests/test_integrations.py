"""The Grafana dashboard and the Node-RED flow in deploy/ read only what tern publishes.

Neither program runs here: each file must parse, every topic it names must be one
tern.topics builds (filters with `+` where an id goes), and every payload field it reads
must be a field of that topic's documented payload (the tern.reports dataclasses).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tern import topics
from tern.errors import TopicError
from tern.reports import FleetView, MemberView, RoundMetrics, Status, Telemetry
from tern.topics import TopicKind
from tests.helpers import unavailable

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
GRAFANA = DEPLOY / "grafana" / "tern.json"
NODE_RED = DEPLOY / "node-red" / "flows.json"

PAYLOADS: dict[TopicKind, set[str]] = {
    TopicKind.METRICS: set(RoundMetrics.__dataclass_fields__),
    TopicKind.STATUS: set(Status.__dataclass_fields__),
    TopicKind.TELEMETRY: set(Telemetry.__dataclass_fields__),
    TopicKind.VIEW: set(FleetView.__dataclass_fields__),
}


def topic_kind(topic: str, fleet: str) -> TopicKind:
    """The kind of a tern topic or `+` filter of `fleet`; TopicError when it is not one."""
    concrete = topic.replace("+", "some-id")
    parsed = topics.parse(concrete)
    if parsed.fleet != fleet or "#" in topic:
        raise TopicError(f"{topic} is not a topic of fleet {fleet}")
    if "+" in topic and topics.Topic(parsed.kind, fleet).path != topic:
        raise TopicError(f"{topic}: '+' only stands for the last id")
    return parsed.kind


def test_topic_kind_refuses_what_tern_does_not_publish() -> None:
    assert topic_kind("tern/demo/metrics/+", "demo") is TopicKind.METRICS
    for bad in ("tern/demo/metric/coordinator", "tern/demo/#", "tern/other/status/x", "x/y"):
        with pytest.raises(TopicError):
            topic_kind(bad, "demo")


def grafana() -> dict[str, Any]:
    value = json.loads(GRAFANA.read_text())
    assert isinstance(value, dict)
    return value


def test_the_grafana_dashboard_uses_the_mqtt_data_source_and_a_fleet_variable() -> None:
    dash = grafana()

    assert {p["pluginId"] for p in dash["__inputs"]} == {"grafana-mqtt-datasource"}
    assert [v["name"] for v in dash["templating"]["list"]] == ["fleet"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"]) >= 6


def test_every_grafana_panel_reads_tern_topics_and_documented_fields() -> None:
    seen: set[TopicKind] = set()
    for panel in grafana()["panels"]:
        kinds = set()
        for target in panel["targets"]:
            assert target["datasource"]["type"] == "grafana-mqtt-datasource"
            kinds.add(topic_kind(target["topic"].replace("${fleet}", "demo"), "demo"))
        fields = {"Time"}  # the time the plugin stamps on each message
        for kind in kinds:
            fields |= PAYLOADS[kind]
        named = [
            name
            for step in panel.get("transformations", [])
            if step["id"] == "filterFieldsByName"
            for name in step["options"]["include"]["names"]
        ]
        assert named, f"panel {panel['title']!r} names no field"
        assert set(named) <= fields, (panel["title"], set(named) - fields)
        seen |= kinds

    assert seen == set(PAYLOADS)  # metrics, status, telemetry and views all shown


def node_red() -> list[dict[str, Any]]:
    value = json.loads(NODE_RED.read_text())
    assert isinstance(value, list)
    return value


def downstream(nodes: list[dict[str, Any]], start: dict[str, Any]) -> list[dict[str, Any]]:
    by_id = {n["id"]: n for n in nodes}
    out, todo = [], [w for port in start.get("wires", []) for w in port]
    while todo:
        node = by_id[todo.pop(0)]
        out.append(node)
        todo += [w for port in node.get("wires", []) for w in port]
    return out


def test_the_node_red_flow_wires_mqtt_json_function_and_debug_nodes() -> None:
    nodes = node_red()
    by_id = {n["id"]: n for n in nodes}
    ins = [n for n in nodes if n["type"] == "mqtt in"]

    assert len(by_id) == len(nodes)
    assert all(by_id[n["broker"]]["type"] == "mqtt-broker" for n in ins)
    for node in ins:
        assert [n["type"] for n in downstream(nodes, node)] == ["json", "function", "debug"]
    assert all(w in by_id for n in nodes for port in n.get("wires", []) for w in port)
    assert not any("password" in n or "user" in n for n in nodes)  # logins: flows_cred.json


def test_every_node_red_function_reads_documented_fields_of_its_topic() -> None:
    nodes = node_red()
    seen: set[TopicKind] = set()
    for node in (n for n in nodes if n["type"] == "mqtt in"):
        kind = topic_kind(node["topic"], "demo")
        seen.add(kind)
        (function,) = (n for n in downstream(nodes, node) if n["type"] == "function")
        code = function["func"]
        payload_fields = set(re.findall(r"\bp\.([A-Za-z_]\w*)", code))
        member_fields = set(re.findall(r"\bm\.([A-Za-z_]\w*)", code))
        assert payload_fields, function["name"]
        assert payload_fields <= PAYLOADS[kind], (function["name"], payload_fields - PAYLOADS[kind])
        if kind is TopicKind.VIEW:
            assert member_fields <= set(MemberView.__dataclass_fields__)
        else:
            assert not member_fields

    assert seen == set(PAYLOADS)


def test_every_node_red_function_is_valid_javascript(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (apt-get install nodejs)")
    for i, function in enumerate(n for n in node_red() if n["type"] == "function"):
        script = tmp_path / f"f{i}.js"
        script.write_text(f"(function (msg, node) {{\n{function['func']}\n}});\n")

        check = subprocess.run(
            [node, "--check", str(script)], capture_output=True, text=True, timeout=30, check=False
        )

        assert check.returncode == 0, (function["name"], check.stderr)
