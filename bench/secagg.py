"""Secure aggregation in one gateway cohort, against plain ternary in the same run.

For each cohort size N (10, 50, 100 and 500 devices; and 500 again with SecAgg+'s sparse
graph at threshold 0.51, degree 218, unless --smoke), one round of the demo's model (MLP
40-100-100-10: 15,210 parameters, vectors of 15,212 integers) runs in this process: N
`SecAggClient`s and one `SecAggServer`, every message crossing as sealed bytes opened as
the round machines open it (`open_member_message`, `open_server_message`). Each device
encodes a random delta of training scale with its sample count (`encode_contribution`:
trits under the shared scale, weight on `weight_levels` levels) and masks it in the ring
of `ring_bits(N, levels)` bits. The server's sum is checked against the plain sum of the
survivors' integer vectors (``exact``).

  device s      CPU of one device per round (median over devices; time.process_time
                around all its work: opening messages, sharing, masking, revealing)
  gateway s     CPU of the gateway per round: opening and checking every member
                message, building the stage messages, unmasking
  bits/param    the sealed SA_MASKED message (envelope, signature) * 8 / 15,210;
                plain: the sealed ternary update
  keys+shares   the rest of one device's traffic per round, both ways (median bytes):
                its keys, the roster, its shares, its inbox, the survivor list, its reveal
  round s       the round's critical path with devices in parallel (each on its own
                board) and no network: for each of the 4 stages (keys; shares; inbox,
                encode and mask; reveal and unmask), the slowest device's CPU in it plus
                the gateway's CPU for it, summed (the gateway is one process, counted
                after the slowest device though it could open early messages sooner)
  plain s       the same for plain ternary: the slowest device's encode and seal
                (tern.messages.encode_update) plus the gateway's admit and fold of all
                updates (tern.collect.Collector, ExactSum)
  30% s         30 % of the devices vanish between masking and unmasking: their masked
                vectors arrived, they never reveal (the others rebuild their self-masks)
  30% pre s     30 % vanish after sharing, before masking: their pairwise masks are
                rebuilt from the others' shares of their mask keys (the costlier path)
  serial s      (`*_serial` in JSON) the in-process wall time of the same round: every
                device's and the gateway's work one after the other on one core

The dropout rounds reuse the stages they share with the 0 % round (copies of the
server and clients at the branching stage), and add their own remaining work.

    python -m bench.secagg [--cohorts 10,50,100,500] [--sparse 500] [--threshold T]
                           [--degree K] [--seed S] [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

import numpy as np
from nacl.signing import SigningKey

from kernels.reference import mlp_spec
from tern.admit import Peer, Role, Terms
from tern.aggregate import Partial
from tern.codecs import CodecName, TernaryCodec
from tern.collect import Collector
from tern.envelope import Envelope, Kind, seal
from tern.messages import DEFAULT_MAX_NORM, encode_update
from tern.secagg import Cohort, SecAggClient, SecAggServer
from tern.secagg.ring import encode_contribution, ring_bits
from tern.secagg.terms import SecAggTerms
from tern.secagg.wire import open_member_message, open_server_message
from tern.spec import ModelSpec
from tern.topics import update

FLEET, GATEWAY, RUN, ROUND, MODEL = "bench", "gw-1", 1764500000000, 3, 2
LAYERS = (40, 100, 100, 10)
SPARSE_THRESHOLD = 0.51  # tern.secagg.graph: degree 218 at 500 members (complete at 0.6)
KEYS, SHARES, MASKS, REVEALS = range(4)  # the stages; each ends with the gateway's advance
T = TypeVar("T")


@dataclass
class Clock:
    """Serial wall seconds, and CPU seconds per actor per stage of the protocol."""

    stage: int = KEYS
    wall: float = 0.0
    cpu: dict[str, dict[int, float]] = field(default_factory=dict)

    def run(self, actor: str, fn: Callable[[], T]) -> T:
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        spent = self.cpu.setdefault(actor, {})
        spent[self.stage] = spent.get(self.stage, 0.0) + time.process_time() - c
        self.wall += time.perf_counter() - w
        return out

    def fork(self) -> Clock:
        return Clock(self.stage, self.wall, {a: dict(s) for a, s in self.cpu.items()})

    def absorb(self, other: Clock) -> None:
        self.wall += other.wall
        for actor, stages in other.cpu.items():
            mine = self.cpu.setdefault(actor, {})
            for stage, seconds in stages.items():
                mine[stage] = mine.get(stage, 0.0) + seconds

    def total(self, actor: str) -> float:
        return sum(self.cpu.get(actor, {}).values())

    def critical(self) -> float:
        """Devices in parallel: per stage, the slowest device, then the gateway."""
        slowest: dict[int, float] = {}
        for actor, stages in self.cpu.items():
            for stage, seconds in stages.items():
                if actor != GATEWAY:
                    slowest[stage] = max(slowest.get(stage, 0.0), seconds)
        return sum(slowest.values()) + self.total(GATEWAY)


@dataclass
class Fleet:
    spec: ModelSpec
    members: tuple[str, ...]
    keys: dict[str, SigningKey]
    gateway: SigningKey
    deltas: dict[str, np.ndarray]
    samples: dict[str, int]


def _fleet(n: int, seed: int) -> Fleet:
    rng = np.random.default_rng(seed)
    members = tuple(f"dev-{i:04d}" for i in range(n))
    keys = {m: SigningKey(rng.bytes(32)) for m in members}
    spec = mlp_spec(LAYERS)
    deltas = {m: (rng.standard_normal(spec.size) * 0.01).astype(np.float32) for m in members}
    samples = {m: int(rng.integers(50, 1000)) for m in members}
    return Fleet(spec, members, keys, SigningKey(rng.bytes(32)), deltas, samples)


def plain_round(f: Fleet) -> dict[str, float]:
    """Plain ternary: devices encode and seal, the gateway admits and folds."""
    clock = Clock()
    terms = Terms(FLEET, RUN, ROUND, MODEL, CodecName.TERNARY, f.spec, DEFAULT_MAX_NORM)
    peers = {m: Peer(m, Role.DEVICE, k.verify_key, 1, 1e6) for m, k in f.keys.items()}
    collector = Collector(terms=terms, peers=peers)
    sizes = []
    for m in f.members:

        def device(m: str = m) -> bytes:
            s = float(f.samples[m])
            summed = Partial((f.deltas[m] * np.float32(s)).astype(np.float32), s, 1)
            upd, _ = encode_update(TernaryCodec(), f.spec, summed)
            env = Envelope(Kind.UPDATE, FLEET, ROUND, MODEL, m, upd.to_body(), run=RUN)
            return seal(env, f.keys[m])

        def gateway(m: str = m, data: bytes = b"") -> None:
            offer = collector.offer(data, update(FLEET, GATEWAY, m))
            assert offer.reason == "", offer.reason

        data = clock.run(m, device)
        sizes.append(len(data))
        clock.run(GATEWAY, partial(gateway, m, data))
    total = clock.run(GATEWAY, collector.close)
    assert total.count == len(f.members)
    return {
        "round_s_plain": clock.critical(),
        "round_s_plain_serial": clock.wall,
        "device_cpu_s_plain": statistics.median(clock.total(m) for m in f.members),
        "gateway_cpu_s_plain": clock.total(GATEWAY),
        "bits_per_param_plain": statistics.median(sizes) * 8 / f.spec.size,
    }


class SecAggRun:
    """One cohort's secure round, with its stages branching for dropouts."""

    def __init__(self, f: Fleet, terms: SecAggTerms, seed: int) -> None:
        n = len(f.members)
        self.f, self.terms = f, terms
        self.cohort = Cohort.from_terms(
            terms, fleet=FLEET, run=RUN, round=ROUND, model_version=MODEL, server=GATEWAY,
            members=f.members, keys={m: k.verify_key for m, k in f.keys.items()},
            server_key=f.gateway.verify_key, seed=seed, length=f.spec.size + 2,
            bits=ring_bits(n, terms.weight_levels),
        )  # fmt: skip
        rng = np.random.default_rng(seed + 1)
        self.clients = {
            m: SecAggClient(self.cohort, m, f.keys[m], randomness=rng.bytes) for m in f.members
        }
        self.server = SecAggServer(self.cohort, f.gateway)
        self.xs: dict[str, np.ndarray] = {}
        self.traffic = {m: 0 for m in f.members}

    def offer(self, server: SecAggServer, clock: Clock, messages: dict[str, bytes]) -> None:
        for m, data in messages.items():

            def gateway(m: str = m, data: bytes = data) -> None:
                server.offer(m, open_member_message(data, self.cohort, m), data)

            clock.run(GATEWAY, gateway)

    def deliver(
        self, clients: dict[str, SecAggClient], out: dict[str, bytes], to: Iterable[str],
        clocks: dict[str, Clock], count: bool = True,
    ) -> dict[str, bytes]:  # fmt: skip
        """Each member in `to` opens and takes its message; its time goes to clocks[m]."""
        answers = {}
        for m in to:
            client, data = clients[m], out[m]

            def device(client: SecAggClient = client, data: bytes = data) -> bytes | None:
                return client.take(open_server_message(data, self.cohort, client.me))

            answer = clocks[m].run(m, device)
            if count:
                self.traffic[m] += len(data) + (len(answer) if answer else 0)
            if answer is not None:
                answers[m] = answer
        return answers

    def mask(self, m: str) -> bytes:
        x, _ = encode_contribution(
            self.f.spec, self.f.deltas[m], self.f.samples[m], None, self.terms, None,
            len(self.f.members), None,
        )  # fmt: skip
        self.xs[m] = x
        return self.clients[m].mask(x)

    def finish(self, server: SecAggServer, clock: Clock) -> tuple[bool, float]:
        """Unmask: whether the sum is exact, and the gateway's CPU seconds for it."""
        before = clock.total(GATEWAY)
        clock.run(GATEWAY, server.advance)
        expected = sum(self.xs[m] for m in server.survivors)
        return bool(np.array_equal(server.result(), expected)), clock.total(GATEWAY) - before

    def _copy(self, value: T) -> T:
        return copy.deepcopy(value, {id(self.cohort): self.cohort})

    def run(self, dropout: float) -> dict[str, float]:
        members, clock = self.f.members, Clock()
        every = {m: clock for m in members}
        keys = {m: clock.run(m, self.clients[m].advertise) for m in members}
        for m, data in keys.items():
            self.traffic[m] += len(data)
        self.offer(self.server, clock, keys)
        out = clock.run(GATEWAY, self.server.advance)  # rosters
        clock.stage = SHARES
        self.offer(self.server, clock, self.deliver(self.clients, out, members, every))
        out = clock.run(GATEWAY, self.server.advance)  # inboxes
        clock.stage = MASKS
        self.deliver(self.clients, out, members, every)
        step = max(1, round(1 / dropout)) if dropout > 0 else len(members) + 1
        gone = set(members[::step][: round(dropout * len(members))])
        staying = [m for m in members if m not in gone]
        own = {m: Clock(MASKS) for m in members}
        masked = {m: own[m].run(m, partial(self.mask, m)) for m in members}
        # branch 1: the dropped never mask, the others go on to the end
        pre = clock.fork()
        pre_server = self._copy(self.server)
        pre_clients = {m: self._copy(self.clients[m]) for m in staying}
        for m in staying:
            pre.absorb(own[m])
        self.offer(pre_server, pre, {m: masked[m] for m in staying})
        out = pre.run(GATEWAY, pre_server.advance)  # survivor lists without the dropped
        pre.stage = REVEALS
        answers = self.deliver(pre_clients, out, staying, {m: pre for m in staying}, count=False)
        self.offer(pre_server, pre, answers)
        exact_pre, unmask_pre = self.finish(pre_server, pre)
        # the main line: everyone masks and reveals; branch 2: the dropped never reveal
        for m in members:
            clock.absorb(own[m])
        self.offer(self.server, clock, masked)
        out = clock.run(GATEWAY, self.server.advance)  # survivor lists: everyone
        clock.stage = REVEALS
        post, post_server = clock.fork(), self._copy(self.server)
        own = {m: Clock(REVEALS) for m in members}
        reveals = self.deliver(self.clients, out, members, own)
        for m in members:
            clock.absorb(own[m])
            if m not in gone:
                post.absorb(own[m])
        self.offer(self.server, clock, reveals)
        exact, unmask = self.finish(self.server, clock)
        self.offer(post_server, post, {m: reveals[m] for m in staying})
        exact_post, unmask_post = self.finish(post_server, post)
        size = statistics.median(len(d) for d in masked.values())
        return {
            "bits_per_param": size * 8 / self.f.spec.size,
            "device_cpu_s": statistics.median(clock.total(m) for m in members),
            "gateway_cpu_s": clock.total(GATEWAY),
            "round_s": clock.critical(),
            "round_s_serial": clock.wall,
            "round_s_30pct_dropout": post.critical(),
            "round_s_30pct_dropout_serial": post.wall,
            "gateway_cpu_s_30pct_dropout": post.total(GATEWAY),
            "round_s_30pct_dropout_before_mask": pre.critical(),
            "round_s_30pct_dropout_before_mask_serial": pre.wall,
            "gateway_cpu_s_30pct_dropout_before_mask": pre.total(GATEWAY),
            "unmask_s": unmask,
            "unmask_s_30pct_dropout": unmask_post,
            "unmask_s_30pct_dropout_before_mask": unmask_pre,
            "masked_bytes": size,
            "key_share_bytes": statistics.median(self.traffic.values()),  # masked not in it
            "survivors_30pct": len(staying),
            "ring_bits": self.cohort.bits,
            "degree": self.cohort.widest,
            "threshold": self.terms.threshold,
            "exact": float(exact and exact_pre and exact_post),
        }


def _csv_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _table(results: dict[str, dict[str, float]]) -> None:
    head = (
        f"{'devices':>10} {'degree':>6} {'t':>4} {'bits':>4} {'device s':>8} {'gateway s':>9} "
        f"{'bits/param':>10} {'plain':>5} {'keys+shares':>11} {'round s':>7} {'plain s':>7} "
        f"{'30% s':>6} {'30% pre s':>9} {'exact':>5}"
    )
    print("round s, plain s, 30% s, 30% pre s: critical path, devices in parallel, no network")
    print(head + "\n" + "-" * len(head))
    label = {k: f"{int(k.split('_')[0]):,}{' sparse' if '_' in k else ''}" for k in results}
    for k, r in results.items():
        print(
            f"{label[k]:>10} {int(r['degree']):>6} {r['threshold']:>4} {int(r['ring_bits']):>4} "
            f"{r['device_cpu_s']:>8.3f} {r['gateway_cpu_s']:>9.3f} {r['bits_per_param']:>10.3f} "
            f"{r['bits_per_param_plain']:>5.3f} {int(r['key_share_bytes']):>11,} "
            f"{r['round_s']:>7.3f} {r['round_s_plain']:>7.3f} {r['round_s_30pct_dropout']:>6.3f} "
            f"{r['round_s_30pct_dropout_before_mask']:>9.3f} {'yes' if r['exact'] else 'NO':>5}"
        )
    print("serial s: in-process wall time, all devices and the gateway one after the other")
    print("on one core (0 % / plain / 30 % / 30 % pre); gateway unmask CPU s (0 / 30 / 30 pre)")
    serial = ("", "_plain", "_30pct_dropout", "_30pct_dropout_before_mask")
    unmask = ("", "_30pct_dropout", "_30pct_dropout_before_mask")
    for k, r in results.items():
        print(
            f"{label[k]:>10} " + " ".join(f"{r['round_s' + x + '_serial']:>8.2f}" for x in serial)
            + "  " + " ".join(f"{r['unmask_s' + x]:>7.3f}" for x in unmask)
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cohorts", type=_csv_ints, default=[10, 50, 100, 500], help="sizes")
    sparse_help = f"sizes run again at threshold {SPARSE_THRESHOLD}, degree chosen (not --smoke)"
    ap.add_argument("--sparse", type=_csv_ints, default=[500], help=sparse_help)
    ap.add_argument("--threshold", type=float, default=None, help="default: the schedule's")
    ap.add_argument("--degree", type=int, default=0, help="masking graph; 0: chosen by size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny cohorts (4, 7), for CI")
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    cohorts, sparse = ([4, 7], []) if args.smoke else (args.cohorts, args.sparse)
    if min(cohorts + sparse) < 2:
        ap.error("--cohorts and --sparse must be >= 2")
    spec = mlp_spec(LAYERS)
    terms = SecAggTerms(scales=(0.01,) * len(spec.tensors), degree=args.degree)
    if args.threshold is not None:
        terms = replace(terms, threshold=args.threshold)
    runs = [(str(n), n, terms) for n in cohorts]
    sparse_terms = replace(terms, threshold=SPARSE_THRESHOLD, degree=0)
    runs += [(f"{n}_sparse", n, sparse_terms) for n in sparse]

    results: dict[str, dict[str, float]] = {}
    for key, n, t in runs:
        f = _fleet(n, args.seed)
        results[key] = {**SecAggRun(f, t, args.seed).run(0.3), **plain_round(f)}

    print(
        f"secure aggregation benchmark: MLP {'-'.join(map(str, LAYERS))} ({spec.size:,} "
        f"parameters), one cohort, threshold t {terms.threshold} (sparse rows "
        f"{SPARSE_THRESHOLD}), weights on {terms.weight_levels} levels"
    )
    _table(results)
    if "100" in results:
        b = results["100"]["bits_per_param"]
        print(
            f"target: <= 12 bits/param at 100 devices: {b:.3f} ({'met' if b <= 12 else 'missed'})"
        )
    if args.json:
        out = {
            "cohorts": {
                k: {m: (bool(v) if m == "exact" else round(v, 6)) for m, v in r.items()}
                for k, r in results.items()
            },
            "params": spec.size,
            "threshold": terms.threshold,
            "sparse_threshold": SPARSE_THRESHOLD,
        }
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
