# TLS for the board: its clock from NTP first, then an SSLContext on the fleet CA.
#
# mbedTLS checks a certificate's dates against the board's clock, and an ESP32 boots
# with its clock at the epoch: every certificate would look not yet valid. So the board
# sets its clock by NTP before its first TLS connection and refuses TLS while it cannot.
# The CA is the fleet's, as DER (what MicroPython's load_verify_locations takes), from the
# provisioned bundle. No network or hardware import here: `ssl` and `ntptime` are passed
# in (the modules on the board, CPython stand-ins under test).

DEFAULT_NTP_HOST = "pool.ntp.org"
NTP_TRIES = 3  # per connection attempt; the board's reconnect backoff spaces attempts
NTP_RETRY_MS = 1000  # first wait between tries, doubled after each
MAX_CA_BYTES = 4096  # one DER certificate; a fleet CA is about 500 bytes


class TlsError(OSError):
    """No TLS connection now, and why (`reason`: clock_not_set, no_ca, bad_ca).

    An OSError, so the board's loop backs off and retries as for any network failure."""

    def __init__(self, reason, detail):
        super().__init__(reason + ": " + detail)
        self.reason = reason


def settings(config):
    """config["tls"] checked: None (plain MQTT) or {"ca": path, "ntp": host}."""
    tls = config.get("tls")
    if tls is None:
        return None
    if not isinstance(tls, dict):
        raise ValueError("config tls must be an object")
    ca = tls.get("ca")
    if not isinstance(ca, str) or not ca:
        raise ValueError("config tls needs ca, the fleet CA's file (DER)")
    ntp = tls.get("ntp", DEFAULT_NTP_HOST)
    if not isinstance(ntp, str) or not ntp:
        raise ValueError("config tls ntp must be a host name")
    tries = tls.get("ntp_tries", NTP_TRIES)
    if not isinstance(tries, int) or tries < 1:
        raise ValueError("config tls ntp_tries must be a positive integer")
    return {"ca": ca, "ntp": ntp, "ntp_tries": tries}


def make(config, clock, ssl=None, ntp=None, path=None):
    """The board's Tls for config["tls"], or None for plain MQTT."""
    tls = settings(config)
    return None if tls is None else Tls(tls, clock, ssl, ntp, path)


def read_ca(path):
    """The fleet CA's DER bytes; TlsError when the file is missing or not one certificate."""
    try:
        with open(path, "rb") as f:
            der = f.read(MAX_CA_BYTES + 1)
    except OSError as exc:
        raise TlsError("no_ca", "cannot read " + path + ": " + str(exc)) from exc
    # A DER certificate is one SEQUENCE (0x30) with a two-byte length (0x82): what PEM or
    # a second certificate would not be.
    if len(der) > MAX_CA_BYTES or len(der) < 4 or der[0] != 0x30 or der[1] != 0x82:
        raise TlsError("bad_ca", path + " is not one DER certificate")
    if (der[2] << 8 | der[3]) + 4 != len(der):
        raise TlsError("bad_ca", path + " is not one DER certificate")
    return der


def set_clock(ntp, host, tries, clock, retry_ms=NTP_RETRY_MS):
    """Set the board's clock from NTP `host`: up to `tries` queries, the wait between
    them doubling; TlsError("clock_not_set") when none succeeds."""
    ntp.host = host
    last = None
    wait = retry_ms
    for i in range(tries):
        try:
            ntp.settime()
            return
        except (OSError, OverflowError, ValueError, IndexError) as exc:  # timeout, DNS, bad reply
            last = exc
        if i + 1 < tries:
            clock.sleep_ms(wait)
            wait *= 2
    raise TlsError("clock_not_set", "no time from NTP " + host + ": " + repr(last)[:100])


def context(ssl, cadata):
    """A client SSLContext that requires the broker's certificate to chain to `cadata`
    (the name is checked too: umqtt.simple passes server_hostname)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=cadata)
    except (ValueError, OSError) as exc:  # mbedTLS: ValueError; CPython: ssl.SSLError
        raise TlsError("bad_ca", "the CA is refused: " + str(exc)[:100]) from exc
    return ctx


class Tls:
    """A board's TLS: `context()` sets the clock once per boot, reads the CA once, and
    returns a fresh SSLContext; `refused` counts each TlsError by reason.

    `ssl` and `ntp` are MicroPython's modules (imported on first use when None); `path`
    maps a bundle file name to where the board keeps it."""

    def __init__(self, settings, clock, ssl=None, ntp=None, path=None):
        self.settings = settings
        self.clock = clock
        self.ssl = ssl
        self.ntp = ntp
        self.path = path or (lambda name: name)
        self.clock_set = False
        self.cadata = None
        self.refused = {}

    def context(self):
        try:
            return self._context()
        except TlsError as exc:
            self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            raise

    def _context(self):
        s = self.settings
        if not self.clock_set:  # before anything else: TLS needs the date
            if self.ntp is None:
                import ntptime  # on the board only

                self.ntp = ntptime
            set_clock(self.ntp, s["ntp"], s["ntp_tries"], self.clock)
            self.clock_set = True
        if self.cadata is None:
            self.cadata = read_ca(self.path(s["ca"]))
        if self.ssl is None:
            import ssl  # on the board only

            self.ssl = ssl
        return context(self.ssl, self.cadata)
