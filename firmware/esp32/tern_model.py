# tern microcontroller model: HMAC-SHA256 check, strict parse, integer-only inference.
#
# Pure: no network or hardware imports, so the same file runs on the board, under
# MicroPython in tests (node) and under CPython. The wire format and the arithmetic are
# topics.md, "Microcontroller model"; tern.mcu is the CPython reference it must match bit
# for bit. Memory: the received message is never copied; a Model keeps a memoryview of it
# and reads the int8 weights in place.
#
# Order: a board runs a model only when its (run, model_version) is greater than the one it
# runs. The pair is kept as one int, `mark` = run << 32 | model_version (model_version is a
# u32, so ints compare exactly as the pairs do); the run is read as two u32 halves because
# struct's 'Q' is not on every MicroPython port.
import hashlib
import math
import struct

MAGIC = b"TMCU"
FORMAT_VERSION = 2
TAG_BYTES = 32
KEY_BYTES = 32
MAX_MODEL_BYTES = 65536
MAX_LAYERS = 8
MAX_WIDTH = 1024
HEADER_BYTES = 20
DOMAIN = b"tern-mcu-2\x00"
_BLOCK = 64  # SHA-256 block size, for HMAC (RFC 2104)

REASONS = ("oversize", "truncated", "bad_mac", "bad_magic", "bad_version", "malformed", "stale")


def mark(run, model_version):
    """The (run, model_version) order as one int: greater exactly when the pair is."""
    return (run << 32) | model_version


class ModelError(Exception):
    """A model refused; `reason` is one of REASONS, `mark` its mark() when known ("stale")."""

    def __init__(self, reason, detail="", mark=None):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail
        self.mark = mark


def _pad_key(key, pad):
    out = bytearray(_BLOCK)
    for i in range(len(key)):
        out[i] = key[i]
    for i in range(_BLOCK):
        out[i] ^= pad
    return out


def mac(body, key, fleet, device):
    """HMAC-SHA256(key, DOMAIN || fleet || 0 || device || 0 || body), RFC 2104 on sha256
    (MicroPython on the ESP32 has hashlib but no hmac module)."""
    if len(key) != KEY_BYTES:
        raise ValueError("a board key is 32 bytes")
    inner = hashlib.sha256(_pad_key(key, 0x36))
    inner.update(DOMAIN)
    inner.update(fleet.encode())
    inner.update(b"\x00")
    inner.update(device.encode())
    inner.update(b"\x00")
    inner.update(body)  # a memoryview: hashed in place, not copied
    outer = hashlib.sha256(_pad_key(key, 0x5C))
    outer.update(inner.digest())
    return outer.digest()


def _same(a, b):
    # Constant time in the contents: no early exit on the first differing byte.
    if len(a) != len(b):
        return False
    diff = 0
    for i in range(len(a)):
        diff |= a[i] ^ b[i]
    return diff == 0


def verify(data, key, fleet, device, max_bytes=MAX_MODEL_BYTES):
    """The body (a memoryview of `data`) when its tag verifies; ModelError otherwise.

    Only the length is looked at before the tag: nothing is parsed from bytes that are
    not yet authenticated.
    """
    n = len(data)
    if n > max_bytes or n > MAX_MODEL_BYTES:
        raise ModelError("oversize", f"{n} bytes")
    if n < HEADER_BYTES + TAG_BYTES:
        raise ModelError("truncated", f"{n} bytes")
    mv = memoryview(data)
    body = mv[: n - TAG_BYTES]
    if not _same(mac(body, key, fleet, device), mv[n - TAG_BYTES :]):
        raise ModelError("bad_mac")
    return body


def _body_size(sizes):
    size = HEADER_BYTES + 2 * len(sizes)
    for i in range(len(sizes) - 1):
        size += 4 + sizes[i + 1] * (sizes[i] + 4)
    return size


class Model:
    """A parsed model over the message's bytes; infer() is topics.md "Inference"."""

    def __init__(self, body):
        mv = memoryview(body)
        if len(mv) < HEADER_BYTES:
            raise ModelError("truncated", "no header")
        if bytes(mv[0:4]) != MAGIC:
            raise ModelError("bad_magic")
        if mv[4] != FORMAT_VERSION:
            raise ModelError("bad_version", str(mv[4]))
        n_layers = mv[5]
        self.in_exp = mv[6] - 256 if mv[6] > 127 else mv[6]
        if mv[7] != 0:
            raise ModelError("malformed", "flags")
        self.model_version, lo, hi = struct.unpack_from("<III", mv, 8)
        self.run = (hi << 32) | lo
        self.mark = mark(self.run, self.model_version)
        if not 1 <= n_layers <= MAX_LAYERS:
            raise ModelError("malformed", f"{n_layers} layers")
        pos = HEADER_BYTES + 2 * (n_layers + 1)
        if len(mv) < pos:
            raise ModelError("truncated", "layer widths")
        self.sizes = struct.unpack_from(f"<{n_layers + 1}H", mv, HEADER_BYTES)
        for s in self.sizes:
            if not 1 <= s <= MAX_WIDTH:
                raise ModelError("malformed", f"width {s}")
        want = _body_size(self.sizes)
        if len(mv) < want:
            raise ModelError("truncated", f"{len(mv)} bytes, widths imply {want}")
        if len(mv) > want:
            raise ModelError("malformed", f"{len(mv)} bytes, widths imply {want}")
        layers = []
        for li in range(n_layers):
            n = self.sizes[li]
            o = self.sizes[li + 1]
            m = mv[pos]
            e_w = mv[pos + 1] - 256 if mv[pos + 1] > 127 else mv[pos + 1]
            e_b = mv[pos + 2] - 256 if mv[pos + 2] > 127 else mv[pos + 2]
            if mv[pos + 3] != 0:
                raise ModelError("malformed", f"layer {li} padding")
            pos += 4
            if m == 0:
                for i in range(pos, pos + o * n):
                    if mv[i]:
                        raise ModelError("malformed", f"layer {li}: zero scale, nonzero weights")
            elif m < 128:
                raise ModelError("malformed", f"layer {li}: scale mantissa {m}")
            w_off = pos
            pos += o * n
            # Biases decoded once (4 * o bytes of ints); weights stay in the message.
            bias = struct.unpack_from(f"<{o}i", mv, pos)
            pos += 4 * o
            layers.append((n, o, m, e_w, e_b, w_off, bias))
        self.layers = layers
        self._mv = mv
        width = max(self.sizes)
        self._a = [0] * width  # two activation buffers, reused by every inference
        self._b = [0] * width

    def infer(self, window):
        """(label, logits, exp, confidence): logits[j] stands for logits[j] * 2**-exp."""
        sizes = self.sizes
        if len(window) != sizes[0]:
            raise ValueError(f"window of {len(window)} values, the model takes {sizes[0]}")
        x = self._a
        for i in range(sizes[0]):
            v = window[i]
            if not -127 <= v <= 127:
                raise ValueError("window values must be in -127..127")
            x[i] = v
        y = self._b
        mv = self._mv
        e = self.in_exp
        big_e = e
        last = len(self.layers) - 1
        for li in range(last + 1):
            n, o, m, e_w, e_b, w_off, bias = self.layers[li]
            big_e = e_w + e
            d = e_b - big_e
            # The bytes hold w & 0xFF; (u ^ 128) is w + 128 for every int8 w, so
            # sum(x * w) = sum(x * (u ^ 128)) - 128 * sum(x): no sign branch per weight.
            sx = 0
            for i in range(n):
                sx += x[i]
            sx <<= 7
            top = 0
            for j in range(o):
                base = w_off + j * n
                acc = 0
                for i in range(n):
                    acc += x[i] * (mv[base + i] ^ 128)
                b = bias[j]
                c = (b + (1 << (d - 1))) >> d if d > 0 else b << -d
                v = (acc - sx) * m + c
                if li < last:
                    if v < 0:
                        v = 0
                    if v > top:
                        top = v
                y[j] = v
            if li == last:
                break
            # Requantize the ReLU outputs to int8 for the next layer.
            k = 0
            while (top >> k) > 127:  # k = max(0, bitlen(top) - 7)
                k += 1
            while k and ((top + (1 << (k - 1))) >> k) > 127:
                k += 1
            if k:
                half = 1 << (k - 1)
                for j in range(o):
                    v = (y[j] + half) >> k
                    x[j] = 127 if v > 127 else (-127 if v < -127 else v)
            else:
                for j in range(o):
                    x[j] = y[j]
            e = big_e - k
        o = self.sizes[-1]
        logits = y[:o]
        label = 0
        for j in range(1, o):
            if logits[j] > logits[label]:
                label = j
        best = logits[label]
        total = 0.0
        for j in range(o):
            try:
                total += math.exp(math.ldexp(logits[j] - best, -big_e))
            except OverflowError:  # a gap too large for a float: exp(-huge) is 0
                continue
        return label, logits, big_e, 1.0 / total


def load(data, key, fleet, device, current=-1, max_bytes=MAX_MODEL_BYTES):
    """Verify, parse and check order: a Model whose mark is greater than `current` (the
    mark of the model the board runs, -1 for none), or ModelError ("stale", with .mark
    set, when it is not newer: equal for a retained copy of the model in use)."""
    model = Model(verify(data, key, fleet, device, max_bytes))
    if model.mark <= current:
        raise ModelError("stale", f"run {model.run} version {model.model_version}", model.mark)
    return model
