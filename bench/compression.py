"""Federated accuracy and bytes under compression: every hop, in one run.

An MLP 40-100-100-10 on MNIST-1D (10,000 samples: 8,000 train, 2,000 test), split over
20 clients by Dirichlet(0.5) label skew, 2 gateways of 10 clients each. Every round each
client trains from the model it holds with the reference trainer (kernels/reference.py)
and sends its delta through the real protocol path, in process (no MQTT):

    encode_update(codec, spec, Partial(delta * w, w, 1), residual)   # w = sample count

Variants are three choices (what each hop sends):

    uplink     a device's update: float32, ternary, or sparse ternary, with or without
               the device's error feedback
    partials   what each gateway relays: none (the coordinator folds the devices: the
               exact sum, as float32 partials give), or the gateway's cohort sum
               re-quantized with its own error feedback (tern.rounds.uplink.bounded_encode)
    downlink   what devices receive: the full float32 model, or the coordinator's delta
               with its error feedback (tern.downlink.compress): the devices hold exactly
               the published model, which trails the server's

then global += mean(sum of what arrived) (FedAvg, server lr 1). Every variant sees the
same data, split and per-client shuffles, so the differences are the codecs' alone.

Bytes are the sealed messages' (signed envelopes, as on the wire): per device and
round, its update up and what it receives down (the delta or the full model, and the
schedule); per gateway and round, its partial. `vs Flower` divides Flower's 175 KB per
device and round (102 KB up, 73 KB down, for this model) by a variant's total.

    python -m bench.compression [--rounds N] [--seed S] [--density D] [--variants a,b] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey

from kernels.partition import dirichlet_partition, load_mnist1d
from kernels.reference import evaluate, init_weights, mlp_spec, train_local
from tern.aggregate import Accumulator, Partial, mean
from tern.codecs import Codec, CodecName, codec_for
from tern.downlink import compress
from tern.envelope import Envelope, Kind, seal
from tern.messages import GlobalModel, RoundSchedule, TrainConfig, Update, encode_update
from tern.rounds.publishing import seal_delta
from tern.rounds.uplink import bounded_encode
from tern.spec import ModelSpec

__all__ = ["VARIANTS", "Setup", "Variant", "VariantResult", "main", "make_setup", "run_variant"]

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

LAYERS = (40, 100, 100, 10)
NUM_SAMPLES = 10_000
DATA_SEED = 42  # mnist1d's own default; the split and the model use --seed
N_CLIENTS = 20
GATEWAYS = 2
ALPHA = 0.5
TRAIN = TrainConfig(epochs=1, batch_size=32, lr=0.5)
EVAL_EVERY = 10
DEFAULT_DENSITY = 1 / 32
FLOWER_BYTES = 175_000  # per device and round on this model: 102 KB up, 73 KB down
NORM_BOUND = 20.0  # the schedule's default max_norm, which a gateway's partial must pass
_KEY = SigningKey(bytes(32))  # the sizes of signed messages; any key gives the same


@dataclass(frozen=True, slots=True)
class Variant:
    """What each hop sends: the devices' codec (and their error feedback), the gateways'
    partials (None: exact), the coordinator's downlink (None: the full float32 model)."""

    uplink: CodecName
    feedback: bool = True
    partials: CodecName | None = None
    downlink: CodecName | None = None


VARIANTS: dict[str, Variant] = {
    "float32": Variant(CodecName.FLOAT32, feedback=False),
    "ternary": Variant(CodecName.TERNARY, feedback=False),
    "ternary_ef": Variant(CodecName.TERNARY),  # dense ternary, float32 downlink: the baseline
    "ternary_dl": Variant(CodecName.TERNARY, downlink=CodecName.TERNARY),
    "ternary_all": Variant(CodecName.TERNARY, partials=CodecName.TERNARY,
                           downlink=CodecName.TERNARY),
    "sparse_ef": Variant(CodecName.SPARSE),
    "sparse_all": Variant(CodecName.SPARSE, partials=CodecName.SPARSE,
                          downlink=CodecName.SPARSE),
}  # fmt: skip
BASELINE = "ternary_ef"


@dataclass(frozen=True, slots=True)
class Setup:
    spec: ModelSpec
    initial: F32Array
    clients: tuple[tuple[F32Array, IntArray], ...]
    x_test: F32Array
    y_test: IntArray
    seed: int


@dataclass(frozen=True, slots=True)
class VariantResult:
    accuracy: dict[int, float]  # test accuracy in percent, by round
    encode_error: float  # mean ||target - sent||^2 / ||target||^2 over every device encode
    up_bytes: float  # per device and round: its sealed update
    down_bytes: float  # per device and round: the delta (or full model) and the schedule
    partial_bytes: float  # per gateway and round: its sealed partial

    @property
    def device_bytes(self) -> float:
        return self.up_bytes + self.down_bytes


def make_setup(seed: int) -> Setup:
    data = load_mnist1d(NUM_SAMPLES, DATA_SEED)
    root = np.random.SeedSequence(seed)
    split_seed, init_seed = root.spawn(2)
    parts = dirichlet_partition(data.y, N_CLIENTS, ALPHA, np.random.default_rng(split_seed))
    spec = mlp_spec(LAYERS)
    return Setup(
        spec=spec,
        initial=init_weights(spec, np.random.default_rng(init_seed)),
        clients=tuple((data.x[p], data.y[p]) for p in parts),
        x_test=data.x_test,
        y_test=data.y_test,
        seed=seed,
    )


def _codec(name: CodecName, density: float) -> Codec:
    return codec_for(name, density=density if name is CodecName.SPARSE else None)


def _sealed(kind: Kind, sender: str, body: object) -> int:
    return len(seal(Envelope(kind, "bench", 7, 7, sender, body, run=1), _KEY))


def _schedule_bytes(v: Variant, density: float) -> int:
    sparse = CodecName.SPARSE in (v.uplink, v.partials)
    s = RoundSchedule(7, 7, v.uplink, 1.8e9, 10, partials=v.partials or CodecName.FLOAT32,
                      density=density if sparse else None, model_hash=bytes(32))  # fmt: skip
    return _sealed(Kind.SCHEDULE, "coordinator", s.to_body())


def run_variant(
    setup: Setup, v: Variant, rounds: int, density: float = DEFAULT_DENSITY
) -> VariantResult:
    """Test accuracy every EVAL_EVERY rounds and at the last, the codec's error, bytes."""
    spec = setup.spec
    up_codec = _codec(v.uplink, density)
    residuals: list[F32Array | None] = [None] * len(setup.clients)
    gw_residuals: list[F32Array | None] = [None] * GATEWAYS
    held = GlobalModel(spec, setup.initial.copy())  # what every device holds
    server = setup.initial.copy()  # the coordinator's target (== held without a downlink)
    down_residual: F32Array | None = None
    accuracy: dict[int, float] = {}
    error_sum, encodes, up, down, partial_bytes = 0.0, 0, 0, 0, 0
    schedule = _schedule_bytes(v, density)
    full = _sealed(Kind.MODEL, "coordinator", held.to_body())
    check_density = density if CodecName.SPARSE in (v.uplink, v.partials) else None
    for rnd in range(1, rounds + 1):
        cohorts = [Accumulator(spec.size) for _ in range(GATEWAYS)]
        for cid, (x, y) in enumerate(setup.clients):  # ascending id: the fold order
            # A client's shuffle depends on (seed, round, client) only, not on the variant.
            rng = np.random.default_rng([setup.seed, rnd, cid])
            delta = train_local(spec, held.weights, x, y, TRAIN, rng) - held.weights
            w = float(y.size)
            partial = Partial((delta * np.float32(w)).astype(np.float32), w, 1)
            carried = residuals[cid]
            update, residual = encode_update(up_codec, spec, partial, carried)
            target = delta if carried is None else delta + carried
            error_sum += float(residual @ residual) / max(float(target @ target), 1e-30)
            encodes += 1
            if v.feedback:
                residuals[cid] = residual
            up += _sealed(Kind.UPDATE, f"dev-{cid:02d}", update.to_body())
            wire = Update.from_body(update.to_body()).check(spec, density=check_density)
            wire.add_to(cohorts[cid % GATEWAYS])
        top = Accumulator(spec.size)
        for g, cohort in enumerate(cohorts):
            fold = cohort.result()
            if v.partials is None:
                sent, _ = encode_update(_codec(CodecName.FLOAT32, density), spec, fold)
            else:
                sent, gw_residuals[g] = bounded_encode(
                    _codec(v.partials, density), spec, fold, gw_residuals[g], NORM_BOUND,
                    check_density,
                )  # fmt: skip
            partial_bytes += _sealed(Kind.PARTIAL, f"gw-{g}", sent.to_body())
            Update.from_body(sent.to_body()).check(spec, density=check_density).add_to(top)
        server = (server + mean(top.result())).astype(np.float32)
        if v.downlink is None:
            held = GlobalModel(spec, server.copy())
            down += full + schedule
        else:
            c = compress(_codec(v.downlink, density), held, rnd - 1, server, down_residual)
            held, down_residual = c.model, c.residual
            server = held.weights + down_residual  # the target the residual keeps
            down += len(seal_delta(c.delta, "bench", rnd, rnd, 1, _KEY)) + schedule
        if rnd % EVAL_EVERY == 0 or rnd == rounds:
            accuracy[rnd] = 100.0 * evaluate(spec, held.weights, setup.x_test, setup.y_test)[1]
    n = rounds * len(setup.clients)
    return VariantResult(accuracy, error_sum / encodes, up / n, down / rounds,
                         partial_bytes / (rounds * GATEWAYS))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="split, init and shuffle seed")
    ap.add_argument("--density", type=float, default=DEFAULT_DENSITY, help="sparse: share kept")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if args.rounds < 1 or not 0 < args.density <= 1 or unknown or not names:
        ap.error(f"--rounds >= 1, --density in (0, 1], known variants {list(VARIANTS)}")

    t0 = time.perf_counter()
    setup = make_setup(args.seed)
    results: dict[str, VariantResult] = {}
    seconds: dict[str, float] = {}
    for name in names:
        t = time.perf_counter()
        results[name] = run_variant(setup, VARIANTS[name], args.rounds, args.density)
        seconds[name] = time.perf_counter() - t
    rounds = list(results[names[0]].accuracy)
    params = setup.spec.size

    sizes = [y.size for _, y in setup.clients]
    print(
        f"MLP {'-'.join(map(str, LAYERS))} ({params:,} params) on MNIST-1D "
        f"({setup.y_test.size} test), {N_CLIENTS} clients Dirichlet({ALPHA}), {min(sizes)}.."
        f"{max(sizes)} samples each, {GATEWAYS} gateways"
    )
    print(f"local: {TRAIN.epochs} epoch, batch {TRAIN.batch_size}, lr {TRAIN.lr}; server lr 1.0; "
          f"sparse density {args.density:g}; seed {args.seed}")  # fmt: skip
    print("test accuracy, percent")
    head = f"{'round':>5} " + " ".join(f"{n:>12}" for n in names)
    print(head)
    print("-" * len(head))
    for r in rounds:
        print(f"{r:>5} " + " ".join(f"{results[n].accuracy[r]:>12.2f}" for n in names))
    last = rounds[-1]
    base = results.get(BASELINE)
    print(f"\nper round: bytes per device (up, down, total), bits per parameter up, "
          f"bytes per gateway partial; round {last} accuracy against {BASELINE}")  # fmt: skip
    head = (f"{'variant':<12} {'up B':>7} {'down B':>8} {'total B':>8} {'vs Flower':>9} "
            f"{'bits/p up':>9} {'partial B':>9} {'acc %':>6} {'vs base':>7} "
            f"{'enc err':>7}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for n in names:
        res = results[n]
        gap = "" if base is None else f"{res.accuracy[last] - base.accuracy[last]:+.2f}"
        print(f"{n:<12} {res.up_bytes:>7,.0f} {res.down_bytes:>8,.0f} {res.device_bytes:>8,.0f} "
              f"{FLOWER_BYTES / res.device_bytes:>8.1f}x {8 * res.up_bytes / params:>9.3f} "
              f"{res.partial_bytes:>9,.0f} {res.accuracy[last]:>6.2f} {gap:>7} "
              f"{res.encode_error:>7.4f}")  # fmt: skip
    print("time: " + ", ".join(f"{n} {s:.1f}s" for n, s in seconds.items())
          + f", total {time.perf_counter() - t0:.1f}s")  # fmt: skip
    if args.json:
        out = {
            "rounds": rounds,
            "params": params,
            "density": args.density,
            "accuracy": {n: [round(results[n].accuracy[r], 2) for r in rounds] for n in names},
            "bytes": {
                n: {
                    "up": round(r.up_bytes, 1),
                    "down": round(r.down_bytes, 1),
                    "total": round(r.device_bytes, 1),
                    "partial": round(r.partial_bytes, 1),
                    "bits_per_param_up": round(8 * r.up_bytes / params, 4),
                    "vs_flower": round(FLOWER_BYTES / r.device_bytes, 2),
                }
                for n, r in results.items()
            },
        }
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
