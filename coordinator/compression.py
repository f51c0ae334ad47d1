"""The coordinator's compression options on the command line (`tern coordinator`, `tern
demo`): the codec gateways send their partials in, how models go down (deltas in a codec,
with the coordinator's error feedback: tern.downlink; or full models), and a sparse
codec's density.

The library's default is the exact float32 partial (`tern.rounds.opening.RoundSettings`);
the command line's is ternary, compact (about one device update per gateway and round),
except under central differential privacy, whose noise needs exact sums
(`tern.rounds.uplink.partials_conflict`).
"""

from __future__ import annotations

import argparse
import math

from tern.codecs import CodecName
from tern.privacy.terms import DpTerms, Noise
from tern.rounds.uplink import partials_conflict

__all__ = [
    "add_compression_arguments",
    "compression_refusal",
    "default_partials",
    "downlink_from_args",
    "partials_from_args",
]

FULL = "full"  # --downlink full: the whole float32 model every round


def add_compression_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    g.add_argument(
        "--partial-codec",
        choices=[str(c) for c in CodecName],
        default=None,
        help="how gateways encode their partials, with their own error feedback (default: "
        "ternary; float32, the exact sum, under central differential privacy)",
    )
    g.add_argument(
        "--downlink",
        choices=[FULL, *(str(c) for c in CodecName)],
        default=str(CodecName.TERNARY),
        help="how models go down: deltas in this codec with the coordinator's error "
        "feedback (default: ternary; every device holds exactly the coordinator's model "
        "bytes, checked by a signed hash), or 'full': the float32 model every round",
    )
    g.add_argument(
        "--density",
        type=float,
        default=None,
        help="the share of a tensor's entries a sparse codec keeps, in (0, 1]; required with "
        "a sparse --codec or --partial-codec",
    )


def default_partials(dp: DpTerms | None) -> CodecName:
    """The command line's partials codec under `dp`: ternary, or float32 (exact) under
    central noise."""
    central = dp is not None and dp.noise is Noise.CENTRAL
    return CodecName.FLOAT32 if central else CodecName.TERNARY


def partials_from_args(args: argparse.Namespace, dp: DpTerms | None) -> CodecName:
    """The partials' codec the command line asks for (`dp`: the privacy options' terms,
    their noise not yet calibrated)."""
    if args.partial_codec is not None:
        return CodecName(args.partial_codec)
    return default_partials(dp)


def downlink_from_args(args: argparse.Namespace) -> CodecName | None:
    """The codec of the coordinator's deltas the command line asks for; None: full models."""
    return None if args.downlink == FULL else CodecName(args.downlink)


def compression_refusal(
    codec: CodecName,
    partials: CodecName,
    density: float | None,
    dp: DpTerms | None,
    downlink: CodecName | None = None,
) -> tuple[str, str] | None:
    """(the option, why) when these cannot run together; None when they can."""
    sparse = CodecName.SPARSE in (codec, partials, downlink)
    if sparse and density is None:
        return "density", "a sparse codec needs a density (--density)"
    if not sparse and density is not None:
        return (
            "density",
            "a density is only for a sparse codec (--codec, --partial-codec, --downlink)",
        )
    if density is not None and not (math.isfinite(density) and 0 < density <= 1):
        return "density", f"must be in (0, 1], got {density!r}"
    conflict = partials_conflict(partials, dp)
    return None if conflict is None else ("partials", conflict)
