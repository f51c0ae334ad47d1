"""A sample of the fuzz job (`python -m bench.fuzz`): every decoder, a few hundred inputs.

The random engine, in this process: every seed (valid messages and the hostile shapes of
issue 9) once, then random mutations of them and random bytes. The full coverage-guided
run (100,000 inputs per decoder) is `python -m bench.fuzz`, outside the test run.
"""

from __future__ import annotations

import functools

import pytest

from bench.fuzz import Result, Target, build_targets, run_one, sample
from bench.fuzz_secagg import Checked

INPUTS = 200
SEED = 0
TOO_SLOW_MS = 50.0  # the full run's target is 10 ms; room here for a busy CI machine


@functools.cache
def targets() -> dict[str, Target]:
    return build_targets()


@functools.cache
def sampled(name: str) -> Result:
    return sample(targets()[name], INPUTS, SEED)


@pytest.mark.parametrize("name", sorted(targets()))
def test_a_decoder_raises_only_its_own_error_on_fuzzed_input(name: str) -> None:
    result = sampled(name)

    assert result.inputs == INPUTS
    assert result.crashes == 0, result.first_crashes


@pytest.mark.parametrize("name", sorted(targets()))
def test_no_fuzzed_input_takes_long(name: str) -> None:
    target = targets()[name]
    slowest = sorted(sampled(name).slowest, reverse=True)[:3]

    # Again, the best of three, so that a busy machine's pause is not the decoder's cost.
    worst_ms = max(min(run_one(target, data)[0] for _ in range(3)) for _, _, data in slowest) / 1e6

    assert worst_ms < TOO_SLOW_MS


def test_the_sample_is_the_same_for_a_seed_and_differs_for_another() -> None:
    target = targets()["admit.admit/signed"]

    first, again, other = (sample(target, 100, s) for s in (SEED, SEED, SEED + 1))

    assert first.digest.hexdigest() == again.digest.hexdigest()
    assert first.digest.hexdigest() != other.digest.hexdigest()


def test_every_decoder_of_the_brief_is_fuzzed() -> None:
    names = set(targets())

    assert {
        "envelope.open",
        "messages.open_model",
        "messages.open_schedule",
        "messages.open_kernel",
        "admit.admit",
        "collect.offer",
        "feed.take_model",
        "feed.take_schedule",
        "body.GlobalModel",
        "body.RoundSchedule",
        "body.Update",
        "body.Failure",
        "body.KernelFile",
        "body.ModelSpec",
        "reports.Status",
        "reports.RoundMetrics",
        "reports.Telemetry",
        "reports.FleetView",
        "fleetview.ViewMachine",
        "mcu.open_mcu",
        "firmware.load",
        "topics.parse",
        "fleet.Fleet",
        "logins.Login",
        "boards.Boards",
        "freshness.Watermarks",
    } <= names


def test_every_secure_aggregation_receiver_and_body_is_fuzzed_at_each_stage() -> None:
    names = set(targets())

    gateway = {f"secagg.round.{s}{v}" for s in ("keys", "shares", "masked", "reveal")
               for v in ("", "/signed")}  # fmt: skip
    member = {f"secagg.member.{k}{v}" for k in ("roster", "inbox", "survivors")
              for v in ("", "/signed")}  # fmt: skip
    bodies = {f"body.sa_{k}" for k in ("keys", "roster", "shares", "inbox", "masked",
                                         "survivors", "reveal")}  # fmt: skip
    assert gateway | member | bodies <= names


def test_a_receiver_that_stops_working_after_an_input_is_a_crash() -> None:
    def broken() -> None:
        raise AssertionError("the round did not close")

    target = Target("t", (b"",), lambda data: Checked(lambda: None, broken), (ValueError,), 8)

    _, exc = run_one(target, b"x")

    assert isinstance(exc, AssertionError)
