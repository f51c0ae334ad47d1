# The board's application: MQTT to its gateway, the model it is sent, telemetry out.
#
# Runs on MicroPython with umqtt.simple and under CPython (tests, simulated boards) with
# an injected MQTT factory, clock and no radio. Topics come from config.json, written at
# provisioning from tern.topics: the firmware never builds one. Payloads are exactly the
# JSON of tern.reports.Status / Telemetry (compact, keys sorted). With config["tls"] the
# board sets its clock by NTP, then connects with TLS on the fleet CA (tern_tls).
import binascii
import json
import os
import random

import tern_model
import tern_tls

VERSION = "0.1.0"
ROLE = "board"
BACKOFF_MIN_MS = 500
BACKOFF_MAX_MS = 30000
POLL_MS = 50  # longest idle sleep between MQTT polls
MODEL_FILE = "model.bin"

# umqtt.simple reports a broken stream as OSError, MQTTException, a failed assert (bad
# CONNACK/SUBACK) or IndexError (reading from a closed socket): all mean reconnect.
_STREAM_ERRORS = (OSError, AssertionError, IndexError)


def _net_errors():
    # Looked up per Board, not at import, so a umqtt put on the path later still counts.
    try:
        from umqtt.simple import MQTTException
    except ImportError:
        return _STREAM_ERRORS
    return _STREAM_ERRORS + (MQTTException,)  # noqa: RUF005 - MicroPython has no (*a, b)


def status_json(device, state, version=VERSION, detail=""):
    """tern.reports.Status(device, "board", state, version, detail).to_json()."""
    d, i, s, v = json.dumps(detail), json.dumps(device), json.dumps(state), json.dumps(version)
    return f'{{"detail":{d},"id":{i},"role":"board","state":{s},"version":{v}}}'.encode()


def telemetry_json(device, model_version, seq, label, confidence, latency_us):
    """tern.reports.Telemetry(...).to_json()."""
    c, d = json.dumps(confidence), json.dumps(device)
    return (
        f'{{"confidence":{c},"device":{d},"label":{int(label)},"latency_us":{int(latency_us)},'
        f'"model_version":{int(model_version)},"seq":{int(seq)}}}'
    ).encode()


class _Clock:
    """MicroPython's time module as the Board's clock."""

    def __init__(self):
        import time

        self.ticks_ms = time.ticks_ms
        self.ticks_us = time.ticks_us
        self.ticks_diff = time.ticks_diff
        self.sleep_ms = time.sleep_ms


def _umqtt_factory(client_id, server, port, user, password, keepalive, ssl=None):
    # umqtt.simple >= 1.4 (what mip installs) takes an SSLContext and wraps its socket
    # with server_hostname=server, so the broker's name is checked as well as its CA.
    from umqtt.simple import MQTTClient

    if ssl is None:
        return MQTTClient(client_id, server, port, user, password, keepalive)
    return MQTTClient(client_id, server, port, user, password, keepalive, ssl=ssl)


class WifiRadio:
    """Station-mode Wi-Fi from config["wifi"]; connect() raises OSError on timeout."""

    def __init__(self, timeout_ms=15000):
        self.timeout_ms = timeout_ms

    def connect(self, config):
        import time

        import network  # on the board only

        wlan = network.WLAN(network.STA_IF)
        wlan.active(True)
        if wlan.isconnected():
            return
        wifi = config["wifi"]
        wlan.connect(wifi["ssid"], wifi["password"])
        start = time.ticks_ms()
        while not wlan.isconnected():
            if time.ticks_diff(time.ticks_ms(), start) > self.timeout_ms:
                raise OSError("wifi: no connection to " + wifi["ssid"])
            time.sleep_ms(100)


def _close_socket(client):
    sock = getattr(client, "sock", None)
    if sock is None:
        return
    try:
        sock.close()
    except Exception:
        return


class Board:
    def __init__(
        self,
        config,
        sensor,
        mqtt_factory=None,
        clock=None,
        radio=None,
        store_dir="",
        getrandbits=None,
        ssl=None,
        ntp=None,
        log=None,
    ):
        self.fleet = config["fleet"]
        self.device = config["device"]
        self.key = binascii.unhexlify(config["key"])
        if len(self.key) != tern_model.KEY_BYTES:
            raise ValueError("config key must be 64 hex digits")
        topics = config["topics"]
        self.model_topic = topics["model"].encode()
        self.telemetry_topic = topics["telemetry"].encode()
        self.status_topic = topics["status"].encode()
        self.broker = config["broker"]
        rate = float(config.get("rate_hz", 1))
        if rate <= 0:
            raise ValueError("rate_hz must be positive")
        self.period_ms = max(1, int(1000 / rate))
        self.version = config.get("version", VERSION)
        self.max_model_bytes = config.get("max_model_bytes", tern_model.MAX_MODEL_BYTES)
        self.config = config
        self.sensor = sensor
        self.mqtt_factory = mqtt_factory or _umqtt_factory
        self.clock = clock or _Clock()
        self.radio = radio
        self.store_dir = store_dir
        self.getrandbits = getrandbits or random.getrandbits
        # None: plain MQTT. `ssl`, `ntp`: the modules (imported on the board when None).
        self.tls = tern_tls.make(config, self.clock, ssl, ntp, self._path)
        self.log = log or print
        self.last_error = ""
        self.net_errors = _net_errors()
        self.model = None
        self.client = None
        self.detail = ""
        self.seq = 0
        self.stats = {"accepted": 0, "rejected": {}, "ignored": 0, "telemetry": 0,
                      "reconnects": 0, "sensor_errors": 0, "connect_failures": 0}  # fmt: skip
        self.backoff_ms = BACKOFF_MIN_MS
        self._status_due = False
        self._last_infer = None
        self._last_ping = 0
        self._load_stored()

    # -- the model ---------------------------------------------------------------------

    def _path(self, name):
        return self.store_dir + "/" + name if self.store_dir else name

    def _load_stored(self):
        path = self._path(MODEL_FILE)
        try:
            size = os.stat(path)[6]
        except OSError:
            return  # nothing stored yet
        data = bytearray(size)
        with open(path, "rb") as f:
            f.readinto(data)
        try:
            self.model = tern_model.load(data, self.key, self.fleet, self.device, -1,
                                         self.max_model_bytes)  # fmt: skip
        except tern_model.ModelError as exc:  # a key change, a damaged flash
            self._refused(exc.reason, "stored model refused: ")

    def _store(self, data):
        tmp = self._path(MODEL_FILE + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, self._path(MODEL_FILE))  # atomic: a reset never leaves half a model

    def _refused(self, reason, prefix="model refused: "):
        rejected = self.stats["rejected"]
        rejected[reason] = rejected.get(reason, 0) + 1
        self._set_detail(prefix + reason)

    def _set_detail(self, detail):
        # The retained status is republished only when what it says changes.
        if detail != self.detail:
            self.detail = detail
            self._status_due = True

    def on_message(self, topic, msg):
        """umqtt callback. Nothing a message holds can raise out of here."""
        if bytes(topic) != self.model_topic:
            return
        # The model in use is the high-water mark; after a reboot that is the stored one.
        current = self.model.mark if self.model is not None else -1
        try:
            model = tern_model.load(msg, self.key, self.fleet, self.device, current,
                                    self.max_model_bytes)  # fmt: skip
        except tern_model.ModelError as exc:
            if exc.reason == "stale" and exc.mark == current:
                self.stats["ignored"] += 1  # the retained copy of the model in use
            else:
                self._refused(exc.reason)
            return
        except (ValueError, MemoryError):  # belt and braces: keep the last good model
            self._refused("malformed")
            return
        self.model = model
        self.stats["accepted"] += 1
        try:
            self._store(msg)
        except OSError as exc:  # a full flash: run the model, say so
            self._set_detail("model not stored: " + str(exc))
            return
        self._set_detail("")

    # -- MQTT --------------------------------------------------------------------------

    def connect(self):
        if self.radio is not None:
            self.radio.connect(self.config)
        b = self.broker
        ctx = None if self.tls is None else self.tls.context()
        args = (
            self.device,
            b["host"],
            b.get("port", 1883 if ctx is None else 8883),
            b.get("user"),
            b.get("password"),
            b.get("keepalive", 60),
        )
        client = self.mqtt_factory(*args) if ctx is None else self.mqtt_factory(*args, ssl=ctx)
        client.set_callback(self.on_message)
        client.set_last_will(
            self.status_topic,
            status_json(self.device, "offline", self.version, "connection lost"),
            True,
            1,
        )
        self.client = client
        client.connect()
        client.publish(self.status_topic, self._online(), True, 1)
        self._status_due = False
        client.subscribe(self.model_topic, 1)
        self._last_ping = self.clock.ticks_ms()
        self.last_error = ""

    def _connect_failed(self, exc):
        # On the serial console (there is no broker to tell), once per distinct reason.
        self.stats["connect_failures"] += 1
        error = (type(exc).__name__ + ": " + str(exc))[:200]
        if error != self.last_error:
            self.last_error = error
            self.log("tern: not connected: " + error)

    def _online(self):
        return status_json(self.device, "online", self.version, self.detail)

    def close(self, detail=None):
        """Drop the connection; with a detail, first say so in an offline status."""
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if detail is not None:
                off = status_json(self.device, "offline", self.version, detail)
                client.publish(self.status_topic, off, True, 0)
            client.disconnect()
        except Exception:  # a half-open client: closing must not fail
            _close_socket(client)

    def next_backoff_ms(self):
        """The wait before the next reconnect: the current backoff, jittered down by up
        to half so a fleet does not come back in one instant; the backoff then doubles
        up to BACKOFF_MAX_MS."""
        b = self.backoff_ms
        self.backoff_ms = min(b * 2, BACKOFF_MAX_MS)
        half = b // 2
        return b - half + ((self.getrandbits(16) * half) >> 16)

    # -- the loop ----------------------------------------------------------------------

    def step(self):
        """Service MQTT once; infer and publish telemetry when a period has passed."""
        client = self.client
        clock = self.clock
        client.check_msg()
        if self._status_due:
            self._status_due = False
            client.publish(self.status_topic, self._online(), True, 1)
        now = clock.ticks_ms()
        keepalive_ms = self.broker.get("keepalive", 60) * 1000
        if keepalive_ms and clock.ticks_diff(now, self._last_ping) >= keepalive_ms // 2:
            client.ping()
            self._last_ping = now
        model = self.model
        if model is None:
            return
        last = self._last_infer
        if last is not None and clock.ticks_diff(now, last) < self.period_ms:
            return
        self._last_infer = now
        try:
            window = self.sensor.read()
            t0 = clock.ticks_us()
            label, _, _, confidence = model.infer(window)
            latency = clock.ticks_diff(clock.ticks_us(), t0)
        except ValueError:  # a window of the wrong size or range: skip it, keep running
            self.stats["sensor_errors"] += 1
            return
        payload = telemetry_json(self.device, model.model_version, self.seq, label,
                                 confidence, latency)  # fmt: skip
        client.publish(self.telemetry_topic, payload, False, 0)
        self.seq += 1
        self.stats["telemetry"] += 1

    def run(self, stop=None):
        """Loop until stop() is true; reconnect with jittered exponential backoff."""
        clock = self.clock
        while stop is None or not stop():
            if self.client is None:
                try:
                    self.connect()
                    self.backoff_ms = BACKOFF_MIN_MS
                except self.net_errors as exc:
                    self._connect_failed(exc)
                    self.close()
                    self._sleep(self.next_backoff_ms(), stop)
                    continue
            try:
                self.step()
            except self.net_errors:
                self.close()
                self.stats["reconnects"] += 1
                self._sleep(self.next_backoff_ms(), stop)
                continue
            clock.sleep_ms(min(POLL_MS, self.period_ms))
        self.close("shutdown")

    def _sleep(self, ms, stop):
        # In slices, so stop() is honoured during a long backoff.
        clock = self.clock
        while ms > 0 and (stop is None or not stop()):
            part = min(ms, POLL_MS)
            clock.sleep_ms(part)
            ms -= part
