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
from tern.fleet import COORDINATOR, Fleet, GatewayEntry
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
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    try:
        value = loads_bounded(data, DEFAULT_MAX_BYTES)
        print(diag(value, max_bytes=None if args.full else 16))
        if args.pubkey is None:
            return 0
        key_text = Path(args.pubkey).read_text() if Path(args.pubkey).is_file() else args.pubkey
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layout: dict[str, tuple[str, list[str]]] = {}
    for spec in args.gateway:
        head, _, devices = spec.partition("=")
        gw, _, parent = head.partition("@")
        layout[gw] = (parent or COORDINATOR, [d for d in devices.split(",") if d])
    ids = [COORDINATOR, *layout, *(d for _, ds in layout.values() for d in ds)]
    for cid in ids:
        topics.validate_id(cid, "id")
    keys = {cid: _write_key(out, cid, args.force) for cid in ids}
    fleet = Fleet(
        args.fleet,
        keys[COORDINATOR].verify_key,
        {
            gw: GatewayEntry(keys[gw].verify_key, parent, {d: keys[d].verify_key for d in ds})
            for gw, (parent, ds) in layout.items()
        },
    )
    (out / "fleet.json").write_text(fleet.to_json() + "\n")
    print(f"wrote {out / 'fleet.json'} and {len(ids)} key pairs in {out}")
    print("give each machine fleet.json and only its own ID.key")
    return 0


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

    p = sub.add_parser("fleet", help="make a fleet: fleet.json and a key pair per component")
    fleet_sub = p.add_subparsers(dest="fleet_command", required=True)
    p = fleet_sub.add_parser("init", help="write fleet.json and ID.key/ID.pub for every id")
    p.add_argument("--fleet", required=True, help="fleet id")
    p.add_argument(
        "--gateway",
        action="append",
        required=True,
        metavar="ID[@PARENT]=DEV,DEV",
        help="a gateway, its parent gateway (default: the coordinator) and its devices; repeat",
    )
    p.add_argument("--out", default=".", help="directory for fleet.json and the keys")
    p.add_argument("--force", action="store_true", help="replace existing keys")
    p.set_defaults(func=_fleet_init)

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
        return int(args.func(args))
    except TernError as exc:
        print(f"tern: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
