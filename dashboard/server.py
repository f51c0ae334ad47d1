"""`tern dashboard`: serve the fleet's live web dashboard from this machine.

A small HTTP server (the standard library's, on a thread) serves the page and its
scripts from the package (`dashboard/static`, nothing from a CDN) and `/config.json`:
the broker's MQTT-over-WebSockets URL, the fleet, the topic filters to subscribe to and
the login the page connects with. The page then talks to the broker directly. Give it the
fleet's observer login (`observer.json`): its rights are read-only on every broker, so
the page, and anyone who can load it, can watch the fleet and change nothing. It listens
on 127.0.0.1 by default; with `--host 0.0.0.0` everyone who reaches the port gets that
read-only login.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from broker.lifecycle import stop_on_signals
from broker.logs import add_log_arguments, setup_logging
from dashboard.common import client_id, read_login
from dashboard.errors import DashboardError
from dashboard.state import filters
from tern.errors import TernError
from tern.logins import Login
from tern.topics import validate_id

__all__ = ["STATIC", "DashboardServer", "build_parser", "main", "page_config"]

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("dashboard.server")


def check_ws_url(url: str) -> str:
    """`ws://host:port/path` or `wss://...`: where the browser reaches the broker."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("ws", "wss") and bool(parts.hostname) and parts.port is not None
    except ValueError:
        ok = False
    if not ok:
        raise DashboardError(f"{url[:200]!r} is not a WebSockets broker URL (ws://host:port/mqtt)")
    return url


def page_config(broker_ws: str, fleet: str, login: Login | None) -> dict[str, Any]:
    """What the page reads from /config.json."""
    return {
        "broker": check_ws_url(broker_ws),
        "fleet": validate_id(fleet, "fleet"),
        "filters": [t.path for t in filters(fleet)],
        "client_id": client_id("dashboard", fleet),  # the page adds its own suffix
        "username": None if login is None else login.username,
        "password": None if login is None else login.password,
    }


class _Handler(SimpleHTTPRequestHandler):
    """Static files of the package and /config.json; no directory listings, no uploads."""

    def __init__(self, *args: Any, config: bytes, **kwargs: Any) -> None:
        self.config = config
        super().__init__(*args, directory=str(STATIC), **kwargs)

    def end_headers(self) -> None:
        # Scripts and styles only from this server; the broker reached over WebSockets.
        self.send_header(
            "Content-Security-Policy",
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
            "worker-src 'self' blob:; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        )
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def send_head(self) -> BinaryIO | None:
        path = urlsplit(self.path).path
        if path == "/config.json":
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.config)))
            self.end_headers()
            return BytesIO(self.config)
        return super().send_head()

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(HTTPStatus.NOT_FOUND)
        return None

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class DashboardServer:
    """The HTTP server on a thread; `url` is where a browser opens the page."""

    def __init__(self, config: dict[str, Any], host: str = "127.0.0.1", port: int = 0) -> None:
        body = json.dumps(config, sort_keys=True).encode()
        try:
            self._httpd = ThreadingHTTPServer((host, port), partial(_Handler, config=body))
        except OSError as exc:
            raise DashboardError(f"cannot listen on {host}:{port}: {exc}") from exc
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="tern-dashboard-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        host = str(host)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> DashboardServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(5.0)
        self._httpd.server_close()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tern dashboard", description=__doc__)
    p.add_argument(
        "--broker", required=True, help="the top broker's WebSockets URL, ws://host:port/mqtt"
    )
    p.add_argument("--fleet", required=True, help="fleet id")
    p.add_argument(
        "--login", type=Path, help="login file for the page: the fleet's observer.json (read-only)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    add_log_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("dashboard", args.quiet, args.log_json)
    try:
        login = read_login(args.login) if args.login is not None else None
        config = page_config(args.broker, args.fleet, login)
        server = DashboardServer(config, args.host, args.port)
    except (DashboardError, TernError) as exc:
        print(f"tern dashboard: {exc}", file=sys.stderr)
        return 1
    with server, stop_on_signals(log) as stop:
        print(f"tern dashboard: {server.url} (broker {args.broker})", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
