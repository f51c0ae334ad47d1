"""Where to watch a running demo: its top broker, the observer's login, the dashboard.

The demo writes the fleet's observer login (read-only rights) into its state directory,
serves the web dashboard when asked (`tern demo --dashboard`, with a WebSockets listener
on the top broker), and says where all of it is before the first round, so `tern watch`
or a browser can follow the rounds as they close.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from broker.tls import CA_FILE
from dashboard.server import DashboardServer, page_config
from demo.security import write_file
from tern.logins import Login

__all__ = ["OBSERVER_FILE", "WatchPoints", "announce", "open_watch_points"]

OBSERVER_FILE = "observer.json"


@dataclass(frozen=True, slots=True)
class WatchPoints:
    """Where a running demo can be watched from."""

    fleet: str
    broker_url: str  # the top broker, mqtt://
    login_file: Path  # the observer's login
    ws_url: str | None = None  # the top broker over WebSockets, when it listens on one
    dashboard_url: str | None = None
    brokers: tuple[str, ...] = ()  # every broker of the demo, the top one first (once running)

    def watch_command(self) -> str:
        return (
            f"tern watch --broker {self.broker_url} --fleet {self.fleet} --login {self.login_file}"
        )

    def lines(self) -> list[str]:
        out = [
            f"watch: broker {self.broker_url}, fleet {self.fleet}, "
            f"observer login {self.login_file} (read-only)",
            f"watch: {self.watch_command()}",
        ]
        if self.ws_url is not None:
            out.append(f"watch: broker over WebSockets {self.ws_url}")
            if self.ws_url.startswith("wss://"):
                ca = self.login_file.with_name(CA_FILE)
                out.append(f"watch: (the browser must trust the demo fleet's CA, {ca})")
        if self.dashboard_url is not None:
            out.append(f"watch: dashboard {self.dashboard_url}")
        return out


OnReady = Callable[[WatchPoints], None]


def write_login(directory: Path, login: Login) -> Path:
    """`observer.json` in `directory`, readable by its owner only (it holds a password)."""
    path = directory / OBSERVER_FILE
    write_file(path, (login.to_json() + "\n").encode(), 0o600)
    return path


def open_watch_points(
    stack: ExitStack,
    fleet: str,
    broker_url: str,
    ws_url: str | None,
    login: Login,
    state_dir: Path,
    *,
    dashboard: bool,
) -> WatchPoints:
    """Write the observer's login and, with `dashboard`, serve the dashboard on a free
    loopback port until `stack` closes."""
    login_file = write_login(state_dir, login)
    dashboard_url = None
    if dashboard:
        if ws_url is None:
            raise ValueError("the dashboard needs the broker's WebSockets URL")
        server = DashboardServer(page_config(ws_url, fleet, login), "127.0.0.1", 0)
        dashboard_url = stack.enter_context(server).url
    return WatchPoints(fleet, broker_url, login_file, ws_url, dashboard_url)


def announce(points: WatchPoints, out: TextIO | None = sys.stderr) -> None:
    if out is not None:
        for line in points.lines():
            print(line, file=out, flush=True)
