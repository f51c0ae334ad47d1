"""`tern fleet init` writes the fleet's PKI; `tern fleet add-gateway` and `add-device` grow a
fleet directory with keys, logins and certificates signed by its existing CA."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from broker.fleet_access import broker_policy
from tern.cli import main
from tern.fleet import Fleet
from tern.keys import signing_key_from_text
from tern.logins import OBSERVER, Login, check_password
from tern.pki import CA_CERT, CA_KEY, client_files, server_files

INIT = "fleet init --fleet plant-7 --gateway gw-1=dev-01,dev-02 --gateway gw-1a@gw-1=dev-03"
MEMBERS = ["coordinator", "dev-01", "dev-02", "dev-03", "gw-1", "gw-1a"]


def _init(out: Path, *extra: str) -> int:
    return main([*INIT.split(), "--out", str(out), *extra])


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify_server(out: Path, broker: str, host: str) -> None:
    try:
        subject: x509.DNSName | x509.IPAddress = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    store = Store([_cert(out / CA_CERT)])
    verifier = PolicyBuilder().store(store).build_server_verifier(subject)
    verifier.verify(_cert(out / server_files(broker)[0]), [])


def _verify_client(out: Path, member: str) -> None:
    verifier = PolicyBuilder().store(Store([_cert(out / CA_CERT)])).build_client_verifier()
    verifier.verify(_cert(out / client_files(member)[0]), [])


def _login_is_valid(out: Path, member: str) -> bool:
    fleet = Fleet.from_json((out / "fleet.json").read_text())
    login = Login.from_json((out / f"{member}.login").read_text())
    return login.username == member and check_password(fleet.logins[member], login.password)


def test_fleet_init_writes_a_ca_and_a_server_certificate_for_every_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fleet"

    code = _init(out, "--broker-host", "coordinator=broker.plant.example,10.0.0.5")

    assert code == 0
    assert (_mode(out / CA_CERT), _mode(out / CA_KEY)) == (0o644, 0o600)
    for broker in ["coordinator", "gw-1", "gw-1a"]:
        crt, key = server_files(broker)
        assert (_mode(out / crt), _mode(out / key)) == (0o644, 0o600)
        _verify_server(out, broker, "localhost")
        _verify_server(out, broker, broker)
    _verify_server(out, "coordinator", "broker.plant.example")
    _verify_server(out, "coordinator", "10.0.0.5")
    with pytest.raises(VerificationError):
        _verify_server(out, "gw-1", "broker.plant.example")
    assert not list(out.glob("*.client.*"))
    printed = capsys.readouterr().out
    assert "ca.crt" in printed and "coordinator.server.crt" in printed


def test_fleet_init_with_mtls_writes_a_client_certificate_for_every_login(tmp_path: Path) -> None:
    out = tmp_path / "fleet"

    assert _init(out, "--mtls") == 0

    for member in [*MEMBERS, OBSERVER]:
        crt, key = client_files(member)
        assert (_mode(out / crt), _mode(out / key)) == (0o644, 0o600)
        _verify_client(out, member)
        assert _cert(out / crt).subject.rfc4514_string() == f"CN={member}"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--broker-host", "dev-01=edge.example"], "not a broker of this fleet"),
        (["--broker-host", "gw-9=edge.example"], "not a broker of this fleet"),
        (["--broker-host", "coordinator"], "takes BROKER=NAME"),
        (["--broker-host", "coordinator=bad host"], "not a DNS name or IP address"),
    ],
)
def test_fleet_init_refuses_a_bad_broker_host_and_writes_nothing(
    tmp_path: Path, extra: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fleet"

    assert _init(out, *extra) == 2

    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_fleet_init_keeps_the_existing_ca_without_force(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    assert _init(out) == 0
    before = (out / CA_KEY).read_bytes()

    assert _init(out) == 2
    assert (out / CA_KEY).read_bytes() == before


def test_fleet_init_again_without_mtls_does_not_leave_client_certificates_of_the_old_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fleet"
    assert _init(out, "--mtls") == 0

    assert _init(out, "--force") == 2
    assert "--mtls" in capsys.readouterr().err
    assert _init(out, "--force", "--mtls") == 0
    _verify_client(out, OBSERVER)


def test_add_gateway_grows_the_fleet_with_keys_logins_and_a_server_certificate(
    tmp_path: Path,
) -> None:
    out = tmp_path / "fleet"
    assert _init(out) == 0
    ca_before = (out / CA_CERT).read_bytes()

    code = main(
        [
            *["fleet", "add-gateway", "--fleet-dir"],
            str(out),
            "gw-2@gw-1=dev-20,dev-21",
            "--broker-host",
            "gw-2=edge-2.plant.example",
        ]
    )

    assert code == 0
    fleet = Fleet.from_json((out / "fleet.json").read_text())
    assert fleet.gateways["gw-2"].parent == "gw-1"
    assert sorted(fleet.gateways["gw-2"].devices) == ["dev-20", "dev-21"]
    assert set(MEMBERS) < set(fleet.members)
    for member in ["gw-2", "dev-20", "dev-21"]:
        assert (_mode(out / f"{member}.key"), _mode(out / f"{member}.login")) == (0o600, 0o600)
        key = signing_key_from_text((out / f"{member}.key").read_text())
        assert fleet.key_of(member) == key.verify_key
        assert _login_is_valid(out, member)
    assert _login_is_valid(out, "dev-01")  # the old members keep their logins
    assert (out / CA_CERT).read_bytes() == ca_before
    _verify_server(out, "gw-2", "edge-2.plant.example")
    assert _mode(out / server_files("gw-2")[1]) == 0o600
    assert not (out / client_files("gw-2")[0]).exists()  # the fleet has no mTLS


def test_add_device_in_an_mtls_fleet_also_issues_client_certificates(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    assert _init(out, "--mtls") == 0

    code = main(["fleet", "add-device", "--fleet-dir", str(out), "--gateway", "gw-1a", "dev-30"])

    assert code == 0
    fleet = Fleet.from_json((out / "fleet.json").read_text())
    assert fleet.gateway_of("dev-30") == "gw-1a"
    assert "dev-03" in fleet.gateways["gw-1a"].devices
    assert _login_is_valid(out, "dev-30")
    _verify_client(out, "dev-30")
    assert _mode(out / client_files("dev-30")[1]) == 0o600


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["add-device", "--gateway", "gw-1", "dev-02"], "already in fleet"),
        (["add-device", "--gateway", "gw-1", "gw-1a"], "already in fleet"),
        (["add-device", "--gateway", "gw-1", "observer"], "name observers"),
        (["add-device", "--gateway", "gw-9", "dev-40"], "no gateway"),
        (["add-device", "--gateway", "gw-1", "dev-40", "dev-40"], "given twice"),
        (["add-gateway", "gw-1=dev-40"], "already in fleet"),
        (["add-gateway", "gw-4@gw-9=dev-40"], "unknown parent"),
        (["add-gateway", "gw-4=dev-01"], "already in fleet"),
        (["add-gateway", "gw-4=dev-40", "--broker-host", "gw-1=x.example"], "not a broker"),
    ],
)
def test_adding_an_id_that_exists_or_has_no_place_changes_nothing(
    tmp_path: Path, argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fleet"
    assert _init(out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code = main(["fleet", argv[0], "--fleet-dir", str(out), *argv[1:]])

    assert code == 2
    assert expected in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_adding_to_a_fleet_whose_ca_key_is_missing_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fleet"
    assert _init(out) == 0
    (out / CA_KEY).unlink()
    fleet_before = (out / "fleet.json").read_bytes()

    code = main(["fleet", "add-device", "--fleet-dir", str(out), "--gateway", "gw-1", "dev-40"])

    assert code == 2
    assert "cannot sign" in capsys.readouterr().err
    assert (out / "fleet.json").read_bytes() == fleet_before
    assert not (out / "dev-40.key").exists()


def test_add_observer_writes_one_more_read_only_login_for_one_viewer(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    assert _init(out, "--mtls") == 0

    assert main(["fleet", "add-observer", "--fleet-dir", str(out), "wall"]) == 0

    fleet = Fleet.from_json((out / "fleet.json").read_text())
    login = Login.from_json((out / "observer-wall.json").read_text())
    assert login.username == "observer-wall" and _mode(out / "observer-wall.json") == 0o600
    assert check_password(fleet.logins["observer-wall"], login.password)
    _verify_client(out, "observer-wall")  # the fleet has mTLS: the viewer gets a certificate
    rights = broker_policy(fleet, "coordinator").accounts["observer-wall"].rights
    assert rights == broker_policy(fleet, "coordinator").accounts[OBSERVER].rights
    assert rights.subscribe == (f"tern/{fleet.fleet}/#",) and not rights.publish
    assert "observer-wall" in broker_policy(fleet, "gw-1").accounts


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["add-observer", "wall", "--fleet-dir"], "already has the observer login observer-wall"),
        (["add-device", "--gateway", "gw-1", "observer-2", "--fleet-dir"], "name observers"),
        (["add-observer", "bad/name", "--fleet-dir"], "is not valid"),
    ],
)
def test_an_observer_login_cannot_be_made_twice_or_taken_by_a_member(
    tmp_path: Path, argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fleet"
    assert _init(out) == 0
    assert main(["fleet", "add-observer", "--fleet-dir", str(out), "wall"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code = main(["fleet", *argv, str(out)])

    assert code == 2
    assert expected in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
