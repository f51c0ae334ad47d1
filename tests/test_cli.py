"""The `tern` command line, run in-process through its main()."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from tern import Envelope, Kind, ModelSpec, Partial, TernaryCodec, encode_update, seal
from tern.cli import main
from tern.keys import signing_key_from_text, verify_key_to_text


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
