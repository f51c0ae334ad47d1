"""Federated accuracy under compression: float32 FedAvg against ternary, with and without EF.

An MLP 40-100-100-10 on MNIST-1D (10,000 samples: 8,000 train, 2,000 test), split over
20 clients by Dirichlet(0.5) label skew. Every round each client trains from the global
model with the reference trainer (kernels/reference.py) and sends its delta through the
real protocol path, in process (no MQTT):

    encode_update(codec, spec, Partial(delta * w, w, 1), residual)   # w = sample count
    Update.from_body(update.to_body()).check(spec).add_to(accumulator)

then global += mean(accumulator) (server learning rate 1). Variants:

    float32     FedAvg, Float32Codec
    ternary     TernaryCodec(rule), no error feedback (residual always None)
    ternary_ef  TernaryCodec(rule), each client keeps its residual across rounds

Test accuracy (percent) every 10 rounds. Every variant sees the same data, split and
per-client shuffles, so the differences between columns are the codec's alone. Also
reported: the mean relative squared error of one encode, ||target - sent||^2 / ||target||^2
(target = delta + residual). Error feedback needs it below 1 (a contractive compressor):
at or above 1 the residual grows instead of draining.

    python -m bench.compression [--rounds N] [--seed S] [--rule RULE] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kernels.partition import dirichlet_partition, load_mnist1d
from kernels.reference import evaluate, init_weights, mlp_spec, train_local
from tern.aggregate import Accumulator, Partial, mean
from tern.codecs import Codec, Float32Codec, TernaryCodec
from tern.messages import TrainConfig, Update, encode_update
from tern.quantize import DEFAULT_RULE, TernaryRule
from tern.spec import ModelSpec

__all__ = ["Setup", "VariantResult", "main", "make_setup", "run_variant"]

F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

LAYERS = (40, 100, 100, 10)
NUM_SAMPLES = 10_000
DATA_SEED = 42  # mnist1d's own default; the split and the model use --seed
N_CLIENTS = 20
ALPHA = 0.5
TRAIN = TrainConfig(epochs=1, batch_size=32, lr=0.5)
EVAL_EVERY = 10
VARIANTS = ("float32", "ternary", "ternary_ef")


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
    encode_error: float  # mean ||target - sent||^2 / ||target||^2 over every encode


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


def _codec(variant: str, rule: TernaryRule, seed: int) -> Codec:
    if variant == "float32":
        return Float32Codec()
    # Only the stochastic rule draws from it; seeded apart from the training streams.
    return TernaryCodec(rule, np.random.default_rng([seed, 0xC0DEC]))


def run_variant(
    setup: Setup,
    variant: str,
    rounds: int,
    rule: TernaryRule = DEFAULT_RULE,
    train: TrainConfig = TRAIN,
) -> VariantResult:
    """Test accuracy every EVAL_EVERY rounds and at the last, and the codec's error."""
    spec = setup.spec
    codec = _codec(variant, rule, setup.seed)
    feedback = variant == "ternary_ef"
    residuals: list[F32Array | None] = [None] * len(setup.clients)
    model = setup.initial.copy()
    accuracy: dict[int, float] = {}
    error_sum, encodes = 0.0, 0
    for rnd in range(1, rounds + 1):
        acc = Accumulator(spec.size)
        for cid, (x, y) in enumerate(setup.clients):  # ascending id: the fold order
            # A client's shuffle depends on (seed, round, client) only, not on the variant.
            rng = np.random.default_rng([setup.seed, rnd, cid])
            delta = train_local(spec, model, x, y, train, rng) - model
            w = float(y.size)
            partial = Partial((delta * np.float32(w)).astype(np.float32), w, 1)
            carried = residuals[cid]
            update, residual = encode_update(codec, spec, partial, carried)
            # Both per unit weight: target / w = delta + carried, (target - sent) / w = residual.
            target = delta if carried is None else delta + carried
            error_sum += float(residual @ residual) / max(float(target @ target), 1e-30)
            encodes += 1
            if feedback:
                residuals[cid] = residual
            Update.from_body(update.to_body()).check(spec).add_to(acc)
        model += mean(acc.result())
        if rnd % EVAL_EVERY == 0 or rnd == rounds:
            accuracy[rnd] = 100.0 * evaluate(spec, model, setup.x_test, setup.y_test)[1]
    return VariantResult(accuracy, error_sum / encodes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="split, init and shuffle seed")
    ap.add_argument(
        "--rule",
        type=TernaryRule,
        default=DEFAULT_RULE,
        help=f"ternary rule, one of {[str(r) for r in TernaryRule]} (default {DEFAULT_RULE})",
    )
    ap.add_argument("--json", action="store_true", help="also print one JSON object last")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    t0 = time.perf_counter()
    setup = make_setup(args.seed)
    results: dict[str, VariantResult] = {}
    seconds: dict[str, float] = {}
    for variant in VARIANTS:
        t = time.perf_counter()
        results[variant] = run_variant(setup, variant, args.rounds, args.rule)
        seconds[variant] = time.perf_counter() - t
    rounds = list(results["float32"].accuracy)

    sizes = [y.size for _, y in setup.clients]
    print(
        f"MLP {'-'.join(map(str, LAYERS))} on MNIST-1D ({setup.y_test.size} test), "
        f"{N_CLIENTS} clients Dirichlet({ALPHA}), {min(sizes)}..{max(sizes)} samples each"
    )
    print(
        f"local: {TRAIN.epochs} epoch, batch {TRAIN.batch_size}, lr {TRAIN.lr}; server lr 1.0; "
        f"rule {args.rule}; seed {args.seed}"
    )
    head = f"{'round':>5} " + " ".join(f"{v + ' %':>12}" for v in VARIANTS)
    print("test accuracy, percent")
    print(head)
    print("-" * len(head))
    for r in rounds:
        print(f"{r:>5} " + " ".join(f"{results[v].accuracy[r]:>12.2f}" for v in VARIANTS))
    print(
        "encode error ||target-sent||^2/||target||^2: "
        + " ".join(f"{results[v].encode_error:>12.4f}" for v in VARIANTS)
    )
    last = rounds[-1]
    for v in VARIANTS[1:]:
        gap = results[v].accuracy[last] - results["float32"].accuracy[last]
        print(f"round {last}: {v} - float32 = {gap:+.2f} points")
    print(
        "time: "
        + ", ".join(f"{v} {s:.1f}s" for v, s in seconds.items())
        + f", total {time.perf_counter() - t0:.1f}s"
    )
    if args.json:
        accuracy = {v: [round(results[v].accuracy[r], 2) for r in rounds] for v in VARIANTS}
        print(json.dumps({"rounds": rounds, "accuracy": accuracy}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
