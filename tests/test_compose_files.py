"""docker-compose.yml and the container files: valid for both Docker and podman, and saying
only what tern accepts.

The compose file is checked against the Compose specification's JSON schema (the copy
check-jsonschema ships) and parsed by podman-compose; every tern command in it, the
healthchecks included, is parsed by that command's own argument parser, so a renamed or
misspelt flag fails here rather than in a container. The stack itself runs in CI's
container job (.ci/containers).
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # (check-jsonschema brings it)
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships untyped

from tern.cli import COMPONENTS
from tests.helpers import unavailable
from tests.process_helpers import REPO

COMPOSE = REPO / "docker-compose.yml"
SECRET_WORDS = re.compile(r"key|password|secret|token|login", re.IGNORECASE)


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())  # resolves the anchors and merge keys
    assert isinstance(doc, dict)
    return doc


def interpolated(value: str) -> str:
    """`${NAME:-default}` as Compose reads it with NAME unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def tern_services() -> dict[str, dict[str, Any]]:
    return {
        name: s
        for name, s in compose()["services"].items()
        if str(s.get("image", "")).endswith("tern:latest}") and name != "fleet-init"
    }


def test_the_compose_file_follows_the_compose_specification() -> None:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())

    jsonschema.validate(compose(), schema)
    assert "version" not in compose()  # obsolete in the Compose specification


def test_podman_compose_reads_the_file(tmp_path: Path) -> None:
    beside = Path(sys.executable).with_name("podman-compose")  # the venv's, from the dev extra
    exe = str(beside) if beside.exists() else shutil.which("podman-compose")
    if exe is None:
        unavailable("podman-compose is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PODMAN_COMPOSE_PROVIDER": "podman"}
    result = subprocess.run(
        [exe, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"mosquitto", "fleet-init", "coordinator", "gateway-1", "gateway-2"} <= set(services)
    assert {"dashboard", "dev-01", "dev-04"} <= set(services)


def test_every_tern_command_and_healthcheck_parses_with_its_own_parser() -> None:
    commands: list[list[str]] = []
    for service in tern_services().values():
        if "entrypoint" not in service:  # the image's entrypoint: tern
            commands.append([interpolated(w) for w in service["command"]])
        test = service["healthcheck"]["test"]
        if test[:2] == ["CMD", "tern"]:
            commands.append([interpolated(w) for w in test[2:]])
    assert {c[0] for c in commands} >= {"coordinator", "gateway", "device", "dashboard", "health"}

    for words in commands:
        module = importlib.import_module(COMPONENTS[words[0]][0])
        module.build_parser().parse_args(words[1:])  # SystemExit(2) on an unknown flag


def test_keys_and_logins_are_mounted_read_only_never_in_the_environment() -> None:
    for name, service in compose()["services"].items():
        for var, value in (service.get("environment") or {}).items():
            assert not SECRET_WORDS.search(var), f"{name}: {var}"
            assert "BEGIN" not in str(value) and '"password"' not in str(value), name
        if name in ("fleet-init",):
            continue
        mounts = service.get("volumes", [])
        assert "fleet:/fleet:ro" in mounts, f"{name} must mount the fleet read-only"


def test_long_running_services_restart_and_report_their_health() -> None:
    for name, service in compose()["services"].items():
        if name == "fleet-init":
            assert service["restart"] == "no"
            continue
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"][0] == "CMD", name


def test_every_component_talks_tls_to_its_broker() -> None:
    urls = [
        interpolated(word.partition("=")[2])
        for service in tern_services().values()
        for word in service["command"]
        if word.startswith(("--broker=", "--upstream=", "--gateway-url="))
    ]
    assert urls, "no broker URL found"
    for url in urls:
        assert url.startswith(("mqtts://", "ws://localhost")), url


def test_the_coordinator_keeps_its_state_on_a_named_volume() -> None:
    coordinator = compose()["services"]["coordinator"]
    state = next(w for w in coordinator["command"] if w.startswith("--state-dir="))
    target = state.partition("=")[2]

    mounts = [m.split(":") for m in coordinator["volumes"]]
    assert any(target.startswith(m[1]) and m[0] in compose()["volumes"] for m in mounts)


@pytest.mark.parametrize(
    ("path", "base"),
    [("Dockerfile", "python:3.11-slim-bookworm"), ("deploy/mosquitto/Containerfile", "debian")],
)
def test_container_files_take_their_base_image_as_a_build_argument(path: str, base: str) -> None:
    text = (REPO / path).read_text()

    assert re.search(rf"^ARG BASE_IMAGE={re.escape(base)}", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.MULTILINE)
    assert re.search(r"^USER (?!root)", text, re.MULTILINE), "runs as a non-root user"
