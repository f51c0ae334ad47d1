"""MicroPython libraries the firmware needs, fetched for CPython: umqtt.simple, sha256-pinned.

On a board, ``mpremote mip install umqtt.simple`` installs it. Under CPython (the
end-to-end tests, the simulated boards of ``tern demo``) the same file comes from its
PyPI sdist, which pip cannot install (it has no setup.py): the tarball is downloaded
once, checked against the pinned SHA-256, and only ``umqtt/simple.py`` is taken out of
it into a cache directory. The cached file is checked against its own pinned SHA-256
on every use, so a tampered cache is fetched again, never imported.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from broker.lifecycle import write_atomic
from firmware.errors import DepsError, DepsHashMismatch, DepsUnavailable

__all__ = [
    "ENV_CACHE_DIR",
    "UMQTT_MEMBER",
    "UMQTT_SHA256",
    "UMQTT_SIMPLE_SHA256",
    "UMQTT_URL",
    "UMQTT_VERSION",
    "Fetch",
    "default_cache_dir",
    "fetch_url",
    "firmware_dir",
    "shims_dir",
    "sys_path_dirs",
    "umqtt_dir",
]

UMQTT_VERSION = "1.3.4"
UMQTT_URL = (
    "https://files.pythonhosted.org/packages/bd/cf/"
    "697e3418b2f44222b3e848078b1e33ee76aedca9b6c2430ca1b1aec1ce1d/"
    f"micropython-umqtt.simple-{UMQTT_VERSION}.tar.gz"
)
UMQTT_SHA256 = "b6a2520239e3992c63a7de9370ee9b3d9d27819a90359c521f1c0f7ccab8d12f"
UMQTT_MEMBER = f"micropython-umqtt.simple-{UMQTT_VERSION}/umqtt/simple.py"
# The extracted file's own hash: what verifies the cache on every use.
UMQTT_SIMPLE_SHA256 = "8555d2f654deb8eb0d724f79b0811a78cc94029d070f3d96bbd74288653d63a5"
ENV_CACHE_DIR = "TERN_CACHE_DIR"

_MAX_TARBALL = 1 << 20  # the real one is 4 KB; anything near this is not it
_MAX_MEMBER = 256 << 10

Fetch = Callable[[str, float], bytes]
"""fetch(url, timeout_s) -> the bytes at url; raises DepsUnavailable."""


def default_cache_dir() -> Path:
    """``$TERN_CACHE_DIR``, else ``$XDG_CACHE_HOME/tern/micropython`` (``~/.cache/...``)."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "tern" / "micropython"


def firmware_dir() -> Path:
    """The MicroPython firmware's sources: what is copied to a board's root."""
    return Path(__file__).resolve().parent / "esp32"


def shims_dir() -> Path:
    """CPython stand-ins for MicroPython's modules (usocket, ustruct, ...)."""
    return Path(__file__).resolve().parent / "shims"


def fetch_url(url: str, timeout: float) -> bytes:
    """Download `url` (https or file) with a deadline, at most _MAX_TARBALL bytes."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data: bytes = resp.read(_MAX_TARBALL + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DepsUnavailable(url, str(getattr(exc, "reason", exc))) from exc
    if len(data) > _MAX_TARBALL:
        raise DepsUnavailable(url, f"larger than {_MAX_TARBALL} bytes")
    return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _extract_member(tarball: bytes, member: str) -> bytes:
    """The bytes of one regular file of a .tar.gz, read in memory: nothing else is written."""
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
            info = tar.getmember(member)
            if not info.isreg() or info.size > _MAX_MEMBER:
                raise DepsError(f"{member} in the tarball is not a regular file of sane size")
            fh = tar.extractfile(info)
            if fh is None:
                raise DepsError(f"{member} in the tarball cannot be read")
            return fh.read()
    except KeyError as exc:
        raise DepsError(f"the tarball has no {member}") from exc
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, OSError) as exc:
        raise DepsError(f"the tarball is not a readable .tar.gz: {exc}") from exc


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def umqtt_dir(
    cache_dir: Path | str | None = None,
    *,
    fetch: Fetch = fetch_url,
    url: str = UMQTT_URL,
    timeout: float = 30.0,
) -> Path:
    """A directory holding ``umqtt/simple.py`` 1.3.4, verified; put it on sys.path.

    Downloads the pinned sdist into `cache_dir` (default: default_cache_dir()) the first
    time. Raises DepsUnavailable when it must download and cannot, DepsHashMismatch when
    the tarball (or the file in it) is not the pinned one.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"umqtt.simple-{UMQTT_VERSION}"
    simple = target / "umqtt" / "simple.py"
    if simple.is_file() and _sha256(simple.read_bytes()) == UMQTT_SIMPLE_SHA256:
        return target
    tarball = fetch(url, timeout)
    if (got := _sha256(tarball)) != UMQTT_SHA256:
        raise DepsHashMismatch(url, UMQTT_SHA256, got)
    source = _extract_member(tarball, UMQTT_MEMBER)
    if (got := _sha256(source)) != UMQTT_SIMPLE_SHA256:
        raise DepsHashMismatch(UMQTT_MEMBER, UMQTT_SIMPLE_SHA256, got)
    _write(simple, source)
    return target


def sys_path_dirs(cache_dir: Path | str | None = None, *, fetch: Fetch = fetch_url) -> list[Path]:
    """Every directory CPython needs on sys.path to run the firmware unchanged:
    umqtt.simple, the MicroPython shims, and firmware/esp32 itself."""
    return [umqtt_dir(cache_dir, fetch=fetch), shims_dir(), firmware_dir()]
