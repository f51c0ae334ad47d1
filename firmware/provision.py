"""Provisioning a board: fresh credentials, its gateway's boards file, and the files to copy.

Order matters for a real board: the boards file is checked first (fleet, gateway,
duplicate device), the firmware is copied with mpremote, and only then is the board
registered, so a failed copy leaves no key behind that no board holds. A dry run
touches no board: it writes the bundle, registers the board and prints the mpremote
commands that copy the bundle later. A board of a TLS broker (``mqtts://``) also gets the
fleet CA in its bundle, as DER (what MicroPython's ssl loads), and its NTP host.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.urls import DEFAULT_TLS_PORT
from firmware.config import CA_NAME, DEFAULT_NTP_HOST, board_config, write_secret_json
from firmware.deps import firmware_dir
from firmware.errors import ProvisionError
from gateway.boards import BoardEntry, Boards, load_boards, new_board_entry, save_boards
from gateway.config import DEFAULT_LISTEN_PORT, GatewayError
from tern import pki, topics
from tern.errors import TopicError

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_TIMEOUT",
    "MAX_CA_BYTES",
    "REPLAY_NAME",
    "Bundle",
    "ProvisionRequest",
    "ca_der",
    "firmware_files",
    "mpremote_commands",
    "parse_gateway",
    "provision",
    "run_mpremote",
]

CONFIG_NAME = "config.json"
REPLAY_NAME = "windows.txt"
DEFAULT_TIMEOUT = 120.0  # seconds per mpremote command (mip install downloads)
MPREMOTE_HINT = "mpremote is not installed: pip install mpremote"
MAX_CA_BYTES = 64 << 10  # a CA certificate file, PEM or DER
_SCHEMES = {"mqtt://": False, "mqtts://": True}


@dataclass(frozen=True, slots=True)
class ProvisionRequest:
    """Everything `tern firmware provision` was asked for."""

    device: str
    fleet: str
    host: str
    port: int
    serial_port: str
    boards_file: Path
    sensor: Mapping[str, Any]
    gateway_id: str | None = None
    rate_hz: float = 1.0
    wifi_ssid: str = ""
    wifi_password: str = field(default="", repr=False)
    replay_file: Path | None = None
    replace: bool = False
    tls: bool = False  # the board connects with TLS, the fleet CA from ca_file in its bundle
    ca_file: Path | None = None
    ntp_host: str = DEFAULT_NTP_HOST


@dataclass(frozen=True, slots=True)
class Bundle:
    """A directory holding exactly what goes to the board's root filesystem."""

    dir: Path
    files: tuple[str, ...]  # names, copied to ":<name>"


def parse_gateway(text: str) -> tuple[str, int, bool]:
    """``[mqtt://|mqtts://]HOST[:PORT]`` -> (host, port, tls). The port defaults to a
    gateway's listen port, or 8883 for ``mqtts://``."""
    rest, tls = text, False
    for scheme, is_tls in _SCHEMES.items():
        if text.startswith(scheme):
            rest, tls = text[len(scheme) :], is_tls
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        host, port_text = rest, str(DEFAULT_TLS_PORT if tls else DEFAULT_LISTEN_PORT)
    if not host or "/" in host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ProvisionError(f"--gateway {text[:100]!r} is not [mqtt://|mqtts://]HOST[:PORT]")
    return host, int(port_text), tls


def ca_der(path: Path) -> bytes:
    """The fleet CA certificate at `path` (PEM, as `tern fleet init` writes ca.crt, or DER)
    as DER; ProvisionError unless it is one readable CA certificate."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CA_BYTES + 1)
    except OSError as exc:
        raise ProvisionError(f"cannot read the fleet CA: {exc}") from exc
    if len(data) > MAX_CA_BYTES:
        raise ProvisionError(f"{path} is larger than {MAX_CA_BYTES} bytes: not a CA certificate")
    try:
        return pki.ca_der(data)
    except pki.PkiError as exc:
        raise ProvisionError(f"{path} is {exc.message}") from exc


def firmware_files(source: Path | None = None) -> list[Path]:
    """Every file of firmware/esp32 that goes on a board (no caches, no dot files)."""
    root = source or firmware_dir()
    if not root.is_dir():
        raise ProvisionError(f"no firmware at {root}")
    files = sorted(
        p
        for p in root.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix != ".pyc"
        and p.name != CONFIG_NAME
    )
    if not any(p.name == "main.py" for p in files):
        raise ProvisionError(f"{root} has no main.py: not the firmware")
    return files


def _registry(req: ProvisionRequest) -> Boards:
    """The gateway's boards as they will be before adding this one; refuses mismatches."""
    try:
        if not req.boards_file.exists():
            if req.gateway_id is None:
                raise ProvisionError(
                    f"{req.boards_file} does not exist: pass --gateway-id to create it"
                )
            topics.validate_id(req.gateway_id, "gateway")
            return Boards(fleet=req.fleet, gateway=req.gateway_id, boards={})
        boards = load_boards(req.boards_file)
    except (GatewayError, TopicError) as exc:
        raise ProvisionError(f"{req.boards_file}: {exc}") from exc
    if boards.fleet != req.fleet:
        raise ProvisionError(f"{req.boards_file} is fleet {boards.fleet!r}, not {req.fleet!r}")
    if req.gateway_id is not None and boards.gateway != req.gateway_id:
        raise ProvisionError(
            f"{req.boards_file} belongs to gateway {boards.gateway!r}, not {req.gateway_id!r}"
        )
    if req.device in boards.boards and not req.replace:
        raise ProvisionError(
            f"{req.device!r} is already registered in {req.boards_file}; "
            "pass --replace to give it fresh credentials"
        )
    return boards


def _write_bundle(out: Path, req: ProvisionRequest, entry: BoardEntry) -> Bundle:
    if not out.exists():
        out.mkdir(mode=0o700, parents=True)  # it will hold config.json, the board's secrets
    names = []
    for src in firmware_files():
        shutil.copyfile(src, out / src.name)
        names.append(src.name)
    sensor = dict(req.sensor)
    if sensor.get("kind") == "replay":
        if req.replay_file is None:  # provision() checked it; a direct caller may not
            raise ProvisionError("--sensor replay needs --replay-file")
        shutil.copyfile(req.replay_file, out / REPLAY_NAME)
        sensor["path"] = REPLAY_NAME
        names.append(REPLAY_NAME)
    if req.tls:
        if req.ca_file is None:
            raise ProvisionError("a TLS broker (mqtts://) needs the fleet CA: --ca-file")
        (out / CA_NAME).write_bytes(ca_der(req.ca_file))
        names.append(CA_NAME)
    config = board_config(
        fleet=req.fleet,
        device=req.device,
        key=entry.key,
        host=req.host,
        port=req.port,
        mqtt_user=entry.mqtt_user,
        mqtt_password=entry.mqtt_password,
        sensor=sensor,
        rate_hz=req.rate_hz,
        wifi_ssid=req.wifi_ssid,
        wifi_password=req.wifi_password,
        tls=req.tls,
        ntp_host=req.ntp_host,
    )
    write_secret_json(out / CONFIG_NAME, config)
    names.append(CONFIG_NAME)
    return Bundle(out, tuple(names))


def mpremote_commands(
    serial_port: str, bundle: Bundle, mpremote: str = "mpremote"
) -> list[list[str]]:
    """umqtt.simple first (mpremote downloads it on this machine), then every file, main.py
    and config.json last, then a reset so the board boots the new firmware."""
    base = [mpremote, "connect", serial_port]
    last = ("main.py", CONFIG_NAME)
    order = sorted(bundle.files, key=lambda n: (n in last, last.index(n) if n in last else 0, n))
    return [
        [*base, "mip", "install", "umqtt.simple"],
        *([*base, "fs", "cp", str(bundle.dir / name), f":{name}"] for name in order),
        [*base, "reset"],
    ]


def run_mpremote(commands: Sequence[Sequence[str]], timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run each command with a deadline; stop at the first failure."""
    if shutil.which(commands[0][0]) is None:
        raise ProvisionError(MPREMOTE_HINT)
    for cmd in commands:
        try:
            done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ProvisionError(f"{shlex.join(cmd)} did not finish in {timeout:g} s") from exc
        except OSError as exc:
            raise ProvisionError(f"{shlex.join(cmd)}: {exc}") from exc
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise ProvisionError(
                f"{shlex.join(cmd)} failed ({done.returncode}): " + " | ".join(tail)
            )


def provision(
    req: ProvisionRequest,
    *,
    out: Path | None,
    dry_run: bool,
    say: Callable[[str], None] = print,
    run: Callable[[Sequence[Sequence[str]]], None] = run_mpremote,
) -> Bundle:
    """Provision one board (see the module docstring); `say` never receives a secret."""
    if dry_run and out is None:
        raise ProvisionError("--dry-run needs --out DIR for the bundle")
    try:
        topics.validate_id(req.device, "device")
        topics.validate_id(req.fleet, "fleet")
    except TopicError as exc:
        raise ProvisionError(str(exc)) from exc
    if req.sensor.get("kind") == "replay" and (
        req.replay_file is None or not req.replay_file.is_file()
    ):
        raise ProvisionError(f"--sensor replay needs --replay-file FILE (got {req.replay_file})")
    if req.tls:  # before anything is registered or written
        if req.ca_file is None:
            raise ProvisionError("a TLS broker (mqtts://) needs the fleet CA: --ca-file")
        ca_der(req.ca_file)
    registry = _registry(req)
    entry = new_board_entry(req.device)
    with tempfile.TemporaryDirectory(prefix="tern-bundle-") as scratch:
        try:
            bundle = _write_bundle(out if out is not None else Path(scratch), req, entry)
        except OSError as exc:
            raise ProvisionError(f"cannot write the bundle: {exc}") from exc
        commands = mpremote_commands(req.serial_port, bundle)
        if dry_run:
            say(f"wrote the bundle for {req.device} to {bundle.dir} (config.json is secret)")
        else:
            for cmd in commands:
                say(shlex.join(cmd))
            run(commands)
        try:
            save_boards(req.boards_file, registry.with_board(req.device, entry))
        except GatewayError as exc:
            raise ProvisionError(f"{req.boards_file}: {exc}") from exc
    say(f"registered {req.device} with gateway {registry.gateway} in {req.boards_file}")
    say(f"  model     {topics.mcu_model(req.fleet, req.device).path}")
    say(f"  telemetry {topics.telemetry(req.fleet, req.device).path}")
    say(f"  status    {topics.status(req.fleet, req.device).path}")
    if req.tls:
        say(
            f"  TLS to {req.host}:{req.port}, fleet CA {req.ca_file}, clock from NTP {req.ntp_host}"
        )
    say(f"reload the gateway: kill -HUP <its pid> (it re-reads {req.boards_file})")
    if dry_run:
        say("copy the bundle to the board with:")
        for cmd in commands:
            say(shlex.join(cmd))
    return bundle
