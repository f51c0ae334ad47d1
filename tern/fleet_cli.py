"""`tern fleet`: make a fleet directory (`init`) and grow it (`add-gateway`, `add-device`,
`add-observer`).

Like `tern.cli`, which registers these commands, a module of tern/ that does file I/O;
nothing but `tern.cli` imports it. Every command checks everything and builds every key,
login and certificate in memory first, then writes every file or none (`write_all`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tern import pki, topics
from tern.errors import TernError, brief
from tern.fleet import COORDINATOR, DEFAULT_MAX_PARAMS, MAX_FLEET_BYTES, Fleet
from tern.keys import signing_key_to_text, verify_key_to_text
from tern.logins import OBSERVER
from tern.members import Members, add_members, add_observer, new_members

__all__ = ["OBSERVER_FILE", "add_fleet_parser", "write_all"]

OBSERVER_FILE = "observer.json"  # the read-only login, in the fleet directory
FLEET_FILE = "fleet.json"
MAX_PEM_BYTES = 64 << 10  # a P-256 certificate or key is under 1 KiB

Files = dict[str, tuple[bytes, int]]  # file name -> (content, mode): secrets 0600
SECRET, PUBLIC = 0o600, 0o644


def _fleet_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    layout = _layout(args.gateway)
    ids = [COORDINATOR, *layout, *(d for _, ds in layout.values() for d in ds)]
    for cid in ids:
        topics.validate_id(cid, "id")
    max_weight = dict(_max_weight(spec) for spec in args.max_weight)
    brokers = [COORDINATOR, *layout]
    hosts = _broker_hosts(args.broker_host, brokers)
    if out.exists() and not out.is_dir():
        raise TernError(f"--out {out} is not a directory")
    members = new_members(  # checks the whole layout: parents, cycles, repeated ids, bounds
        args.fleet, layout, max_params=args.max_params, max_weight=max_weight
    )
    ca = pki.new_ca(args.fleet)
    files = _member_files(members, ids)
    files[OBSERVER_FILE] = ((members.logins[OBSERVER].to_json() + "\n").encode(), SECRET)
    files[pki.CA_CERT] = (ca.cert_pem, PUBLIC)
    files[pki.CA_KEY] = (ca.key_pem, SECRET)
    files |= _certificates(ca, {b: hosts.get(b, []) for b in brokers}, [*ids, OBSERVER], args.mtls)
    secrets = [name for name, (_, mode) in files.items() if mode == SECRET]
    existing = [out / n for n in secrets if (out / n).exists()]
    if existing and not args.force:
        raise TernError(f"{existing[0]} exists; pass --force to replace the fleet's secrets")
    # add-gateway/add-device take an observer certificate for a fleet with mTLS: one left
    # from an earlier fleet would not chain to the new CA
    stale = [out / client_file for client_file in pki.client_files(OBSERVER)]
    if not args.mtls and any(path.exists() for path in stale):
        raise TernError(f"{stale[0]} is left from a fleet with --mtls: pass --mtls or remove it")
    _write(out, files)
    print(f"wrote {out / FLEET_FILE}, {len(ids)} key pairs and logins, {OBSERVER_FILE} in {out}")
    _print_pki(out, brokers, hosts, [*ids, OBSERVER] if args.mtls else [])
    print("give each machine fleet.json, ca.crt and only its own ID.* files;")
    print(f"{OBSERVER_FILE} is the read-only login for dashboards; keep ca.key off the fleet")
    return 0


def _add_gateway(args: argparse.Namespace) -> int:
    out = Path(args.fleet_dir)
    fleet = _read_fleet(out)
    layout = _layout(args.spec)
    hosts = _broker_hosts(args.broker_host, list(layout))
    members = add_members(fleet, gateways=layout)
    new = [*layout, *(d for _, ds in layout.values() for d in ds)]
    return _extend(out, members, new, {gw: hosts.get(gw, []) for gw in layout})


def _add_device(args: argparse.Namespace) -> int:
    out = Path(args.fleet_dir)
    fleet = _read_fleet(out)
    members = add_members(fleet, devices={args.gateway: args.device})
    return _extend(out, members, list(args.device), {})


def _add_observer(args: argparse.Namespace) -> int:
    """One more read-only login, `observer-NAME.json`: one per dashboard or viewer (on
    Mosquitto, two connections with one login would knock each other off)."""
    out = Path(args.fleet_dir)
    fleet, login = add_observer(_read_fleet(out), args.name)
    name = f"{login.username}.json"
    if (out / name).exists():
        raise TernError(f"{out / name} exists: not replacing another viewer's login")
    files: Files = {
        name: ((login.to_json() + "\n").encode(), SECRET),
        FLEET_FILE: ((fleet.to_json() + "\n").encode(), PUBLIC),
    }
    ca = _read_ca(out)
    if ca is not None and (out / pki.client_files(OBSERVER)[0]).exists():  # the fleet uses mTLS
        files |= _certificates(ca, {}, [login.username], mtls=True)
    _write(out, files)
    print(f"updated {out / FLEET_FILE} and wrote {out / name} (0600): {login.username} may read")
    print("every topic of the fleet and publish nothing; give it to one viewer only")
    print("restart the brokers (or regenerate mosquitto-config and send SIGHUP) to admit it")
    return 0


def _extend(out: Path, members: Members, new: list[str], brokers: dict[str, list[str]]) -> int:
    for cid in new:
        topics.validate_id(cid, "id")  # before any file name is made of it
    files = _member_files(members, new)
    mtls = (out / pki.client_files(OBSERVER)[0]).exists()
    ca = _read_ca(out)
    if ca is not None:
        files |= _certificates(ca, brokers, new, mtls)
    in_the_way = [out / n for n in files if n != FLEET_FILE and (out / n).exists()]
    if in_the_way:
        raise TernError(f"{in_the_way[0]} exists: not replacing another member's files")
    _write(out, files)
    print(f"updated {out / FLEET_FILE}: {len(new)} new members ({', '.join(new)})")
    print(f"wrote their ID.key, ID.pub and ID.login in {out}")
    if ca is None:
        print(f"no {pki.CA_CERT} in {out}: no certificate written")
    else:
        _print_pki(out, list(brokers), brokers, new if mtls else [], ca_written=False)
    print("restart the brokers (or regenerate mosquitto-config and send SIGHUP) to admit them")
    return 0


def _member_files(members: Members, ids: Iterable[str]) -> Files:
    files: Files = {}
    for cid in ids:
        key = members.keys[cid]
        files[f"{cid}.key"] = ((signing_key_to_text(key) + "\n").encode(), SECRET)
        files[f"{cid}.pub"] = ((verify_key_to_text(key.verify_key) + "\n").encode(), PUBLIC)
        files[f"{cid}.login"] = ((members.logins[cid].to_json() + "\n").encode(), SECRET)
    files[FLEET_FILE] = ((members.fleet.to_json() + "\n").encode(), PUBLIC)
    return files


def _certificates(
    ca: pki.Issued, brokers: Mapping[str, Sequence[str]], members: Sequence[str], mtls: bool
) -> Files:
    """A server certificate for each broker and, with `mtls`, a client certificate for
    each of `members`."""
    files: Files = {}
    for broker, hosts in brokers.items():
        files |= _pair(pki.server_files(broker), pki.server_cert(ca, broker, hosts))
    for member in members if mtls else []:
        files |= _pair(pki.client_files(member), pki.client_cert(ca, member))
    return files


def _pair(names: tuple[str, str], issued: pki.Issued) -> Files:
    return {names[0]: (issued.cert_pem, PUBLIC), names[1]: (issued.key_pem, SECRET)}


def _print_pki(
    out: Path,
    brokers: Sequence[str],
    hosts: Mapping[str, Sequence[str]],
    clients: Sequence[str],
    *,
    ca_written: bool = True,
) -> None:
    if ca_written:
        print(f"wrote {out / pki.CA_CERT} (the fleet CA) and {pki.CA_KEY} (0600: it signs)")
    for broker in brokers:
        crt, key = pki.server_files(broker)
        names = ", ".join([*hosts.get(broker, []), broker, *pki.DEFAULT_HOSTS])
        print(f"wrote {crt} and {key} (0600) for the {broker} broker: {names}")
    if clients:
        print(f"wrote client certificates (mTLS) ID.client.crt/.key for {len(clients)} logins")


def _broker_hosts(specs: Sequence[str], brokers: Sequence[str]) -> dict[str, list[str]]:
    """`--broker-host BROKER=NAME,NAME,IP` values: extra names for each broker's
    certificate. A broker that is not one of `brokers` is an error, not ignored."""
    hosts: dict[str, list[str]] = {}
    for spec in specs:
        broker, sep, names = spec.partition("=")
        if not sep or not names:
            raise TernError(f"--broker-host takes BROKER=NAME,NAME,IP, not {brief(spec, 80)}")
        if broker not in brokers:
            raise TernError(f"--broker-host {brief(broker, 64)}: not a broker of this fleet")
        hosts.setdefault(broker, []).extend(n for n in names.split(",") if n)
    return hosts


def _layout(specs: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """`ID[@PARENT]=DEV,DEV` values as a layout; a gateway or a device named twice is an
    error, not a silent merge."""
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


def _max_weight(spec: str) -> tuple[str, float]:
    device, sep, weight = spec.partition("=")
    try:
        if not sep:
            raise ValueError
        return device, float(weight)
    except ValueError:
        raise TernError(f"--max-weight takes DEVICE=WEIGHT, not {spec[:80]!r}") from None


def _read_fleet(out: Path) -> Fleet:
    if not out.is_dir():
        raise TernError(f"--fleet-dir {out} is not a directory")
    try:
        return Fleet.from_json(_read_bounded(out / FLEET_FILE, MAX_FLEET_BYTES))
    except TernError as exc:
        raise TernError(f"{out / FLEET_FILE}: {exc.message}") from None


def _read_ca(out: Path) -> pki.Issued | None:
    """The fleet CA of directory `out`, or None for a fleet made without one."""
    if not (out / pki.CA_CERT).exists():
        return None
    if not (out / pki.CA_KEY).exists():
        raise TernError(f"{out / pki.CA_CERT} without {pki.CA_KEY}: cannot sign certificates")
    cert = _read_bounded(out / pki.CA_CERT, MAX_PEM_BYTES)
    return pki.load_ca(cert, _read_bounded(out / pki.CA_KEY, MAX_PEM_BYTES))


def _read_bounded(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise TernError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise TernError(f"{path} is larger than {limit} bytes")
    return data


def _write(out: Path, files: Files) -> None:
    in_the_way = [out / n for n in files if (out / n).is_dir()]
    if in_the_way:
        raise TernError(f"{in_the_way[0]} is a directory, not a file it can replace")
    try:
        write_all(out, files)
    except OSError as exc:
        raise TernError(f"cannot write the fleet to {out}: {exc.strerror or exc}") from None


def write_all(out: Path, files: Mapping[str, tuple[bytes, int]]) -> None:
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


def add_fleet_parser(sub: Any) -> None:
    """Register `tern fleet init|add-gateway|add-device` on `sub` (argparse subparsers)."""
    p = sub.add_parser("fleet", help="make or grow a fleet: fleet.json, keys, logins, PKI")
    fleet_sub = p.add_subparsers(dest="fleet_command", required=True)
    p = fleet_sub.add_parser(
        "init",
        help="write fleet.json, ID.key/ID.pub/ID.login for every id, observer.json, the fleet"
        " CA and a server certificate for every broker",
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
    _broker_host_flag(p)
    p.add_argument(
        "--mtls",
        action="store_true",
        help="also write a client certificate (ID.client.crt/.key) for every member and the "
        "observer, for brokers that require one (--require-client-cert)",
    )
    p.add_argument("--out", default=".", help="directory for fleet.json, keys and logins")
    p.add_argument("--force", action="store_true", help="replace existing keys and logins")
    p.set_defaults(func=_fleet_init)

    p = fleet_sub.add_parser(
        "add-gateway", help="add gateways (and their devices) to an existing fleet directory"
    )
    p.add_argument("--fleet-dir", required=True, help="the directory `tern fleet init` wrote")
    p.add_argument(
        "spec", nargs="+", metavar="ID[@PARENT]=DEV,DEV", help="a new gateway and its devices"
    )
    _broker_host_flag(p)
    p.set_defaults(func=_add_gateway)

    p = fleet_sub.add_parser("add-device", help="add devices to a gateway of an existing fleet")
    p.add_argument("--fleet-dir", required=True, help="the directory `tern fleet init` wrote")
    p.add_argument("--gateway", required=True, help="the gateway the devices connect to")
    p.add_argument("device", nargs="+", help="new device ids")
    p.set_defaults(func=_add_device)

    p = fleet_sub.add_parser(
        "add-observer",
        help="add a read-only login observer-NAME for one more dashboard or viewer",
    )
    p.add_argument("--fleet-dir", required=True, help="the directory `tern fleet init` wrote")
    p.add_argument("name", help="the viewer's name: the login is observer-NAME")
    p.set_defaults(func=_add_observer)


def _broker_host_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker-host",
        action="append",
        default=[],
        metavar="BROKER=NAME,NAME,IP",
        help="names and addresses clients use to reach a broker (coordinator or a gateway), "
        "added to its server certificate beside localhost and its id; repeat",
    )
