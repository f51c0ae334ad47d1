"""The `tern` command line. The one module of tern/ that does I/O; nothing imports it.

Component commands (broker, coordinator, gateway, device, demo) register here as
their packages land; each stays a thin wrapper around its package's `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from nacl.signing import SigningKey

from tern import __version__, topics
from tern.diag import diag
from tern.envelope import DEFAULT_MAX_BYTES, Kind, loads_bounded, open_envelope
from tern.errors import TernError, brief
from tern.fleet import COORDINATOR, DEFAULT_MAX_PARAMS
from tern.keys import signing_key_to_text, verify_key_from_text, verify_key_to_text
from tern.logins import OBSERVER
from tern.members import new_members

__all__ = ["main"]

OBSERVER_FILE = "observer.json"  # the read-only login, in the fleet directory

# Component commands: `tern NAME ARGS...` runs MODULE.main(ARGS), the same parser as
# `python -m PACKAGE`, imported only when used so `tern --help` stays light.
COMPONENTS: dict[str, tuple[str, str]] = {
    "broker": ("broker.cli", "run the embedded MQTT broker (amqtt)"),
    "coordinator": ("coordinator.__main__", "run a fleet's federated rounds"),
    "gateway": ("gateway.__main__", "serve devices and relay one partial aggregate upstream"),
    "device": ("device.__main__", "train on local data and send quantized updates"),
    "data": ("device.data", "write per-device MNIST-1D partitions and a test set"),
    "demo": ("demo.run", "a whole fleet over real MQTT on this machine"),
    "firmware": ("firmware.__main__", "provision ESP32 boards (MicroPython firmware)"),
}


def _keygen(args: argparse.Namespace) -> int:
    topics.validate_id(args.id, "id")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write_key(out, args.id, args.force)
    except TernError as exc:
        print(f"tern: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out / (args.id + '.key')} (keep secret) and {out / (args.id + '.pub')}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    try:
        if args.file == "-":
            data = sys.stdin.buffer.read(DEFAULT_MAX_BYTES + 1)
        else:
            with Path(args.file).open("rb") as fh:
                data = fh.read(DEFAULT_MAX_BYTES + 1)
        key_text = args.pubkey
        if args.pubkey is not None and Path(args.pubkey).is_file():
            with Path(args.pubkey).open("rb") as fh:
                key_text = fh.read(4096).decode("utf-8", errors="replace")
    except OSError as exc:
        print(f"tern inspect: {exc.filename or args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        value = loads_bounded(data, DEFAULT_MAX_BYTES)
        print(diag(value, max_bytes=None if args.full else 16))
        if key_text is None:
            return 0
        sender = value.get("sender") if isinstance(value, dict) else None
        if not isinstance(sender, str):
            raise TernError("no sender field: not an envelope")
        open_envelope(
            data,
            {sender: verify_key_from_text(key_text)},
            fleet=args.fleet or str(value.get("fleet")),
            kinds=set(Kind),
        )
    except TernError as exc:
        print(f"invalid ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    print(f"signature: valid ({len(data)} bytes)")
    return 0


def _write_key(out: Path, cid: str, force: bool) -> SigningKey:
    private, public = out / f"{cid}.key", out / f"{cid}.pub"
    if private.exists() and not force:
        raise TernError(f"{private} exists; pass --force to replace it")
    key = SigningKey.generate()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(signing_key_to_text(key) + "\n")
    public.write_text(verify_key_to_text(key.verify_key) + "\n")
    return key


def _fleet_init(args: argparse.Namespace) -> int:
    """Check everything (ids, the layout, bounds, the output directory), make the keys in
    memory, then write every file or none (`_write_all`)."""
    out = Path(args.out)
    layout = _layout(args.gateway)
    ids = [COORDINATOR, *layout, *(d for _, ds in layout.values() for d in ds)]
    for cid in ids:
        topics.validate_id(cid, "id")
    max_weight = dict(_max_weight(spec) for spec in args.max_weight)
    secrets = [*(f"{cid}{ext}" for cid in ids for ext in (".key", ".login")), OBSERVER_FILE]
    names = [*secrets, *(f"{cid}.pub" for cid in ids), "fleet.json"]
    if out.exists() and not out.is_dir():
        raise TernError(f"--out {out} is not a directory")
    existing = [out / n for n in secrets if (out / n).exists()]
    if existing and not args.force:
        raise TernError(f"{existing[0]} exists; pass --force to replace the fleet's secrets")
    in_the_way = [out / n for n in names if (out / n).is_dir()]
    if in_the_way:
        raise TernError(f"{in_the_way[0]} is a directory, not a file it can replace")
    members = new_members(  # checks the whole layout: parents, cycles, repeated ids, bounds
        args.fleet, layout, max_params=args.max_params, max_weight=max_weight
    )
    fleet, keys, logins = members.fleet, members.keys, members.logins
    files: dict[str, tuple[bytes, int]] = {}  # name -> (content, mode): secrets 0600
    for cid in ids:
        files[f"{cid}.key"] = ((signing_key_to_text(keys[cid]) + "\n").encode(), 0o600)
        files[f"{cid}.pub"] = ((verify_key_to_text(keys[cid].verify_key) + "\n").encode(), 0o644)
        files[f"{cid}.login"] = ((logins[cid].to_json() + "\n").encode(), 0o600)
    files[OBSERVER_FILE] = ((logins[OBSERVER].to_json() + "\n").encode(), 0o600)
    files["fleet.json"] = ((fleet.to_json() + "\n").encode(), 0o644)
    try:
        _write_all(out, files)
    except OSError as exc:
        raise TernError(f"cannot write the fleet to {out}: {exc.strerror or exc}") from None
    print(f"wrote {out / 'fleet.json'}, {len(ids)} key pairs and logins, {OBSERVER_FILE} in {out}")
    print("give each machine fleet.json and only its own ID.key and ID.login;")
    print(f"{OBSERVER_FILE} is the read-only login for dashboards")
    return 0


def _layout(specs: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """`--gateway ID[@PARENT]=DEV,DEV` values as a layout; a gateway or a device named
    twice is an error, not a silent merge."""
    layout: dict[str, tuple[str, list[str]]] = {}
    for spec in specs:
        head, _, devices = spec.partition("=")
        gw, at, parent = head.partition("@")
        if at and not parent:
            raise TernError(f"--gateway {brief(spec, 80)}: no parent after '@'")
        if gw in layout:
            raise TernError(f"gateway {brief(gw, 64)} is given twice (one --gateway each)")
        names = [d for d in devices.split(",") if d]
        twice = sorted({d for d in names if names.count(d) > 1})
        if twice:
            raise TernError(f"device {brief(twice[0], 64)} is listed twice")
        layout[gw] = (parent or COORDINATOR, names)
    return layout


def _write_all(out: Path, files: Mapping[str, tuple[bytes, int]]) -> None:
    """Write every file or none: each to a temporary name in `out` first (flushed to disk,
    with its mode), then all renamed in place. A failure on the way removes the temporary
    files and the directories made for them."""
    made: list[Path] = []
    staged: list[tuple[Path, Path]] = []
    try:
        for missing in reversed([out, *out.parents]):
            if not missing.exists():
                missing.mkdir()
                made.append(missing)
        for name, (data, mode) in files.items():
            fd, temporary = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
            staged.append((Path(temporary), out / name))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(temporary, mode)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    for tmp, final in staged:
        os.replace(tmp, final)


def _max_weight(spec: str) -> tuple[str, float]:
    device, sep, weight = spec.partition("=")
    try:
        if not sep:
            raise ValueError
        return device, float(weight)
    except ValueError:
        raise TernError(f"--max-weight takes DEVICE=WEIGHT, not {spec[:80]!r}") from None


def _mosquitto_config(args: argparse.Namespace) -> int:
    # imported here: `tern --help` stays light, and tern/ imports no component at the top
    from broker.cli import read_fleet
    from broker.errors import BrokerError
    from broker.mosquitto_config import write_mosquitto_config

    errors: tuple[type[Exception], ...] = (OSError, UnicodeDecodeError, BrokerError)
    boards = None
    try:
        fleet = read_fleet(args.fleet_file)  # bounded, and one line for a binary file
        if args.boards is not None:  # the gateway package only when boards are given
            from gateway.boards import load_boards
            from gateway.config import GatewayError

            errors += (GatewayError,)  # BoardsError: a bad file, or a board that collides
            boards = load_boards(args.boards)
        files = write_mosquitto_config(
            fleet,
            Path(args.out),
            broker=args.broker,
            boards=boards,
            host=args.host,
            port=args.port or _default_port(args.broker),
        )
    except errors as exc:
        print(f"tern: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {files.conf}, {files.password_file} (0600) and {files.acl_file}")
    print(f"run: mosquitto -c {files.conf}")
    print(f"(as root, mosquitto reads them as user mosquitto: chown -R mosquitto: {args.out})")
    return 0


def _default_port(broker: str) -> int:
    return 1883 if broker == COORDINATOR else 1884  # tern gateway's default --listen port


def _topics(args: argparse.Namespace) -> int:
    f, gw, dev, parent = args.fleet, args.gateway, args.device, args.parent
    rows = [
        ("global model (retained)", topics.global_model(f)),
        ("round schedule (retained)", topics.round_schedule(f)),
        ("all kernels (retained)", topics.kernels(f)),
        ("device update", topics.update(f, gw, dev)),
        ("all updates to the gateway", topics.updates_to(f, gw)),
        ("partial to the parent", topics.partial(f, parent, gw)),
        ("microcontroller model", topics.mcu_model(f, dev)),
        ("telemetry", topics.telemetry(f, dev)),
        ("all telemetry", topics.telemetry_all(f)),
        ("metrics", topics.metrics(f, gw)),
        ("status (last will)", topics.status(f, gw)),
        ("all status", topics.status_all(f)),
    ]
    for label, topic in rows:
        print(f"{label:<28} {topic.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tern", description="Federated learning for IoT fleets over MQTT."
    )
    ap.add_argument("--version", action="version", version=f"tern {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    for name, (_, summary) in COMPONENTS.items():
        sub.add_parser(name, help=f"{summary} (tern {name} --help)", add_help=False)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair: ID.key (secret) and ID.pub")
    p.add_argument("id", help="component id (coordinator, gateway or device)")
    p.add_argument("--out", default=".", help="directory for the key files (default: .)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("fleet", help="make a fleet: fleet.json, a key pair and login per member")
    fleet_sub = p.add_subparsers(dest="fleet_command", required=True)
    p = fleet_sub.add_parser(
        "init", help="write fleet.json, ID.key/ID.pub/ID.login for every id and observer.json"
    )
    p.add_argument("--fleet", required=True, help="fleet id")
    p.add_argument(
        "--gateway",
        action="append",
        required=True,
        metavar="ID[@PARENT]=DEV,DEV",
        help="a gateway, its parent gateway (default: the coordinator) and its devices; repeat",
    )
    p.add_argument(
        "--max-params",
        type=int,
        default=DEFAULT_MAX_PARAMS,
        metavar="N",
        help=f"the largest model the fleet accepts, in parameters (default {DEFAULT_MAX_PARAMS})",
    )
    p.add_argument(
        "--max-weight",
        action="append",
        default=[],
        metavar="DEV=W",
        help="the largest weight (training samples) a device's update may claim; repeat",
    )
    p.add_argument("--out", default=".", help="directory for fleet.json, keys and logins")
    p.add_argument("--force", action="store_true", help="replace existing keys and logins")
    p.set_defaults(func=_fleet_init)

    p = sub.add_parser(
        "mosquitto-config",
        help="write Mosquitto's password_file, acl_file and mosquitto.conf for a fleet's broker",
    )
    p.add_argument("--fleet-file", required=True, help="the fleet file (fleet.json)")
    p.add_argument(
        "--broker",
        default=COORDINATOR,
        metavar="coordinator|GATEWAY",
        help="whose broker: the coordinator's (default) or a gateway's own downstream broker",
    )
    p.add_argument("--boards", help="the gateway's boards file (its boards log in too)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument(
        "--port", type=int, help="port to listen on (default 1883; 1884 for a gateway's broker)"
    )
    p.add_argument("--out", required=True, help="directory for the files")
    p.set_defaults(func=_mosquitto_config)

    p = sub.add_parser("inspect", help="print a message in CBOR diagnostic notation, verify it")
    p.add_argument("file", help="file with one message's bytes, or - for standard input")
    p.add_argument("--pubkey", help="sender's verify key: 64 hex digits or a .pub file")
    p.add_argument("--fleet", help="fleet the message must belong to (default: its own)")
    p.add_argument("--full", action="store_true", help="print long byte strings whole")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("topics", help="print the MQTT topics of a fleet")
    p.add_argument("--fleet", default="demo")
    p.add_argument("--gateway", default="gw-1")
    p.add_argument("--device", default="dev-1")
    p.add_argument("--parent", default="coordinator")
    p.set_defaults(func=_topics)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in COMPONENTS:
        module = importlib.import_module(COMPONENTS[words[0]][0])
        return int(module.main(words[1:]))
    args = build_parser().parse_args(words)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return code
    except TernError as exc:
        print(f"tern: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left early (`tern inspect msg | head -1`): stop quietly, and point
        # stdout at /dev/null so the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
