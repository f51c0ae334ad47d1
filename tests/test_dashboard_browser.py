"""The web dashboard in headless Chromium (Debian's chromium and chromium-driver) against a
running demo: it shows every round the coordinator closed, with its accuracy. Screenshots
go to the test artefacts ($TERN_ARTEFACTS, else .artefacts/ in the repository)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.embedded import EmbeddedBroker
from dashboard.server import STATIC, DashboardServer, page_config
from dashboard.state import ViewerState, filters
from demo.run import DemoResult, run_demo
from demo.watching import WatchPoints
from tern import topics
from tern.fleet import COORDINATOR
from tern.logins import OBSERVER, Login
from tern.reports import (
    Activity,
    FleetView,
    MemberView,
    Reading,
    Role,
    RoundMetrics,
    State,
    Status,
    Telemetry,
    ViewState,
)
from tests.helpers import first_line, unavailable
from tests.mqtt_fixtures import MakeTransport, free_port

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3


def artefacts() -> Path:
    folder = Path(os.environ.get("TERN_ARTEFACTS") or REPO / ".artefacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_binary = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if chromium is None or not Path(driver_binary).is_file():
        unavailable("chromium and chromedriver are absent (apt-get install chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install -e .[dev])")
    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1800",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_binary))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"the dashboard did not show {what} within {timeout} s")
        time.sleep(0.1)


def body(driver: Any, key: str) -> str | None:
    value = driver.execute_script(f"return document.body.dataset.{key} || null")
    return None if value is None else str(value)


def boards_shown(driver: Any) -> int:
    return int(
        driver.execute_script("return document.querySelectorAll('#telemetry tbody tr').length")
    )


def test_the_dashboard_shows_every_round_the_demo_coordinator_closed(browser: Any) -> None:
    opened = threading.Event()
    points: list[WatchPoints] = []
    results: list[DemoResult] = []
    failures: list[BaseException] = []

    def open_page(where: WatchPoints) -> None:  # before the first round
        points.append(where)
        assert where.dashboard_url is not None
        browser.get(where.dashboard_url)
        wait_for(lambda: body(browser, "subscribed") == "yes", 20, "a subscribed connection")
        opened.set()

    def demo() -> None:
        try:
            result = run_demo(
                devices=4,
                gateways=2,
                rounds=ROUNDS,
                boards=1,
                trainer="numpy",
                dashboard=True,
                on_ready=open_page,
                out=None,
            )
            results.append(result)
        except BaseException as exc:
            failures.append(exc)
        finally:
            opened.set()

    runner = threading.Thread(target=demo, name="demo", daemon=True)
    runner.start()
    assert opened.wait(120), "the demo did not start"
    assert not failures, failures
    wait_for(lambda: body(browser, "rounds") == str(ROUNDS), 120, f"{ROUNDS} rounds")
    # A board publishes once its gateway has derived a model for it (if one ran: below).
    with contextlib.suppress(AssertionError):
        wait_for(lambda: boards_shown(browser) > 0, 10, "a board's telemetry")
    time.sleep(0.5)  # the page redraws at most every 200 ms
    browser.save_screenshot(str(artefacts() / "dashboard-demo.png"))
    runner.join(120)
    assert not failures, failures
    (result,) = results

    shown = sorted(
        (int(n), acc)
        for n, acc in browser.execute_script(
            "return [...document.querySelectorAll('#rounds tr.round')]"
            ".map((r) => [r.dataset.round, r.dataset.accuracy])"
        )
    )
    closed = [(r["round"], r["accuracy"]) for r in result.rounds]
    assert [n for n, _ in shown] == [n for n, _ in closed] == list(range(1, ROUNDS + 1))
    for (_, page_acc), (_, acc) in zip(shown, closed, strict=True):
        assert float(page_acc) == pytest.approx(acc, abs=1e-12)
    tree = browser.execute_script("return document.getElementById('tree').textContent")
    assert "gw-1" in tree and "gw-2" in tree
    refused = browser.execute_script("return document.getElementById('refused').textContent")
    assert refused == "refused: -"
    assert len(browser.find_elements("css selector", "#accuracy-plot canvas")) >= 1
    if result.boards_skipped is None:
        assert boards_shown(browser) == 1
    assert points[0].ws_url is not None and points[0].ws_url.startswith("ws://")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    # the page goes offline when the demo stops its broker: nothing else may fail
    assert all("WebSocket" in e["message"] for e in errors), errors


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), b""


@pytest.fixture
def server() -> Iterator[DashboardServer]:
    config = page_config("ws://127.0.0.1:9/mqtt", "plant-7", Login(OBSERVER, "pw-for-the-page"))
    with DashboardServer(config, "127.0.0.1", 0) as running:
        yield running


def test_the_dashboard_serves_its_page_and_config_from_the_package(
    server: DashboardServer,
) -> None:
    status, headers, page = get(server.url)
    _, _, script = get(server.url + "mqtt.min.js")
    _, _, config = get(server.url + "config.json")

    assert status == 200 and b"app.js" in page
    assert script == (STATIC / "mqtt.min.js").read_bytes()
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert json.loads(config) | {"client_id": None} == {
        "broker": "ws://127.0.0.1:9/mqtt",
        "fleet": "plant-7",
        "filters": [t.path for t in filters("plant-7")],
        "client_id": None,
        "username": OBSERVER,
        "password": "pw-for-the-page",
    }


def test_the_dashboard_lists_no_directory_and_serves_nothing_outside_its_files(
    server: DashboardServer,
) -> None:
    for path in ("static/", "%2e%2e/server.py", "../server.py", "..%2fserver.py", "../__init__.py"):
        status, _, body = get(server.url + path)

        assert status == 404, path
        assert b"import" not in body


def test_the_page_loads_only_its_own_files() -> None:
    page = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)

    assert refs and all(
        r == "data:," or (Path(r).name == r and (STATIC / r).is_file()) for r in refs
    )
    script = (STATIC / "app.js").read_text()
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", script)


def test_the_page_shows_hostile_broker_text_as_text_and_counts_what_it_refuses(
    browser: Any, make_transport: MakeTransport
) -> None:
    with EmbeddedBroker(port=0, ws_port=0) as broker:
        fleet = "plant-7"
        pub = make_transport(broker.url, "hostile-publisher")
        xss = '<img src=x onerror="window.pwned=1">'
        hostile = [
            (
                topics.status(fleet, "dev-01"),
                Status("dev-01", "device", State.OFFLINE, "1", xss).to_json(),
            ),
            (topics.metrics(fleet, "gw-1"), b"\xff" * 10),
            (topics.metrics(fleet, COORDINATOR), b"[" * 70_000),
            (topics.status(fleet, "dev-02"), b'{"id": "dev-02", "role": "device"}'),
            (topics.telemetry(fleet, "esp-1"), Telemetry("esp-2", 1, 1, 1, 0.5, 10).to_json()),
        ]
        for topic, payload in hostile:
            pub.publish(topic, payload, retain=True, wait=True)
        config = page_config(broker.ws_url, fleet, None)
        with DashboardServer(config, "127.0.0.1", 0) as server:
            browser.get(server.url)
            wait_for(lambda: body(browser, "subscribed") == "yes", 20, "a subscribed connection")
            pub.publish(
                topics.metrics(fleet, COORDINATOR),
                RoundMetrics(COORDINATOR, 1, 1, 2, 0, accuracy=0.5).to_json(),
                retain=True,
                wait=True,
            )
            wait_for(lambda: body(browser, "rounds") == "1", 20, "the round")
            time.sleep(0.5)
            tree = browser.execute_script("return document.getElementById('tree').textContent")
            refused = browser.execute_script(
                "return document.getElementById('refused').textContent"
            )
            pwned = browser.execute_script("return window.pwned === 1")
            browser.save_screenshot(str(artefacts() / "dashboard-hostile.png"))

    assert xss in tree
    assert not pwned
    assert refused == "refused: malformed 2, mismatch 1, oversize 1"


Case = tuple[str, str, bytes]  # kind, sender, payload
SPOILERS: tuple[object, ...] = ("x" * 300, -1, 1.5, True, None, [], {"a": "b"}, 2**60)


def payload_corpus() -> tuple[list[Case], list[Case]]:
    """Valid payloads of every kind, and many ways to spoil each."""
    metrics = RoundMetrics(COORDINATOR, 3, 3, 4, 1, {"late": 1}, 10, 20, 0.5, 0.7, 1.5)
    status = Status("dev-01", "device", State.ONLINE, "0.1.0", "ok", Activity.TRAINING, 3, "")
    telemetry = Telemetry("esp-1", 2, 9, 4, 0.75, 812)
    members = {
        "dev-01": MemberView(Role.DEVICE, ViewState.ONLINE, Activity.IDLE, 3, "kernel_fuel"),
        "esp-1": MemberView(Role.BOARD, telemetry=Reading(4, 0.75, 812, 2, 9)),
    }
    view = FleetView("gw-1", COORDINATOR, 1_796_000_000.5, 3, members)
    good = {
        "metrics": (COORDINATOR, json.loads(metrics.to_json())),
        "status": ("dev-01", json.loads(status.to_json())),
        "telemetry": ("esp-1", json.loads(telemetry.to_json())),
        "view": ("gw-1", json.loads(view.to_json())),
    }
    valid = [(kind, sender, json.dumps(doc).encode()) for kind, (sender, doc) in good.items()]
    cases: list[Case] = []
    for kind, (sender, doc) in good.items():
        cases.append((kind, "someone-else", json.dumps(doc).encode()))
        cases += [(kind, sender, raw) for raw in (b"", b"\xff", b"[]", b"null", b"{" * 3000)]
        for key in doc:
            spoiled = {k: v for k, v in doc.items() if k != key}
            cases.append((kind, sender, json.dumps(spoiled).encode()))
            for bad in SPOILERS:
                cases.append((kind, sender, json.dumps(doc | {key: bad}).encode()))
        cases.append((kind, sender, json.dumps(doc | {"extra": 1}).encode()))
    member = good["view"][1]["members"]["dev-01"]
    for key, bad in (("role", "robot"), ("state", "asleep"), ("last_round", -1), ("x", 1)):
        doc = good["view"][1] | {"members": {"dev-01": member | {key: bad}}}
        cases.append(("view", "gw-1", json.dumps(doc).encode()))
    return valid, cases


def test_the_page_accepts_exactly_the_payloads_tern_reports_accepts(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (apt-get install nodejs)")
    valid, spoiled = payload_corpus()
    cases = valid + [c for c in spoiled if c[2]]  # an empty payload clears: not a parse
    runner = tmp_path / "checks-runner.js"
    runner.write_text(
        "globalThis.window = globalThis;\n"
        f"require({json.dumps(str(STATIC / 'checks.js'))});\n"
        "const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
        "const out = cases.map(([kind, sender, b64]) => {\n"
        "  const payload = Buffer.from(b64, 'base64');\n"
        "  try { window.ternChecks.parse(kind, sender, payload); return true; }\n"
        "  catch (e) { if (!(e instanceof window.ternChecks.Refused)) throw e; return false; }\n"
        "});\n"
        "console.log(JSON.stringify(out));\n"
    )
    stdin = json.dumps([[k, s, base64.b64encode(p).decode()] for k, s, p in cases])

    done = subprocess.run(
        [node, str(runner)], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    page = json.loads(done.stdout)
    python = [ViewerState("plant-7").feed(f"tern/plant-7/{k}/{s}", p) is None for k, s, p in cases]
    # The page and tern.reports take the same payloads: text fields text, integers exact in
    # JavaScript (at most 2**53), the same ranges; the documented payloads pass both.
    looser = [c for c, a, b in zip(cases, page, python, strict=True) if a and not b]
    stricter = [c for c, a, b in zip(cases, page, python, strict=True) if b and not a]
    assert not looser
    assert not stricter
    assert all(page[: len(valid)]) and all(python[: len(valid)])
    assert sum(page) < len(cases) // 2


def test_tern_dashboard_serves_until_stopped_and_refuses_a_url_that_is_not_websockets(
    tmp_path: Path,
) -> None:
    port = free_port()
    login = tmp_path / "observer.json"
    login.write_text(Login(OBSERVER, "pw").to_json())
    command = [sys.executable, "-m", "tern", "dashboard", "--fleet", "plant-7"]
    proc = subprocess.Popen(
        [*command, "--broker", "ws://127.0.0.1:9/mqtt", "--login", str(login), "--port", str(port)],
        stdout=subprocess.PIPE,
    )
    try:
        line = first_line(proc, 30).decode()
        _, _, config = get(f"http://127.0.0.1:{port}/config.json")
    finally:
        proc.terminate()
        proc.wait(10)

    assert f"http://127.0.0.1:{port}/" in line
    assert json.loads(config)["username"] == OBSERVER
    assert proc.returncode == 0
    bad = subprocess.run(
        [*command, "--broker", "mqtt://127.0.0.1:1883"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 1 and "not a WebSockets broker URL" in bad.stderr
