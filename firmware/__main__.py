"""``tern firmware`` (also ``python -m firmware``): provision ESP32 boards, fetch deps."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from firmware.config import (
    DEFAULT_NTP_HOST,
    DEFAULT_RATE_HZ,
    DEFAULT_WINDOW,
    adc_sensor,
    replay_sensor,
)
from firmware.deps import umqtt_dir
from firmware.errors import FirmwareError
from firmware.provision import ProvisionRequest, parse_gateway, provision, run_mpremote
from tern.pki import CA_CERT

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tern firmware", description="ESP32 MicroPython boards.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "provision",
        help="fresh credentials, register with the gateway, copy the firmware with mpremote",
    )
    p.add_argument("--device", required=True, help="the board's id")
    p.add_argument("--fleet", required=True, help="fleet id")
    p.add_argument(
        "--gateway",
        required=True,
        metavar="[mqtts://]HOST[:PORT]",
        help="the gateway's broker as the board reaches it (default port 1884); mqtts://: "
        "TLS (default port 8883), the name or IP must be in the broker's certificate",
    )
    p.add_argument("--port", required=True, help="the board's serial port, e.g. /dev/ttyUSB0")
    p.add_argument(
        "--boards",
        default="boards.json",
        help="the gateway's boards file (tern gateway --boards FILE); default boards.json",
    )
    p.add_argument("--gateway-id", help="the gateway's id; needed when the boards file is new")
    p.add_argument("--replace", action="store_true", help="re-provision a registered board")
    p.add_argument("--wifi-ssid", default="", help="Wi-Fi network the board joins")
    p.add_argument("--wifi-password", default="", help="its password (goes into config.json)")
    p.add_argument("--rate-hz", type=float, default=DEFAULT_RATE_HZ, help="inferences per second")
    p.add_argument("--sensor", choices=("adc", "replay"), default="adc")
    p.add_argument("--adc-pin", type=int, default=34, help="ADC GPIO (adc sensor)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="samples per window (adc)")
    p.add_argument("--adc-shift", type=int, default=4, help="right shift of raw readings (adc)")
    p.add_argument("--adc-offset", type=int, default=2048, help="subtracted first (adc)")
    p.add_argument("--replay-file", type=Path, help="windows file to replay (replay sensor)")
    p.add_argument(
        "--fleet-dir",
        type=Path,
        default=Path("."),
        help="the directory `tern fleet init` wrote (its ca.crt goes to a TLS board)",
    )
    p.add_argument("--ca-file", type=Path, help="the fleet CA (default: FLEET_DIR/ca.crt)")
    p.add_argument(
        "--ntp-host",
        default=DEFAULT_NTP_HOST,
        help=f"where a TLS board sets its clock first (default {DEFAULT_NTP_HOST})",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="touch no board: write --out, print commands"
    )
    p.add_argument("--out", type=Path, help="directory for the bundle (kept; holds secrets)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per mpremote command")
    p.set_defaults(func=_provision)

    p = sub.add_parser(
        "deps", help="fetch umqtt.simple (sha256-pinned) for the firmware under CPython"
    )
    p.add_argument("--cache-dir", type=Path, help="default: $TERN_CACHE_DIR or ~/.cache/tern")
    p.set_defaults(func=_deps)
    return ap


def _deps(args: argparse.Namespace) -> int:
    print(umqtt_dir(args.cache_dir))
    return 0


def _provision(args: argparse.Namespace) -> int:
    host, port, tls = parse_gateway(args.gateway)
    sensor = (
        replay_sensor()
        if args.sensor == "replay"
        else adc_sensor(args.adc_pin, args.window, args.adc_shift, args.adc_offset)
    )
    req = ProvisionRequest(
        device=args.device,
        fleet=args.fleet,
        host=host,
        port=port,
        serial_port=args.port,
        boards_file=Path(args.boards),
        sensor=sensor,
        gateway_id=args.gateway_id,
        rate_hz=args.rate_hz,
        wifi_ssid=args.wifi_ssid,
        wifi_password=args.wifi_password,
        replay_file=args.replay_file,
        replace=args.replace,
        tls=tls,
        ca_file=args.ca_file or args.fleet_dir / CA_CERT,
        ntp_host=args.ntp_host,
    )
    timeout = args.timeout

    def run(commands: Sequence[Sequence[str]]) -> None:
        run_mpremote(commands, timeout)

    provision(req, out=args.out, dry_run=args.dry_run, run=run)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FirmwareError as exc:
        print(f"tern firmware: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
