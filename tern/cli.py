"""The `tern` command line. The one module of tern/ that does I/O; nothing imports it.

Component commands (broker, coordinator, gateway, device, demo) register here as
their packages land; each stays a thin wrapper around its package's `main`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from nacl.signing import SigningKey

from tern import __version__, topics
from tern.diag import diag
from tern.envelope import DEFAULT_MAX_BYTES, Kind, loads_bounded, open_envelope
from tern.errors import TernError
from tern.keys import signing_key_to_text, verify_key_from_text, verify_key_to_text

__all__ = ["main"]


def _keygen(args: argparse.Namespace) -> int:
    topics.validate_id(args.id, "id")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / f"{args.id}.key", out / f"{args.id}.pub"
    if private.exists() and not args.force:
        print(f"tern: {private} exists; pass --force to replace it", file=sys.stderr)
        return 1
    key = SigningKey.generate()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(signing_key_to_text(key) + "\n")
    public.write_text(verify_key_to_text(key.verify_key) + "\n")
    print(f"wrote {private} (keep secret) and {public}")
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


def _topics(args: argparse.Namespace) -> int:
    f, gw, dev, parent = args.fleet, args.gateway, args.device, args.parent
    rows = [
        ("global model (retained)", topics.global_model(f)),
        ("round schedule (retained)", topics.round_schedule(f)),
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

    p = sub.add_parser("keygen", help="make an Ed25519 key pair: ID.key (secret) and ID.pub")
    p.add_argument("id", help="component id (coordinator, gateway or device)")
    p.add_argument("--out", default=".", help="directory for the key files (default: .)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=_keygen)

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
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TernError as exc:
        print(f"tern: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
