"""What bench.fuzz feeds the decoders: valid messages, hostile shapes and the random mutator.

Valid: one fleet (a coordinator, two gateways, three devices; keys derived from their ids),
a round open on a small model, and of each kind a valid body (a schedule with and without
a policy), its envelope sealed by its sender and the same envelope unsigned; valid JSON
documents of every kind a component reads; a microcontroller model, bare and sealed for a
board. Hostile: the CBOR shapes issue 9 names, JSON with deep nesting and huge numbers,
microcontroller models with one header field broken. The random engine's mutator and its
pure random bytes are here too.

The protocol layer is imported inside the functions: an atheris worker instruments it
before it builds the seeds.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported by valid_world, after instrumentation
    from nacl.signing import SigningKey, VerifyKey

    from tern.envelope import Envelope
    from tern.fleet import Fleet
    from tern.messages import KernelFile, RoundSchedule
    from tern.spec import ModelSpec

__all__ = [
    "SPARSE_DENSITY",
    "World",
    "cbor_hostile",
    "envelope_fields",
    "envelope_with_body",
    "json_hostile",
    "mcu_hostile",
    "mutate",
    "random_input",
    "sparse_hostile",
    "valid_world",
]

SPARSE_DENSITY = 0.25  # what the fuzzed sparse decoders accept (a schedule's density)


@dataclass(frozen=True, slots=True)
class World:
    """The fleet and the round the decoders receive from, and valid messages of each kind."""

    fleet_id: str
    run: int
    rnd: int
    deadline: float
    keys: dict[str, SigningKey]
    vkeys: dict[str, VerifyKey]
    spec: ModelSpec
    fleet: Fleet
    kernel: KernelFile
    schedule: RoundSchedule
    bodies: dict[str, object]  # a valid body of each kind
    envelopes: dict[str, Envelope]  # name: the envelope of one of them
    sealed: dict[str, bytes]  # name: that envelope sealed by its sender
    unsigned: dict[str, bytes]  # name: its map without ``sig``
    board_key: bytes
    board: tuple[str, str]  # (fleet, board id), what a microcontroller model is sealed for
    mcu_body: bytes
    mcu_sealed: bytes
    json_docs: dict[str, bytes]  # a valid document of each kind


def _keys() -> dict[str, SigningKey]:
    from nacl.signing import SigningKey

    ids = ["coordinator", "gw-1", "gw-1a", "dev-1", "dev-2", "dev-3"]
    return {cid: SigningKey(hashlib.sha256(cid.encode()).digest()) for cid in ids}


def valid_world() -> World:
    """The fleet, the round and a valid message of every kind (imports the protocol layer)."""
    from gateway.boards import BoardEntry, Boards
    from kernels.reference import init_weights, mlp_spec
    from tern import mcu
    from tern.aggregate import Partial
    from tern.codecs import (
        CodecName,
        Float16Codec,
        Float32Codec,
        SparseTernaryCodec,
        TernaryCodec,
    )
    from tern.envelope import Envelope, Kind, canonical, seal
    from tern.fleet import COORDINATOR, Fleet, GatewayEntry
    from tern.freshness import Stamp, Watermarks
    from tern.logins import Login, hash_password
    from tern.messages import (
        Bounds,
        Failure,
        GlobalModel,
        KernelFile,
        KernelRef,
        Policy,
        RoundSchedule,
        StrategySpec,
        TrainConfig,
        Update,
        encode_update,
    )
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

    fleet_id, run, rnd, deadline = "fuzz", 1_764_000_000_000, 3, 1.8e9
    keys = _keys()
    vkeys = {cid: k.verify_key for cid, k in keys.items()}
    spec = mlp_spec((8, 6, 3))  # small: mutations land on structure, not on weight bytes
    rng = np.random.default_rng(0)
    fleet = Fleet(
        fleet_id,
        vkeys[COORDINATOR],
        {
            "gw-1": GatewayEntry(
                vkeys["gw-1"], COORDINATOR, {d: vkeys[d] for d in ("dev-1", "dev-2")}
            ),
            "gw-1a": GatewayEntry(vkeys["gw-1a"], "gw-1", {"dev-3": vkeys["dev-3"]}),
        },
        logins={u: hash_password("pw-" + u, salt=bytes(12)) for u in ("gw-1", "dev-1")},
        max_params=4096,
        max_weight={"dev-2": 50.0},
    )
    kernel = KernelFile(1, b"\0asm\1\0\0\0")
    schedule = RoundSchedule(
        round=rnd,
        model_version=rnd,
        codec=CodecName.TERNARY,
        deadline=deadline,
        min_contributors=1,
        participants=("dev-1", "dev-2", "dev-3"),
        seed=7,
        train=TrainConfig(),
        kernel=KernelRef(kernel.sha256, 1, 10**9, 1 << 24),
        bounds=Bounds(500.0, 20.0),
    )
    # a policy of every kind of name: known, unknown, and a parameter fedadam does not have
    policy = Policy("median", "sum", StrategySpec.of("fedadam", lr=0.05, beta2=0.999, mu=-1.5))
    weights = init_weights(spec, rng)

    def update_body(codec: Any, weight: float, **failed: int) -> object:
        d = rng.standard_normal(spec.size).astype(np.float32)
        d = (d / np.linalg.norm(d) * 2.0 * weight).astype(np.float32)
        update = encode_update(codec, spec, Partial(d, weight, 1))[0]
        return Update(update.codec, update.weight, 1, update.tensors, failed).to_body()

    bodies = {
        "model": GlobalModel(spec, weights).to_body(),
        "schedule": schedule.to_body(),
        "schedule-policy": replace(schedule, policy=policy).to_body(),
        "update": update_body(TernaryCodec(), 100.0),
        "update16": update_body(Float16Codec(), 40.0),
        "update-sparse": update_body(SparseTernaryCodec(SPARSE_DENSITY), 100.0),
        "partial": update_body(Float32Codec(), 200.0, late=1),
        "failure": Failure({"kernel_trap": 1}).to_body(),
        "kernel": kernel.to_body(),
    }
    envelopes = {  # name: (kind, sender, body, model version)
        "model": (Kind.MODEL, COORDINATOR, "model", rnd),
        "model-old": (Kind.MODEL, COORDINATOR, "model", rnd - 1),
        "schedule": (Kind.SCHEDULE, COORDINATOR, "schedule", rnd),
        "schedule-policy": (Kind.SCHEDULE, COORDINATOR, "schedule-policy", rnd),
        "update": (Kind.UPDATE, "dev-1", "update", rnd),
        "update16": (Kind.UPDATE, "dev-2", "update16", rnd),
        "failure": (Kind.FAILURE, "dev-1", "failure", rnd),
        "partial": (Kind.PARTIAL, "gw-1a", "partial", rnd),
        "gw-failure": (Kind.FAILURE, "gw-1a", "failure", rnd),
    }
    made = {
        n: Envelope(kind, fleet_id, rnd, v, sender, bodies[b], run=run)
        for n, (kind, sender, b, v) in envelopes.items()
    }
    made["kernel"] = Envelope(Kind.KERNEL, fleet_id, 0, 0, COORDINATOR, bodies["kernel"], run=run)

    board_key, board = bytes(range(32)), ("fuzz", "esp-1")
    mcu_body = mcu.quantize(spec, weights, rnd, run=run).to_bytes()
    entry = BoardEntry(board_key, "esp-1", "pw-esp-1")
    view_members = {
        "dev-3": MemberView(Role.DEVICE, ViewState.ONLINE, Activity.TRAINING, rnd, "x"),
        "esp-7": MemberView(Role.BOARD, telemetry=Reading(3, 0.75, 850, rnd, 12)),
    }
    json_docs = {
        "status": Status("gw-1", "gateway", State.ONLINE, "0.1.0", "ok").to_json(),
        "metrics": RoundMetrics(
            "gw-1", rnd, rnd, 2, 1, {"bad_signature": 3}, 10, 20, 0.5, 0.7, 1.5, {"late": 1}
        ).to_json(),
        "telemetry": Telemetry("esp-1", rnd, 12, 3, 0.75, 850).to_json(),
        "device-status": Status(
            "dev-1", "device", State.ONLINE, "0.1.0", "", Activity.IDLE, rnd, "late: past"
        ).to_json(),
        "view": FleetView("gw-1a", "gw-1", 1.5e9, rnd, view_members).to_json(),
        "fleet": fleet.to_json().encode(),
        "login": Login("dev-1", "pw-dev-1").to_json().encode(),
        "marks": Watermarks(Stamp(run, rnd), Stamp(run, rnd, deadline)).to_json().encode(),
        "boards": Boards(fleet_id, "gw-1", {"esp-1": entry}).to_json().encode(),
    }
    return World(
        fleet_id=fleet_id,
        run=run,
        rnd=rnd,
        deadline=deadline,
        keys=keys,
        vkeys=vkeys,
        spec=spec,
        fleet=fleet,
        kernel=kernel,
        schedule=schedule,
        bodies=bodies,
        envelopes=made,
        sealed={n: seal(e, keys[e.sender]) for n, e in made.items()},
        unsigned={n: canonical(envelope_fields(e)) for n, e in made.items()},
        board_key=board_key,
        board=board,
        mcu_body=mcu_body,
        mcu_sealed=mcu.seal_mcu(mcu_body, board_key, *board),
        json_docs=json_docs,
    )


def envelope_fields(env: Any) -> dict[str, object]:
    """An envelope's map without ``sig`` (what its signature covers)."""
    return {
        "v": env.version,
        "kind": str(env.kind),
        "fleet": env.fleet,
        "run": env.run,
        "round": env.round,
        "model": env.model_version,
        "sender": env.sender,
        "body": env.body,
    }


def envelope_with_body(fields: dict[str, object], body: bytes, *, sig: bool) -> bytes:
    """An envelope's map (canonical key order) whose body is `body`, raw."""
    from tern.cbor import head
    from tern.envelope import canonical

    entries = [(canonical(k), canonical(v)) for k, v in fields.items() if k != "body"]
    entries.append((canonical("body"), body))
    if sig:
        entries.append((canonical("sig"), canonical(bytes(64))))
    entries.sort(key=lambda e: (len(e[0]), e[0]))
    return head(5, len(entries)) + b"".join(k + v for k, v in entries)


# -- hostile shapes ----------------------------------------------------------------------------


def cbor_hostile() -> list[bytes]:
    """The CBOR shapes issue 9 names, each small: the decoder must refuse them on sight."""
    big = b"\x59\x10\x00" + b"\xff" * 4096  # a 4 KiB byte string
    return [
        b"\x81" * 40 + b"\x00",  # nesting past the depth bound
        b"\xa1\x61a" * 40 + b"\x00",
        b"\xd8\x1c\x82\xd8\x1d\x00\xd8\x1d\x00",  # shared reference (28) and its use (29)
        b"\xd8\x1c\x81" * 8 + b"\xd8\x1d\x00",
        b"\xc4\x82\x3a\x7f\xff\xff\xff\xc2" + big,  # decimal fraction, bignum mantissa
        b"\xc5\x82\x1b\x7f\xff\xff\xff\xff\xff\xff\xff\xc2" + big,  # bigfloat
        b"\xd8\x1e\x82\xc2" + big + b"\xc2" + big,  # rational
        b"\xc2" + big,  # bignum
        b"\xc3" + big,  # negative bignum
        b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff",  # a byte string of 2**64 - 1 bytes
        b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00",  # an array of 2**32 items
        b"\xbb\x00\x00\x00\x01\x00\x00\x00\x00",
        b"\x9f\x01\x02\xff",  # indefinite lengths
        b"\x5f\x41a\xff",
        b"\xbf\x61a\x01\xff",
        b"\xd9\x03\xe8\x00",  # unknown tag 1000
        b"\xda\xff\xff\xff\xff\x00",
        b"\x18\x01",  # not the shortest form
        b"\x1b\x00\x00\x00\x00\x00\x00\x00\x01",
        b"\xf9\x7e\x00",  # NaN, infinity, undefined, simple values
        b"\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00",
        b"\xf7",
        b"\xf8\x20",
        b"\xa2\x61a\x00\x61a\x00",  # a repeated key
        b"\x62\xc3\x28",  # text that is not UTF-8
        b"\xd8\x28\x82\x81\x1a\x10\x00\x00\x00\xd8\x55\x40",  # tag 40, huge shape, no data
    ]


def sparse_hostile(wire: dict[str, Any], n: int) -> list[bytes]:
    """A valid sparse tensor of `n` values (tern.sparse) with one thing wrong each: count
    past the density, another Rice parameter, a position past the end, set padding bits,
    trailing or huge byte strings, a bad scale or shape, an extra key."""
    from tern.envelope import canonical

    gaps, signs, count = wire["gaps"], wire["signs"], wire["count"]
    variants: list[dict[str, object]] = [
        {"count": n}, {"count": count + 1}, {"count": 2**64 - 1},
        {"rice": 0}, {"rice": 63}, {"rice": 2**40},
        {"gaps": b"\x00" * len(gaps) + b"\x80"},  # one long last gap: past the end
        {"gaps": gaps[:-1] + bytes([gaps[-1] | 1])},  # an extra code in the padding
        {"gaps": gaps + b"\x00"}, {"gaps": b"\xff" * (len(gaps) + 4096)},
        {"signs": signs[:-1] + bytes([signs[-1] | 1])}, {"signs": signs + b"\x00"},
        {"scale": -1.0}, {"scale": float("inf")}, {"scale": 0.0}, {"shape": [n + 1]},
        {"extra": 0},
    ]  # fmt: skip
    return [canonical({**wire, **v}) for v in variants]


_JSON_NUMBER = re.compile(
    r"(?<=[:\[,] )-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|(?<=[:\[,])-?\d+(?:\.\d+)?"
)
_JSON_STRING = re.compile(r'(?<=: )"[^"]*"|(?<=:)"[^"]*"')


def json_hostile(valid: Sequence[bytes]) -> list[bytes]:
    """Deep nesting, huge and non-finite numbers, bad escapes; and each valid document with
    its numbers and strings swapped for those, one at a time."""
    numbers = ["1" + "0" * 400, "-" + "9" * 5000, "1e999", "-1e999", "NaN", "Infinity", "1.5"]
    deep = "[" * 3000 + "]" * 3000
    out = [deep.encode(), ('{"a":' * 2000 + "1" + "}" * 2000).encode(), b'"\\ud800"', b"\xff\xfe"]
    out += [n.encode() for n in numbers]
    for doc in valid:
        text = doc.decode()
        for match in list(_JSON_NUMBER.finditer(text))[:4]:
            for n in numbers:
                out.append((text[: match.start()] + n + text[match.end() :]).encode())
        for match in list(_JSON_STRING.finditer(text))[:4]:
            for value in (deep, "1" + "0" * 400, '"\\ud800"', "null", "{}"):
                out.append((text[: match.start()] + value + text[match.end() :]).encode())
    return out


def mcu_hostile(body: bytes) -> list[bytes]:
    """Valid bodies with one header field broken: layers, widths, flags, version, length."""
    out = []
    for offset, value in ((5, 0), (5, 9), (5, 255), (7, 1), (4, 1), (4, 3), (0, 0)):
        b = bytearray(body)
        b[offset] = value
        out.append(bytes(b))
    for width in (0, 1025, 65535):
        b = bytearray(body)
        struct.pack_into("<H", b, 20, width)
        out.append(bytes(b))
    return [*out, body[:-1], body + b"\x00", body[:19]]


# -- random bytes and the random engine's mutations ------------------------------------------


def random_input(rng: np.random.Generator, max_len: int) -> bytes:
    n = int(rng.integers(0, max_len + 1)) if rng.random() < 0.3 else int(rng.integers(0, 256))
    return rng.bytes(n)


# CBOR heads and values the decoders refuse (or must bound), to splice into an input
_HEADS = [*bytes.fromhex("00ff7f801b5b9bbbc29fbf"), 0xD81C, 0xD81D, 0xF97E00]
_SPLICES = [x.to_bytes(1 + (x > 0xFF) + (x > 0xFFFF), "big") for x in _HEADS] + [b"\x81" * 20]


def mutate(data: bytes, corpus: Sequence[bytes], rng: np.random.Generator, max_len: int) -> bytes:
    """One to four random edits: bit flips, random bytes, CBOR heads, cuts, runs, splices."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        op = int(rng.integers(0, 7))
        pos = int(rng.integers(0, len(b) + 1))
        if op == 0 and b:
            i = min(pos, len(b) - 1)
            b[i] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and b:
            i = min(pos, len(b) - 1)
            b[i] = int(rng.integers(0, 256))
        elif op == 2:
            b[pos:pos] = _SPLICES[int(rng.integers(0, len(_SPLICES)))]
        elif op == 3 and b:
            del b[pos : pos + int(rng.integers(1, 64))]
        elif op == 4:
            b[pos:pos] = bytes([int(rng.integers(0, 256))]) * int(rng.integers(1, 256))
        elif op == 5:
            other = corpus[int(rng.integers(0, len(corpus)))]
            start = int(rng.integers(0, len(other) + 1))
            b[pos:] = other[start:]
        else:
            del b[pos:]
    return bytes(b[:max_len])
