"""A device-only install stays light: `pip install tern` has no broker, no certificates, no
plotting and no data sets, so a device process must run without importing any of them.

The device runs as a real process under a `sitecustomize` (on PYTHONPATH) whose import
hook refuses those packages, exactly as if they were not installed; the rest of the fleet
(a top broker, a coordinator, a gateway) runs normally around it. pyproject.toml is
checked for the same split.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from broker.access import AccessControl
from broker.embedded import EmbeddedBroker
from broker.fleet_access import broker_policy
from broker.limits import fleet_limits
from broker.mosquitto import free_port
from broker.transport import format_url
from tern import topics
from tern.fleet import COORDINATOR
from tern.reports import RoundMetrics
from tests.fleet_fixtures import build_fleet, write_fleet
from tests.helpers import wait_until
from tests.mqtt_fixtures import Inbox, MakeTransport
from tests.process_helpers import REPO, Spawned, component_args

# What only the extras bring: brokers (amqtt, yaml), the fleet's PKI (cryptography), the
# demo's data (mnist1d, and matplotlib through it), the terminal view (rich).
EXTRAS_ONLY = (
    "amqtt", "yaml", "cryptography", "mnist1d", "matplotlib", "scipy", "rich", "dp_accounting",
)  # fmt: skip
CORE = {"paho-mqtt", "numpy", "wasmtime", "cbor2", "pynacl"}
WAIT = 60.0

REFUSER = f'''
import sys

REFUSED = {EXTRAS_ONLY!r}


class RefuseExtras:
    """Import hook: the extras' packages are not installed here."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"{{name}} is not in a device-only install", name=name)
        return None


sys.meta_path.insert(0, RefuseExtras())
'''


@pytest.fixture
def device_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python refuses the extras' packages."""
    hook = tmp_path / "refuse-extras"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(REFUSER)
    return {"PYTHONPATH": f"{hook}:{REPO}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}


def run_py(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_refusing_hook_makes_each_extra_package_unimportable(
    device_env: dict[str, str],
) -> None:
    for name in EXTRAS_ONLY:
        result = run_py(["-c", f"import {name}"], device_env)

        assert result.returncode != 0 and "not in a device-only install" in result.stderr, name


def test_tern_device_help_needs_none_of_the_extras(device_env: dict[str, str]) -> None:
    result = run_py(["-m", "tern.cli", "device", "--help"], device_env)

    assert result.returncode == 0, result.stderr
    assert "--gateway-url" in result.stdout and "device-only" not in result.stderr


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (["gateway", "--help"], "broker"),
        (["fleet", "init"], "fleet"),
        (["watch", "--help"], "dashboard"),
    ],
)
def test_a_command_needing_an_extra_says_which_to_install(
    device_env: dict[str, str], command: list[str], extra: str
) -> None:
    result = run_py(["-m", "tern.cli", *command], device_env)

    assert result.returncode == 2
    assert f"pip install 'tern[{extra}]'" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def top_broker(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, Path]]:
    kit = build_fleet({"gw-1": (COORDINATOR, ["dev-01"])}, "light-fleet")
    kit_dir = tmp_path / "kit"
    write_fleet(kit, kit_dir)
    access = AccessControl(broker_policy(kit.fleet, COORDINATOR))
    top = EmbeddedBroker(port=0, access=access, limits=fleet_limits(kit.fleet, COORDINATOR))
    top.start()
    yield top, kit_dir
    top.stop()


def test_a_device_without_the_extras_contributes_to_a_real_round(
    tmp_path: Path,
    stack: ExitStack,
    make_transport: MakeTransport,
    device_env: dict[str, str],
    top_broker: tuple[EmbeddedBroker, Path],
) -> None:
    top, kit_dir = top_broker
    observer_login = (kit_dir / "observer.json").read_text()
    metrics = Inbox()
    observer = make_transport(top.url, "watcher", login=_login(observer_login))
    observer.subscribe(topics.metrics("light-fleet", COORDINATOR), metrics)
    port = free_port("127.0.0.1")
    args = component_args("gateway", kit_dir, top.url, tmp_path)
    args[args.index("127.0.0.1:0")] = f"127.0.0.1:{port}"
    Spawned(args, stack)
    device_args = component_args("device", kit_dir, format_url("127.0.0.1", port), tmp_path)
    device = subprocess.Popen(
        [sys.executable, "-m", "tern.cli", *device_args[1:]],
        cwd=REPO,
        env=device_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    stack.callback(_end, device)
    coordinator = component_args("coordinator", kit_dir, top.url, tmp_path)
    flags = ["--rounds", "1", "--round-timeout", "20", "--min-contributors", "1"]
    Spawned([*coordinator, *flags], stack)

    def contributed() -> bool:
        closed = [RoundMetrics.from_json(m.payload) for m in list(metrics.messages)]
        return any(m.contributors == 1 for m in closed)

    wait_until(contributed, WAIT)
    assert device.poll() is None, "the device process ended"
    device.terminate()
    stderr = device.communicate(timeout=20)[1]
    assert device.returncode == 0, stderr
    assert "a device-only install" not in stderr and "Traceback" not in stderr, stderr


def _login(text: str) -> tuple[str, str]:
    from tern.logins import Login

    login = Login.from_json(text)
    return login.username, login.password


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def test_the_core_dependencies_are_what_a_device_needs_and_the_extras_the_rest() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {_name(spec) for spec in project["dependencies"]}
    extras = project["optional-dependencies"]

    assert names == CORE
    assert {"amqtt", "pyyaml"} <= {_name(s) for s in extras["broker"]}
    assert "cryptography" in {_name(s) for s in extras["fleet"]}
    assert {"tern[broker,fleet,dashboard,privacy]", "mnist1d"} <= {_name(s) for s in extras["demo"]}
    assert "dp-accounting" in {_name(s) for s in extras["privacy"]}
    assert any(s.startswith("tern[") and "demo" in s for s in extras["dev"])


def _name(spec: str) -> str:
    for stop in "<>=;! ":
        spec = spec.split(stop)[0]
    return spec.strip().lower()
