# Sensor windows for the board: read() returns `window` ints in -127..127, the input of
# tern_model.Model.infer. The returned list is reused by the next read() (no allocation
# per window); copy it to keep it.
import time


def _clamp(v):
    return 127 if v > 127 else (-127 if v < -127 else v)


class AdcSensor:
    """`window` consecutive samples of an ADC pin, each (raw - offset) >> shift, clamped.

    With the ESP32's 12-bit ADC (0..4095), offset 2048 and shift 4 map the range onto
    -128..127 before clamping. `interval_us` spaces the samples (0: as fast as it reads).
    """

    def __init__(self, pin, window=40, shift=4, offset=2048, interval_us=0):
        import machine  # on the board only

        self.adc = machine.ADC(machine.Pin(pin))
        if hasattr(self.adc, "atten") and hasattr(machine.ADC, "ATTN_11DB"):
            self.adc.atten(machine.ADC.ATTN_11DB)  # the full 0-3.3 V range
        if window < 1 or shift < 0:
            raise ValueError("window must be >= 1 and shift >= 0")
        self.shift = shift
        self.offset = offset
        self.interval_us = interval_us
        self.buf = [0] * window

    def read(self):
        adc = self.adc
        buf = self.buf
        wait = self.interval_us
        for i in range(len(buf)):
            buf[i] = _clamp((adc.read() - self.offset) >> self.shift)
            if wait:
                time.sleep_us(wait)
        return buf


class ReplaySensor:
    """Windows from a text file, one per line as comma-separated ints, cycling at the end.

    Blank lines and lines starting with '#' are skipped. The file is read a line at a time,
    so a long recording does not have to fit in memory.
    """

    def __init__(self, path):
        self.path = path
        self._file = open(path)  # noqa: SIM115 - kept open for the sensor's life
        self._buf = []
        self.read()  # fail now, not in the loop, when the file holds no window
        self._file.seek(0)

    def read(self):
        rewound = False
        while True:
            line = self._file.readline()
            if not line:
                if rewound:
                    raise ValueError(f"{self.path} holds no window")
                self._file.seek(0)
                rewound = True
                continue
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(",")
            buf = self._buf
            if len(buf) != len(parts):
                buf = self._buf = [0] * len(parts)
            for i in range(len(parts)):
                buf[i] = _clamp(int(parts[i]))
            return buf

    def close(self):
        self._file.close()


def make_sensor(config):
    """The sensor config.json's "sensor" object describes."""
    kind = config.get("kind")
    if kind == "adc":
        return AdcSensor(
            config["pin"],
            config.get("window", 40),
            config.get("shift", 4),
            config.get("offset", 2048),
            config.get("interval_us", 0),
        )
    if kind == "replay":
        return ReplaySensor(config["path"])
    raise ValueError(f"unknown sensor kind {kind} (adc or replay)")
