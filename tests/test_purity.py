"""The protocol layer stays pure, and topic strings are built in tern/topics.py only.

Both checks read the source (AST), so they hold for code no test happens to import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tern", "broker", "coordinator", "gateway", "kernels", "firmware", "dashboard")
COMPONENTS = ("broker", "coordinator", "gateway", "kernels", "firmware")
IMPURE = (
    "asyncio",
    "socket",
    "paho",
    "amqtt",
    "wasmtime",
    "apscheduler",
    "subprocess",
    "threading",
)
OPENERS = {"io", "os", "builtins", "codecs"}  # io.open(), os.open(), ...


def protocol_modules() -> list[Path]:
    return sorted(p for p in (REPO / "tern").rglob("*.py") if p != REPO / "tern" / "cli.py")


def package_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _root(name: str) -> str:
    return name.split(".")[0]


def forbidden_uses(source: str, modules: tuple[str, ...]) -> list[str]:
    """Imports of `modules` (static or via __import__/import_module) and calls of open()."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if _root(a.name) in modules]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and _root(node.module) in modules:
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else None
            attr = func.attr if isinstance(func, ast.Attribute) else None
            if name == "open" or (
                attr == "open" and isinstance(func.value, ast.Name) and func.value.id in OPENERS
            ):
                found.append(f"open() at line {node.lineno}")
            if (name == "__import__" or attr == "import_module") and node.args:
                arg = node.args[0]
                if (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and _root(arg.value) in modules
                ):
                    found.append(f"dynamic import of {arg.value} at line {node.lineno}")
    return found


def topic_literals(source: str) -> list[str]:
    """String literals (f-string parts included) that start a topic: ``tern/...``."""
    return [
        f"line {node.lineno}: {node.value!r}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("tern/")
    ]


# -- the scanners themselves catch what they are for -----------------------------------


@pytest.mark.parametrize(
    "snippet",
    [
        "import asyncio",
        "import paho.mqtt.client as mqtt",
        "from amqtt.broker import Broker",
        "import os, socket",
        "from threading import Lock",
        "def f():\n    import subprocess",
        "open('model.bin', 'rb')",
        "io.open('x')",
        "importlib.import_module('wasmtime')",
        "__import__('apscheduler.schedulers')",
    ],
)
def test_the_purity_scan_flags_io_imports_and_open_calls(snippet: str) -> None:
    found = forbidden_uses(snippet, IMPURE)

    assert len(found) == 1


def test_the_purity_scan_lets_pure_code_through() -> None:
    source = "import re\nfrom collections.abc import Mapping\nfrom . import x\nf.open_envelope(b)\n"

    found = forbidden_uses(source, IMPURE)

    assert found == []


@pytest.mark.parametrize(
    "snippet",
    ['t = "tern/plant-7/model"', 't = f"tern/{fleet}/update/{gw}/{dev}"', "t = ('tern/' + f)"],
)
def test_the_topic_scan_flags_topic_strings_and_f_strings(snippet: str) -> None:
    found = topic_literals(snippet)

    assert len(found) == 1


def test_the_topic_scan_ignores_strings_that_only_mention_a_topic() -> None:
    source = '"""Publishes on tern/<fleet>/model."""\nx = "see tern/topics.py"\n'

    found = topic_literals(source)

    assert found == []


# -- the repository --------------------------------------------------------------------


def test_the_protocol_layer_has_modules_to_scan() -> None:
    names = {p.name for p in protocol_modules()}

    assert {"envelope.py", "topics.py", "messages.py", "codecs.py"} <= names
    assert "cli.py" not in names


@pytest.mark.parametrize("module", protocol_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_protocol_module_does_no_io(module: Path) -> None:
    found = forbidden_uses(module.read_text(encoding="utf-8"), IMPURE)

    assert found == []


@pytest.mark.parametrize("module", protocol_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_protocol_module_imports_no_component(module: Path) -> None:
    found = forbidden_uses(module.read_text(encoding="utf-8"), COMPONENTS)

    assert [f for f in found if not f.startswith("open()")] == []


def test_topic_strings_are_written_only_in_tern_topics() -> None:
    offenders = {
        str(path.relative_to(REPO)): found
        for path in package_modules()
        if path != REPO / "tern" / "topics.py"
        and (found := topic_literals(path.read_text(encoding="utf-8")))
    }

    assert offenders == {}, "build topics with tern.topics instead"
