"""What a component refuses at start, in one line, before it can do harm.

A second coordinator on a state directory in use; a test set that does not fit the
model; a gateway or device (or coordinator) whose key is not the fleet file's; and a
`tern fleet init` that cannot finish, which leaves nothing half-written behind.
"""

from __future__ import annotations

import resource
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.cli import load_member
from broker.mosquitto import free_port
from broker.transport import format_url
from tern.errors import TernError
from tern.fleet import Fleet
from tests.fleet_fixtures import build_fleet, write_fleet
from tests.process_helpers import Spawned, component_args, one_line, run

HOST = "127.0.0.1"
WAIT = 30.0


@pytest.fixture
def kit_dir(tmp_path: Path) -> Path:
    write_fleet(build_fleet({"gw-1": ("coordinator", ["dev-01"])}, "safe-fleet"), tmp_path / "kit")
    return tmp_path / "kit"


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


# -- one coordinator per state directory ---------------------------------------------------


def test_a_second_coordinator_on_the_same_state_dir_is_refused(
    kit_dir: Path, tmp_path: Path, stack: ExitStack
) -> None:
    url = format_url(HOST, free_port(HOST))  # no broker: the first one waits, holding the dir
    args = component_args("coordinator", kit_dir, url, tmp_path)
    first = Spawned(args, stack)
    first.wait_for_line("waiting for", WAIT)

    second = run(args)

    line = one_line(second)
    assert second.returncode == 1
    assert str(tmp_path / "coordinator") in line and "another coordinator" in line
    assert first.popen.poll() is None  # the first one is untouched


# -- a test set that does not fit the model ---------------------------------------------------


@pytest.mark.parametrize(
    ("x_shape", "labels", "expected"),
    [
        ((6, 5), [0, 1, 2, 0, 1, 2], "has 5 features, but the model's input layer takes 8"),
        ((6, 8), [0, 1, 2, 3, 1, 2], "labels must be integers in 0..2"),
        ((6, 8), [0, 1, 2, 0, 1, -1], "labels must be integers in 0..2"),
    ],
)
def test_a_test_set_that_does_not_fit_the_layers_is_refused_at_start(
    kit_dir: Path, tmp_path: Path, x_shape: tuple[int, int], labels: list[int], expected: str
) -> None:
    np.savez(tmp_path / "test.npz", x=np.zeros(x_shape, np.float32), y=np.array(labels))
    url = format_url(HOST, free_port(HOST))
    args = component_args("coordinator", kit_dir, url, tmp_path)

    result = run([*args, "--test-set", str(tmp_path / "test.npz")])

    assert result.returncode == 1
    assert expected in one_line(result)


# -- keys that are not the fleet file's --------------------------------------------------------


@pytest.mark.parametrize(
    ("component", "member", "wrong"),
    [
        ("gateway", "gw-1", "dev-01"),
        ("device", "dev-01", "gw-1"),
        ("coordinator", "coordinator", "gw-1"),
    ],
)
def test_a_key_that_is_not_the_members_is_refused_at_start(
    kit_dir: Path, tmp_path: Path, component: str, member: str, wrong: str
) -> None:
    url = format_url(HOST, free_port(HOST))  # never reached: the key is checked first
    args = component_args(component, kit_dir, url, tmp_path)
    args[args.index("--key") + 1] = str(kit_dir / f"{wrong}.key")

    result = run(args)

    assert result.returncode == 1
    assert f"is not {member}'s key" in one_line(result)


def test_a_login_of_another_member_beside_the_key_is_refused(kit_dir: Path, tmp_path: Path) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "gw-1.key").write_bytes((kit_dir / "gw-1.key").read_bytes())
    (alone / "gw-1.login").write_bytes((kit_dir / "dev-01.login").read_bytes())

    with pytest.raises(TernError, match="is the login of 'dev-01', not gw-1"):
        load_member(kit_dir / "fleet.json", alone / "gw-1.key", "gw-1")


# -- tern fleet init: everything checked, then every file or none ------------------------------


def fleet_init(out: Path, *gateways: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    spec = [arg for gw in gateways for arg in ("--gateway", gw)]
    return run(["-m", "tern", "fleet", "init", "--fleet", "f", "--out", str(out), *spec], **kwargs)


@pytest.mark.parametrize(
    ("gateways", "expected"),
    [
        (["gw-1=dev-01", "gw-1=dev-02"], "gateway 'gw-1' is given twice"),
        (["gw-1=dev-01,dev-01"], "device 'dev-01' is listed twice"),
        (["gw-1=dev-01", "gw-2=dev-01"], "ids repeat"),
        (["gw-1=gw-1"], "ids repeat"),
        (["gw-1@=dev-01"], "no parent after '@'"),
        (["gw-1@gw-9=dev-01"], "unknown parent"),
        (["gw-1=dev 01"], "is not valid"),
    ],
)
def test_fleet_init_refuses_a_bad_layout_before_writing_anything(
    tmp_path: Path, gateways: list[str], expected: str
) -> None:
    out = tmp_path / "new" / "fleet"

    result = fleet_init(out, *gateways)

    assert result.returncode == 2
    assert expected in one_line(result)
    assert not (tmp_path / "new").exists()


def test_fleet_init_into_a_file_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a directory")

    result = fleet_init(tmp_path / "taken", "gw-1=dev-01")

    assert result.returncode == 2
    assert "is not a directory" in one_line(result)
    assert (tmp_path / "taken").read_text() == "not a directory"


def small_files() -> None:
    """In the child: files of at most 300 bytes. Keys and logins fit, fleet.json does
    not, so writing fails midway (EFBIG; Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))


def test_fleet_init_that_fails_while_writing_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "new" / "fleet"

    failed = fleet_init(out, "gw-1=dev-01,dev-02", preexec_fn=small_files)
    left = (tmp_path / "new").exists()
    done = fleet_init(out, "gw-1=dev-01,dev-02")

    assert failed.returncode == 2
    assert "cannot write the fleet to" in one_line(failed)
    assert not left  # not even the directories it made
    assert done.returncode == 0, done.stderr  # and no secret left that needs --force
    assert Fleet.from_json((out / "fleet.json").read_bytes()).members == [
        "coordinator", "dev-01", "dev-02", "gw-1",
    ]  # fmt: skip
    assert not list(out.glob(".*.tmp"))
