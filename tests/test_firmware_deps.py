"""umqtt.simple for CPython: fetched once, sha256-pinned, only its one file taken out."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from firmware import deps
from firmware.deps import UMQTT_MEMBER, fetch_url, sys_path_dirs, umqtt_dir
from firmware.errors import DepsHashMismatch, DepsUnavailable
from tests.helpers import unavailable

FAKE_SIMPLE = b"class MQTTClient:\n    pass\n"


def _tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serve(tarball: bytes, calls: list[str]) -> deps.Fetch:
    def fetch(url: str, timeout: float) -> bytes:
        calls.append(url)
        return tarball

    return fetch


def test_a_tampered_tarball_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    tampered = _tarball({UMQTT_MEMBER: FAKE_SIMPLE})
    served = tmp_path / "umqtt.tar.gz"
    served.write_bytes(tampered)
    cache = tmp_path / "cache"

    with pytest.raises(DepsHashMismatch) as info:
        umqtt_dir(cache, url=served.as_uri())  # the real fetch_url, over file://

    assert info.value.actual == _sha(tampered)
    assert info.value.expected == deps.UMQTT_SHA256
    assert not cache.exists() or not any(cache.rglob("*.py"))


def test_only_umqtt_simple_is_extracted_even_beside_a_path_traversal_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = _tarball({"../../evil.py": b"boom", UMQTT_MEMBER: FAKE_SIMPLE, "/abs.py": b"x"})
    monkeypatch.setattr(deps, "UMQTT_SHA256", _sha(tarball))
    monkeypatch.setattr(deps, "UMQTT_SIMPLE_SHA256", _sha(FAKE_SIMPLE))
    cache = tmp_path / "a" / "cache"

    target = umqtt_dir(cache, fetch=_serve(tarball, []))

    assert (target / "umqtt" / "simple.py").read_bytes() == FAKE_SIMPLE
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [str((target / "umqtt" / "simple.py").relative_to(tmp_path))]


def test_a_verified_cache_is_used_without_fetching_and_a_tampered_one_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = _tarball({UMQTT_MEMBER: FAKE_SIMPLE})
    monkeypatch.setattr(deps, "UMQTT_SHA256", _sha(tarball))
    monkeypatch.setattr(deps, "UMQTT_SIMPLE_SHA256", _sha(FAKE_SIMPLE))
    calls: list[str] = []
    target = umqtt_dir(tmp_path, fetch=_serve(tarball, calls))

    umqtt_dir(tmp_path, fetch=_serve(tarball, calls))
    assert len(calls) == 1
    (target / "umqtt" / "simple.py").write_bytes(b"import os  # tampered\n")
    umqtt_dir(tmp_path, fetch=_serve(tarball, calls))

    assert len(calls) == 2
    assert (target / "umqtt" / "simple.py").read_bytes() == FAKE_SIMPLE


def test_a_tarball_whose_file_differs_from_the_pin_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = _tarball({UMQTT_MEMBER: FAKE_SIMPLE})
    monkeypatch.setattr(deps, "UMQTT_SHA256", _sha(tarball))

    with pytest.raises(DepsHashMismatch) as info:
        umqtt_dir(tmp_path, fetch=_serve(tarball, []))

    assert info.value.what == UMQTT_MEMBER


def test_offline_is_a_clear_error_naming_the_url(tmp_path: Path) -> None:
    missing = (tmp_path / "nowhere.tar.gz").as_uri()

    with pytest.raises(DepsUnavailable) as info:
        fetch_url(missing, timeout=5)

    assert info.value.url == missing
    assert "cannot download" in str(info.value)


def test_the_cache_dir_follows_tern_cache_dir_then_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TERN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert deps.default_cache_dir() == tmp_path / "xdg" / "tern" / "micropython"

    monkeypatch.setenv("TERN_CACHE_DIR", str(tmp_path / "mine"))
    assert deps.default_cache_dir() == tmp_path / "mine"


def test_the_real_umqtt_simple_comes_from_pypi_with_the_pinned_hash(tmp_path: Path) -> None:
    try:
        dirs = sys_path_dirs(tmp_path)
    except DepsUnavailable as exc:
        unavailable(f"PyPI is unreachable: {exc}")

    simple = dirs[0] / "umqtt" / "simple.py"
    assert _sha(simple.read_bytes()) == deps.UMQTT_SIMPLE_SHA256
    assert "class MQTTClient" in simple.read_text()
    compile(simple.read_text(), str(simple), "exec")
    assert dirs[1:] == [deps.shims_dir(), deps.firmware_dir()]
