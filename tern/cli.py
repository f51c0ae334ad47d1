"""The `tern` command line. The one module of tern/ that does I/O; nothing imports it.

Component commands (broker, coordinator, gateway, device, demo) register here as
their packages land; each stays a thin wrapper around its package's `main`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from nacl.signing import SigningKey

from tern import __version__, topics
from tern.diag import diag
from tern.envelope import DEFAULT_MAX_BYTES, Kind, loads_bounded, open_envelope
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.keys import signing_key_to_text, verify_key_from_text, verify_key_to_text

__all__ = ["main"]

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
    "health": ("broker.health", "exit 0 if a broker answers (and a component is online)"),
    "watch": ("dashboard.watch", "a live terminal view of a fleet, as its observer"),
    "dashboard": ("dashboard.server", "serve the fleet's live web dashboard on this machine"),
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


def _mosquitto_config(args: argparse.Namespace) -> int:
    # imported here: `tern --help` stays light, and tern/ imports no component at the top
    from broker.cli import read_fleet
    from broker.errors import BrokerError
    from broker.mosquitto_config import Listeners, write_mosquitto_config

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
            port=args.port or _default_port(args.broker, args.tls),
            listeners=Listeners(
                tls_dir=Path(args.tls_dir or Path(args.fleet_file).parent) if args.tls else None,
                require_client_cert=args.require_client_cert,
                ws_port=args.ws_port,
                plain_port=args.plain_port,
            ),
        )
    except errors as exc:
        print(f"tern: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {files.conf}, {files.password_file} (0600) and {files.acl_file}")
    if files.tls:
        print(f"copied {', '.join(p.name for p in files.tls)} (key 0600) into {args.out}")
    print(f"run: mosquitto -c {files.conf}")
    print(f"(as root, mosquitto reads them as user mosquitto: chown -R mosquitto: {args.out})")
    return 0


def _default_port(broker: str, tls: bool) -> int:
    if tls:
        return 8883 if broker == COORDINATOR else 8884
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
        ("view (retained, upstream)", topics.view(f, gw)),
        ("all views", topics.view_all(f)),
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

    try:  # imported here: it needs `cryptography`, which a device-only install lacks
        from tern.fleet_cli import add_fleet_parser
    except ModuleNotFoundError as exc:
        needs = missing_extra(exc)
        p = sub.add_parser("fleet", help=f"make a fleet ({needs})", add_help=False)
        p.add_argument("words", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda _args: _refuse("fleet", needs))
    else:
        add_fleet_parser(sub)

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
        "--port",
        type=int,
        help="port to listen on (default 1883, 1884 for a gateway's broker; with --tls 8883, 8884)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve TLS (1.2 or later) on --port with the fleet CA's certificate for this broker",
    )
    p.add_argument(
        "--tls-dir",
        help="where ca.crt and BROKER.server.crt/.key are (default: the fleet file's directory)",
    )
    p.add_argument(
        "--require-client-cert",
        action="store_true",
        help="with --tls: require a client certificate from the fleet CA (fleet init --mtls)",
    )
    p.add_argument(
        "--ws-port", type=int, metavar="N", help="also serve MQTT over WebSockets on port N"
    )
    p.add_argument(
        "--plain-port",
        type=int,
        metavar="N",
        help="also serve plaintext MQTT on 127.0.0.1:N (development on this machine)",
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


# The packages only an extra installs (pyproject.toml): a device-only `pip install tern`
# lacks them, and a command that needs one says which extra brings it.
EXTRA_OF = {
    "amqtt": "broker",
    "yaml": "broker",
    "cryptography": "fleet",
    "rich": "dashboard",
    "mnist1d": "demo",
    "matplotlib": "demo",
    "mpremote": "boards",
    "dp_accounting": "privacy",
}


def missing_extra(exc: ModuleNotFoundError) -> str:
    """What to install for a missing package; re-raises `exc` for any other module."""
    package = (exc.name or "").partition(".")[0]
    if package not in EXTRA_OF:
        raise exc
    return f"needs {package}: pip install 'tern[{EXTRA_OF[package]}]'"


def _refuse(command: str, needs: str) -> int:
    print(f"tern {command}: {needs}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in COMPONENTS:
        try:
            module = importlib.import_module(COMPONENTS[words[0]][0])
        except ModuleNotFoundError as exc:
            return _refuse(words[0], missing_extra(exc))
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
