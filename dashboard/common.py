"""What `tern watch` and `tern dashboard` share: the observer's login file and client ids."""

from __future__ import annotations

import secrets
from pathlib import Path

from dashboard.errors import DashboardError
from tern.errors import TernError
from tern.logins import MAX_LOGIN_BYTES, Login

__all__ = ["client_id", "read_login"]


def read_login(path: Path) -> Login:
    """The login in `path` (the fleet's `observer.json`, or any user's login file)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_LOGIN_BYTES + 1)
        return Login.from_json(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DashboardError(f"cannot read the login {path}: {exc}") from exc
    except TernError as exc:
        raise DashboardError(f"{path} is not a login file: {exc}") from exc


def client_id(tool: str, fleet: str) -> str:
    """A fresh client id: several viewers may watch one fleet with the same login, and
    members' ids are reserved (the observer may use any other)."""
    return f"tern-{fleet}-{tool}-{secrets.token_hex(4)}"
