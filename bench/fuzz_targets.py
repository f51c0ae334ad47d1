"""The decoders bench.fuzz exercises: for each, how fuzz bytes become a call, its seeds and
its documented error (a TernError; the firmware's ModelError; gateway.boards.BoardsError).

`/signed` decoders re-sign each mutated message with a fleet member's key before it is
decoded (a compromised member), `/tagged` ones re-tag a microcontroller model with the
board's key, so that fuzzing reaches what lies behind the signature check. Contributions
take their topic (and who signs them) from their first byte.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from bench.fuzz_chunks import chunks_table
from bench.fuzz_downlink import downlink_table
from bench.fuzz_secagg import secagg_table
from bench.fuzz_seeds import (
    SPARSE_DENSITY,
    cbor_hostile,
    envelope_fields,
    envelope_with_body,
    json_hostile,
    mcu_hostile,
    sparse_hostile,
    valid_world,
)

if TYPE_CHECKING:  # the decoders are imported by build_targets, after instrumentation
    from nacl.signing import SigningKey

__all__ = ["FIRMWARE", "REPO", "Call", "Prepare", "Target", "build_targets", "run_one"]

REPO = Path(__file__).resolve().parents[1]
FIRMWARE = REPO / "firmware" / "esp32"

Call = Callable[[], object]
Prepare = Callable[[bytes], Call]


@dataclass(frozen=True)
class Target:
    """One decoder: `prepare` turns fuzz bytes into the call to time (outside the timing)."""

    name: str
    seeds: tuple[bytes, ...]
    prepare: Callable[[bytes], Call]
    errors: tuple[type[BaseException], ...]
    max_len: int


def run_one(target: Target, data: bytes) -> tuple[int, BaseException | None]:
    """(nanoseconds the decoder took, the exception if it was not a documented error, or
    if what the call must leave true afterwards, its `after()`, failed: untimed)."""
    call = target.prepare(data)
    t0 = time.perf_counter_ns()
    try:
        call()
    except target.errors:
        pass
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a crash: whatever it is, record it and go on
        return time.perf_counter_ns() - t0, exc
    ns = time.perf_counter_ns() - t0
    after = getattr(call, "after", None)  # what must still hold (bench.fuzz_secagg.Checked)
    if after is not None:
        try:
            after()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the receiver stopped working: a crash too
            return ns, exc
    return ns, None


def _resign(unsigned: bytes, key: SigningKey) -> bytes:
    """A map without ``sig`` (as fuzzed) with ``sig`` appended: the signature covers exactly
    these bytes, as `tern.cbor.decode_signed_map` recovers them. Anything else unchanged."""
    if not unsigned or unsigned[0] >> 5 != 5 or unsigned[0] & 0x1F >= 23:
        return unsigned
    sig = key.sign(unsigned).signature
    return bytes([0xA0 | (unsigned[0] & 0x1F) + 1]) + unsigned[1:] + b"\x63sig\x58\x40" + sig


def _firmware() -> ModuleType:
    """firmware/esp32/tern_model.py, the board's own parser (imported by an atheris worker
    from sys.path, so that it is instrumented; loaded from its file anywhere else)."""
    if "tern_model" in sys.modules:
        return sys.modules["tern_model"]
    spec = importlib.util.spec_from_file_location("tern_model", FIRMWARE / "tern_model.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {FIRMWARE / 'tern_model.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_targets() -> dict[str, Target]:
    """Every decoder, with its seeds: imports the protocol layer (instrument before)."""
    import numpy as np

    from gateway.boards import Boards, BoardsError
    from tern import mcu
    from tern.admit import Terms, admit, peers_of
    from tern.cbor import Caps, decode, decode_signed_map
    from tern.codecs import SparseTernaryCodec
    from tern.collect import Collector
    from tern.envelope import Kind, canonical, open_envelope
    from tern.errors import TernError
    from tern.feed import CoordinatorFeed
    from tern.fleet import COORDINATOR, Fleet
    from tern.fleetview import ViewMachine
    from tern.freshness import Stamp, Watermarks
    from tern.logins import Login
    from tern.messages import (
        Failure,
        GlobalModel,
        KernelFile,
        RoundSchedule,
        Update,
        open_kernel,
        open_model,
        open_schedule,
    )
    from tern.reports import FleetView, RoundMetrics, Status, Telemetry
    from tern.rounds.events import Link, Received
    from tern.spec import ModelSpec
    from tern.topics import parse
    from tern.topics import partial as partial_topic
    from tern.topics import status as status_topic
    from tern.topics import telemetry as telemetry_topic
    from tern.topics import update as update_topic
    from tern.topics import view as view_topic

    firmware = _firmware()
    w = valid_world()
    fleet_id, run, rnd, fleet, spec, keys = w.fleet_id, w.run, w.rnd, w.fleet, w.spec, w.keys
    kernel, sealed, unsigned = w.kernel, w.sealed, w.unsigned
    cbor_bad = cbor_hostile()
    around = envelope_fields(w.envelopes["update"])  # every hostile shape as a body, too
    in_envelope = [envelope_with_body(around, b, sig=True) for b in cbor_bad]
    in_unsigned = [envelope_with_body(around, b, sig=False) for b in cbor_bad]

    def pick(*names: str, source: dict[str, bytes] = sealed) -> list[bytes]:
        return [source[n] for n in names]

    caps = Caps(1 << 16, 1 << 12)
    peers = peers_of(fleet, "gw-1", w.schedule)
    terms = Terms.of(fleet_id, run, w.schedule, spec)
    marks = Watermarks(Stamp(run, rnd - 1), Stamp(run, rnd - 1, w.deadline - 60))
    senders = [  # the first byte of an admit input picks (topic, peer)
        (update_topic(fleet_id, "gw-1", "dev-1"), "dev-1"),
        (partial_topic(fleet_id, "gw-1", "gw-1a"), "gw-1a"),
    ]
    offer_topics = [  # the first byte of an offer input picks its topic (and who signs it)
        ("update/gw-1/dev-1", "dev-1"),
        ("update/gw-1/dev-2", "dev-2"),
        ("partial/gw-1/gw-1a", "gw-1a"),
        ("update/gw-1/dev-9", "dev-1"),
        ("update/gw-1/gw-1a", "gw-1a"),
        ("partial/gw-1/dev-1", "dev-1"),
        ("update/gw-1", "dev-1"),
        ("update/gw-1/+", "dev-1"),
    ]
    contributions = [b"\0" + m for m in [*pick("update", "failure", "update16"), *in_envelope]]
    contributions += [b"\1" + m for m in pick("partial", "gw-failure")]
    unsigned_contributions = [b"\0" + m for m in [*pick("update", "failure", source=unsigned)]]
    unsigned_contributions += [b"\0" + m for m in in_unsigned]
    unsigned_contributions += [b"\1" + m for m in pick("partial", "gw-failure", source=unsigned)]

    def admit_call(signed: bool) -> Prepare:
        def prepare(data: bytes) -> Call:
            topic, sender = senders[data[0] & 1 if data else 0]
            payload = _resign(data[1:], keys[sender]) if signed else data[1:]
            return _bind(admit, payload, topic, peers[sender], terms)

        return prepare

    def offer_call(signed: bool) -> Prepare:
        def prepare(data: bytes) -> Call:
            selector = data[0] if data else 0
            topic, signer = offer_topics[selector & 7]
            payload = _resign(data[1:], keys[signer]) if signed else data[1:]
            collector = Collector(terms=terms, peers=peers)  # a fresh round: no history
            return _bind(_offer_checked, collector, payload, f"tern/{fleet_id}/{topic}",
                         retained=selector >= 0x80)  # fmt: skip

        return prepare

    view_topics = [  # the first byte of a view input picks its topic
        *(status_topic(fleet_id, m).path for m in ("dev-1", "gw-1a", "esp-1", "dev-3")),
        *(telemetry_topic(fleet_id, m).path for m in ("esp-1", "dev-1")),
        *(view_topic(fleet_id, g).path for g in ("gw-1a", "gw-2")),
    ]

    def view_call(data: bytes) -> Call:
        topic = view_topics[(data[0] if data else 0) & 7]
        machine = ViewMachine(fleet, "gw-1", ["esp-1"])
        return _bind(_view_checked, machine, Received(Link.DOWN, topic, data[1:]))

    def feed_call(take: str, signed: bool) -> Prepare:
        def prepare(data: bytes) -> Call:
            payload = _resign(data, keys[COORDINATOR]) if signed else data
            return _bind(_take_checked, CoordinatorFeed(fleet, marks), take, payload)

        return prepare

    def raw(fn: Callable[..., object], *args: object, **kwargs: object) -> Prepare:
        return lambda data: _bind(fn, data, *args, **kwargs)

    def resigned(signer: str, fn: Callable[..., object], *args: object, **kw: object) -> Prepare:
        return lambda data: _bind(fn, _resign(data, keys[signer]), *args, **kw)

    def body(decoder: Callable[[Any], object]) -> Prepare:
        body_caps = Caps(1 << 16, 1 << 13)
        return lambda data: lambda: decoder(decode(data, body_caps))

    def text(decoder: Callable[[str], object]) -> Prepare:
        return lambda data: _bind(decoder, data.decode("utf-8", "replace"))

    sparse = SparseTernaryCodec(SPARSE_DENSITY)
    sparse_update = w.bodies["update-sparse"]
    first = spec.tensors[0]
    first_wire = sparse_update["tensors"][0]  # type: ignore[index]
    sparse_seeds = [canonical(first_wire), *sparse_hostile(first_wire, first.size), *cbor_bad]

    def sparse_update_check(b: Any) -> object:
        return Update.from_body(b).check(spec, density=SPARSE_DENSITY)

    def sparse_check(b: Any) -> object:  # decode and scatter: what a receiver does with it
        acc = np.zeros(first.size, dtype=np.float32)
        sparse.check(b, first.shape, "t").add_to(acc)
        return acc

    board_key, board, mcu_body, mcu_sealed = w.board_key, w.board, w.mcu_body, w.mcu_sealed
    mcu_bad = mcu_hostile(mcu_body)
    current = firmware.mark(run, rnd - 1)

    def tagged(fn: Callable[..., object], *args: object) -> Prepare:
        return lambda data: _bind(fn, data + mcu.mcu_tag(data, board_key, *board), *args)

    def json_seeds(name: str) -> list[bytes]:
        return [w.json_docs[name], *json_hostile([w.json_docs[name]])]

    topic_names = [f"tern/fuzz/{t}" for t, _ in offer_topics] + [
        "tern/fuzz/model",
        "tern/fuzz/schedule",
        f"tern/fuzz/kernel/{kernel.sha256}",
        "tern/fuzz/mcu/esp-1",
        "tern/fuzz/metrics/gw-1",
        "/" * 300,
        "tern/" + "a" * 70 + "/update/x/y",
        "tern/fuzz/update/gw-1/dev-1/extra",
    ]
    every_sealed = [*sealed.values(), *in_envelope]
    opening = {"fleet": fleet_id, "kinds": set(Kind), "caps": caps, "round": rnd, "run": run}
    body_seeds = [canonical(b) for b in w.bodies.values()]
    model_fn = partial(GlobalModel.from_body, max_params=fleet.max_params)
    boards_error: tuple[type[BaseException], ...] = (BoardsError,)
    model_error: tuple[type[BaseException], ...] = (firmware.ModelError,)
    vkeys = w.vkeys
    table: list[tuple[str, Sequence[bytes], Prepare, tuple[type[BaseException], ...]]] = [
        ("cbor.decode", [*every_sealed, *body_seeds, *cbor_bad], raw(decode, caps), ()),
        ("cbor.decode_signed_map", every_sealed, raw(decode_signed_map, caps), ()),
        ("envelope.open", every_sealed, raw(open_envelope, vkeys, **opening), ()),
        ("envelope.open/signed", [*unsigned.values(), *in_unsigned],
         resigned("dev-1", open_envelope, vkeys, **opening), ()),
        ("messages.open_model", pick("model", "model-old", "schedule", "kernel"),
         raw(open_model, fleet), ()),
        ("messages.open_schedule", pick("schedule", "schedule-policy", "model", "update"),
         raw(open_schedule, fleet), ()),
        ("messages.open_kernel", [*pick("kernel", "model"), kernel.wasm + bytes(64)],
         raw(open_kernel, fleet, kernel.sha256), ()),
        ("messages.open_kernel/signed", pick("kernel", "model", source=unsigned),
         resigned(COORDINATOR, open_kernel, fleet, kernel.sha256), ()),
        ("admit.admit", contributions, admit_call(signed=False), ()),
        ("admit.admit/signed", unsigned_contributions, admit_call(signed=True), ()),
        ("collect.offer", contributions, offer_call(signed=False), ()),
        ("collect.offer/signed", unsigned_contributions, offer_call(signed=True), ()),
        ("feed.take_model", pick("model", "model-old", "schedule"),
         feed_call("model", signed=False), ()),
        ("feed.take_model/signed", pick("model", "model-old", source=unsigned),
         feed_call("model", signed=True), ()),
        ("feed.take_schedule", pick("schedule", "schedule-policy", "model"),
         feed_call("schedule", signed=False), ()),
        ("feed.take_schedule/signed", pick("schedule", "schedule-policy", source=unsigned),
         feed_call("schedule", signed=True), ()),
        ("body.GlobalModel", [*body_seeds, *cbor_bad], body(model_fn), ()),
        ("body.RoundSchedule", [*body_seeds, *cbor_bad], body(RoundSchedule.from_body), ()),
        ("body.Update", [*body_seeds, *cbor_bad],
         body(lambda b: Update.from_body(b).check(spec)), ()),
        ("body.Update/sparse", [canonical(sparse_update), *body_seeds, *cbor_bad],
         body(sparse_update_check), ()),
        ("codecs.sparse", sparse_seeds, body(sparse_check), ()),
        ("body.Failure", [*body_seeds, *cbor_bad], body(Failure.from_body), ()),
        ("body.KernelFile", [*body_seeds, *cbor_bad], body(KernelFile.from_body), ()),
        ("body.ModelSpec", [canonical(spec.to_cbor()), *cbor_bad], body(ModelSpec.from_cbor), ()),
        ("reports.Status", [*json_seeds("status"), *json_seeds("device-status")],
         raw(Status.from_json), ()),
        ("reports.FleetView", json_seeds("view"), raw(FleetView.from_json), ()),
        ("fleetview.ViewMachine", [bytes([i]) + s for i in range(8) for s in
                                   (w.json_docs["device-status"], w.json_docs["view"])],
         view_call, ()),
        ("reports.RoundMetrics", json_seeds("metrics"), raw(RoundMetrics.from_json), ()),
        ("reports.Telemetry", json_seeds("telemetry"), raw(Telemetry.from_json), ()),
        ("mcu.open_mcu", [mcu_sealed, *mcu_bad], raw(mcu.open_mcu, board_key, *board), ()),
        ("mcu.open_mcu/tagged", [mcu_body, *mcu_bad],
         tagged(mcu.open_mcu, board_key, *board), ()),
        ("firmware.load", [mcu_sealed, *mcu_bad],
         raw(firmware.load, board_key, *board, current), model_error),
        ("firmware.load/tagged", [mcu_body, *mcu_bad],
         tagged(firmware.load, board_key, *board, current), model_error),
        ("topics.parse", [t.encode() for t in topic_names], text(parse), ()),
        ("fleet.Fleet", json_seeds("fleet"), text(Fleet.from_json), ()),
        ("logins.Login", json_seeds("login"), text(Login.from_json), ()),
        ("freshness.Watermarks", json_seeds("marks"), text(Watermarks.from_json), ()),
        ("boards.Boards", json_seeds("boards"), text(Boards.from_json), boards_error),
    ]  # fmt: skip
    table += secagg_table(_resign)  # issue 12: both receivers of secure aggregation
    table += downlink_table(_resign)  # issue 13: the compressed downlink
    table += chunks_table(_resign)  # issue 13: big messages in chunks
    targets = {}
    for name, seeds, prepare, errors in table:
        max_len = max(4096, max(len(s) for s in seeds) + 1024)
        targets[name] = Target(name, tuple(seeds), prepare, errors or (TernError,), max_len)
    return targets


def _bind(fn: Callable[..., object], *args: object, **kwargs: object) -> Call:
    return lambda: fn(*args, **kwargs)


def _offer_checked(collector: Any, data: bytes, topic: str, *, retained: bool) -> object:
    """Collector.offer never raises, and a refusal always says why."""
    offer = collector.offer(data, topic, retained=retained)
    if offer.outcome == "rejected" and not offer.reason:
        raise AssertionError("a refused offer has no reason")
    return offer


def _view_checked(machine: Any, event: object) -> object:
    """A gateway's view never raises on what arrives, and counts every refusal it logs."""
    actions = machine.handle(event, 0.0)
    notes = [a for a in actions if type(a).__name__ == "Note"]
    if len(notes) != sum(machine.rejected.values()):
        raise AssertionError("a refused status, telemetry or view was not counted")
    return actions


def _take_checked(feed: Any, take: str, data: bytes) -> object:
    """A refused model or schedule leaves the high-water marks where they were."""
    before = feed.marks
    try:
        return feed.take_model(data) if take == "model" else feed.take_schedule(data)
    except BaseException:
        if feed.marks != before:
            raise AssertionError("a refused message moved the high-water marks") from None
        raise
