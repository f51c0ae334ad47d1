"""The `tern` command line, run in-process through its main()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from broker.errors import ConnectRefused
from broker.lifecycle import load_login
from broker.mosquitto import MosquittoProcess, find_mosquitto
from gateway.boards import BoardEntry, Boards
from tern import Envelope, Kind, ModelSpec, Partial, TernaryCodec, encode_update, seal, topics
from tern.cli import main
from tern.fleet import Fleet
from tern.keys import signing_key_from_text, verify_key_to_text
from tern.logins import OBSERVER, Login, check_password
from tests.helpers import unavailable
from tests.mqtt_fixtures import Inbox, MakeTransport


def _sealed_update(key: SigningKey) -> bytes:
    spec = ModelSpec.of({"w": (3, 2)})
    delta = np.arange(6, dtype=np.float32) - 2.5
    update, _ = encode_update(TernaryCodec(), spec, Partial(delta, 1.0, 1))
    return seal(Envelope(Kind.UPDATE, "plant-7", 4, 3, "dev-1", update.to_body()), key)


def test_keygen_writes_a_secret_key_readable_only_by_owner(tmp_path: Path) -> None:
    assert main(["keygen", "dev-1", "--out", str(tmp_path)]) == 0

    private = tmp_path / "dev-1.key"
    key = signing_key_from_text(private.read_text())
    assert (private.stat().st_mode & 0o777) == 0o600
    assert (tmp_path / "dev-1.pub").read_text().strip() == verify_key_to_text(key.verify_key)


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    main(["keygen", "gw-1", "--out", str(tmp_path)])
    first = (tmp_path / "gw-1.key").read_text()

    assert main(["keygen", "gw-1", "--out", str(tmp_path)]) == 1
    assert (tmp_path / "gw-1.key").read_text() == first
    assert main(["keygen", "gw-1", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "gw-1.key").read_text() != first


def test_keygen_rejects_an_id_that_cannot_be_a_topic_level(tmp_path: Path) -> None:
    assert main(["keygen", "a/b", "--out", str(tmp_path)]) == 2


def test_inspect_prints_diagnostic_notation_and_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = SigningKey(bytes(range(32)))
    msg = tmp_path / "u.cbor"
    msg.write_bytes(_sealed_update(key))

    rc = main(["inspect", str(msg), "--pubkey", verify_key_to_text(key.verify_key)])

    out = capsys.readouterr().out
    assert rc == 0
    assert '"kind": "update"' in out and "64(h'" in out
    assert "signature: valid" in out


def test_inspect_reports_a_wrong_key_as_bad_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = tmp_path / "u.cbor"
    msg.write_bytes(_sealed_update(SigningKey(bytes(range(32)))))
    other = verify_key_to_text(SigningKey(bytes(32)).verify_key)

    assert main(["inspect", str(msg), "--pubkey", other]) == 1
    assert "bad_signature" in capsys.readouterr().err


def test_inspect_reports_garbage_as_malformed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = tmp_path / "g.cbor"
    msg.write_bytes(b"\xff\x00garbage")

    assert main(["inspect", str(msg)]) == 1
    assert "malformed" in capsys.readouterr().err


def test_topics_prints_every_topic_of_the_fleet(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topics", "--fleet", "f1", "--gateway", "g", "--device", "d"]) == 0

    out = capsys.readouterr().out
    for path in (
        "tern/f1/model",
        "tern/f1/schedule",
        "tern/f1/update/g/d",
        "tern/f1/partial/coordinator/g",
    ):
        assert path in out


# -- tern fleet init: keys, logins, observer.json ----------------------------------------


INIT = "fleet init --fleet plant-7 --gateway gw-1=dev-01,dev-02 --gateway gw-1a@gw-1=dev-03"


def _init(tmp_path: Path, *extra: str) -> int:
    return main([*INIT.split(), "--out", str(tmp_path), *extra])


def test_fleet_init_writes_a_login_beside_every_key_and_the_observer_s(tmp_path: Path) -> None:
    assert _init(tmp_path) == 0

    fleet = Fleet.from_json((tmp_path / "fleet.json").read_text())
    members = ["coordinator", "dev-01", "dev-02", "dev-03", "gw-1", "gw-1a"]
    assert fleet.members == members
    assert sorted(fleet.logins) == sorted([*members, OBSERVER])
    for member in members:
        key, login = tmp_path / f"{member}.key", tmp_path / f"{member}.login"
        assert (key.stat().st_mode & 0o777, login.stat().st_mode & 0o777) == (0o600, 0o600)
        loaded = load_login(key)
        assert loaded is not None and loaded.username == member
        assert check_password(fleet.logins[member], loaded.password)
    observer = tmp_path / "observer.json"
    assert observer.stat().st_mode & 0o777 == 0o600
    doc = json.loads(observer.read_text())
    assert set(doc) == {"username", "password"} and doc["username"] == OBSERVER
    assert check_password(fleet.logins[OBSERVER], doc["password"])
    assert doc["password"] not in (tmp_path / "fleet.json").read_text()


def test_fleet_init_takes_the_model_size_and_weight_bounds(tmp_path: Path) -> None:
    assert (
        _init(
            tmp_path,
            "--max-params",
            "50000",
            "--max-weight",
            "dev-01=250",
            "--max-weight",
            "dev-03=1e3",
        )
        == 0
    )

    fleet = Fleet.from_json((tmp_path / "fleet.json").read_text())
    assert fleet.max_params == 50000
    assert dict(fleet.max_weight) == {"dev-01": 250.0, "dev-03": 1000.0}


@pytest.mark.parametrize(
    "extra",
    [
        ["--max-params", "0"],
        ["--max-weight", "dev-09=5"],
        ["--max-weight", "dev-01=0.5"],
        ["--max-weight", "dev-01=nan"],
        ["--max-weight", "dev-01"],
        ["--gateway", "observer=dev-05"],
    ],
)
def test_fleet_init_refuses_bad_bounds_and_writes_nothing(
    tmp_path: Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _init(tmp_path, *extra) == 2

    assert "tern:" in capsys.readouterr().err
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_fleet_init_keeps_existing_secrets_without_force(tmp_path: Path) -> None:
    assert _init(tmp_path) == 0
    before = (tmp_path / "gw-1.login").read_text()

    assert _init(tmp_path) == 2
    assert (tmp_path / "gw-1.login").read_text() == before
    assert _init(tmp_path, "--force") == 0
    assert (tmp_path / "gw-1.login").read_text() != before
    assert (tmp_path / "gw-1.login").stat().st_mode & 0o777 == 0o600


# -- tern mosquitto-config ---------------------------------------------------------------


def test_mosquitto_config_writes_files_that_mosquitto_runs_with(
    tmp_path: Path, make_transport: MakeTransport
) -> None:
    binary = find_mosquitto()
    if binary is None:
        unavailable("mosquitto is not installed (apt-get install mosquitto)")
    assert _init(tmp_path / "fleet") == 0
    observer = Login.from_json((tmp_path / "fleet" / "observer.json").read_text())
    gateway = load_login(tmp_path / "fleet" / "gw-1.key")
    assert gateway is not None

    def configure(workdir: Path, host: str, port: int) -> Path:
        out = workdir / "mosquitto"
        fleet_file = tmp_path / "fleet" / "fleet.json"
        args = f"mosquitto-config --fleet-file {fleet_file} --broker gw-1 --host {host}"
        args += f" --port {port} --out {out}"
        assert main(args.split()) == 0
        return out / "mosquitto.conf"

    with MosquittoProcess(binary, tmp_path / "run", configure=configure) as broker:
        seen = Inbox()
        make_transport(broker.url, "dash", login=(observer.username, observer.password)).subscribe(
            topics.global_model("plant-7"), seen
        )
        me = make_transport(
            broker.url, "tern-plant-7-gw-1-down", login=(gateway.username, gateway.password)
        )
        me.publish(topics.global_model("plant-7"), b"model", retain=True, wait=True)
        seen.wait_for(lambda m: m.payload == b"model", 10.0)
        with pytest.raises(ConnectRefused):
            make_transport(broker.url, "anonymous", backoff_max=0.05)

    out = tmp_path / "run" / "mosquitto"
    assert (out / "password_file").stat().st_mode & 0o777 == 0o600
    conf = (out / "mosquitto.conf").read_text()
    for setting in [
        "allow_anonymous false",
        "use_username_as_clientid true",
        "max_queued_messages 10000",
        "set_tcp_nodelay true",
        "max_packet_size ",
        "max_inflight_messages ",
        "max_connections ",
        "persistence true",
    ]:
        assert setting in conf


def test_mosquitto_config_reports_a_fleet_without_logins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = Fleet.from_json(
        json.dumps({k: v for k, v in json.loads(_fleet_json(tmp_path)).items() if k != "logins"})
    )
    (tmp_path / "old.json").write_text(fleet.to_json())

    rc = main(
        [
            "mosquitto-config",
            "--fleet-file",
            str(tmp_path / "old.json"),
            "--out",
            str(tmp_path / "out"),
        ]
    )

    assert rc == 2
    assert "no login for" in capsys.readouterr().err


def test_mosquitto_config_takes_a_gateway_s_boards(tmp_path: Path) -> None:
    _fleet_json(tmp_path)
    boards = Boards("plant-7", "gw-1", {"esp-1": BoardEntry(bytes(32), "esp-1", "pw")})
    (tmp_path / "boards.json").write_text(boards.to_json())

    rc = main(
        [
            "mosquitto-config",
            "--fleet-file",
            str(tmp_path / "fleet.json"),
            "--broker",
            "gw-1",
            "--boards",
            str(tmp_path / "boards.json"),
            "--out",
            str(tmp_path / "o"),
        ]
    )

    assert rc == 0
    assert "user esp-1\n" in (tmp_path / "o" / "acl_file").read_text()
    assert "listener 1884 0.0.0.0" in (tmp_path / "o" / "mosquitto.conf").read_text()


def _fleet_json(tmp_path: Path) -> str:
    assert _init(tmp_path) == 0
    return (tmp_path / "fleet.json").read_text()
