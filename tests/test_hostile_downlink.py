"""The compressed downlink under hostile input: bench.hostile's part d (a device's and a
gateway's model follower, smoke size) and the invariants bench.fuzz checks on them."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

from bench.fuzz_downlink import downlink_table
from bench.fuzz_engine import sample
from bench.fuzz_targets import Target, _resign
from bench.hostile import main
from bench.hostile_classes import RUN, demo_fleet
from bench.hostile_downlink import BASELINES, RECEIVERS, VERSION, Downlink, downlink_costs
from tern.downlink import delta_caps, model_hash
from tern.envelope import Kind, open_envelope
from tern.errors import TernError
from tern.freshness import Stamp
from tern.messages import GlobalModel
from tern.rounds import follow

# a word of each downlink class of the brief
BRIEF = ("forged delta", "replayed delta", "another base", "lying about its hash",
         "oversize delta", "unlike the signed hash", "another gateway", "by a device")  # fmt: skip


@pytest.fixture(scope="module")
def world() -> Downlink:
    fleet, keys = demo_fleet(0)
    return Downlink(fleet, keys)


@pytest.fixture(scope="module")
def costs(world: Downlink) -> dict[str, Any]:
    return downlink_costs(world, repeat=1, samples=1)


def test_every_downlink_class_is_refused_with_its_reason_counted_once_and_models_kept(
    costs: dict[str, Any],
) -> None:
    classes = costs["classes"]

    wrong = {n: (c["reason"], c["expected"]) for n, c in classes.items()
             if c["reason"] != c["expected"]}  # fmt: skip
    uncounted = [n for n, c in classes.items() if not c["counted"]]
    changed = [n for n, c in classes.items() if not c["kept"]]

    assert len(classes) >= 12
    assert not wrong and not uncounted and not changed
    assert {c["counter"] for c in classes.values()} >= {
        "delta_bad_signature", "delta_stale", "delta_base_mismatch", "delta_hash_mismatch",
        "delta_oversize", "model_hash_mismatch", "model_bad_signature",
    }  # fmt: skip


def test_the_downlink_classes_of_the_brief_are_measured_at_both_receivers(
    costs: dict[str, Any],
) -> None:
    for receiver in RECEIVERS:
        names = " | ".join(n for n, c in costs["classes"].items() if c["receiver"] == receiver)
        missing = [w for w in BRIEF if w not in names and w != "unlike the signed hash"]
        assert not missing, receiver
    assert any("unlike the signed hash" in n for n in costs["classes"])


def test_each_ratio_is_against_a_valid_message_of_its_size_at_the_same_receiver(
    costs: dict[str, Any], world: Downlink
) -> None:
    sizes = costs["message_bytes"]

    for name, c in costs["classes"].items():
        against = costs["accept_us"][c["receiver"]][c["baseline"]]
        assert c["baseline"] in BASELINES[c["receiver"]], name
        assert c["ratio"] == pytest.approx(c["refuse_us"] / against, rel=0.01, abs=0.002), name
        if c["reason"] == "oversize":  # past the largest delta; measured against that one
            assert c["bytes"] > delta_caps(world.spec).max_bytes >= sizes[c["baseline"]]
        else:
            assert abs(c["bytes"] - sizes[c["baseline"]]) <= 0.02 * sizes[c["baseline"]], name


def test_after_any_refusal_the_follower_still_takes_the_valid_next_model(
    world: Downlink,
) -> None:
    for c in world.classes():
        f = world.follower(c.receiver)
        with pytest.raises(TernError) as err:
            if c.baseline.startswith("delta"):
                f.on_delta(c.data)
            else:
                f.on_full(c.data)
        full = world.valid["full" if c.receiver == "device" else "full_coordinator"]
        delta = c.baseline.startswith("delta")

        adopted = f.on_delta(world.valid["delta"])[1] if delta else f.on_full(full)

        assert err.value.reason == c.reason, c.name
        assert [a.stamp for a in adopted] == [Stamp(RUN, VERSION)], c.name
        held = f.model(Stamp(RUN, VERSION))
        assert held is not None
        assert model_hash(held.spec, held.weights) == model_hash(
            world.spec, world.models[VERSION].weights
        )


def test_part_d_prints_its_table_and_joins_the_json_object_last() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--repeat", "1", "--samples", "1", "--skip-gateway", "--skip-secagg",
                     "--json"])  # fmt: skip

    lines = out.getvalue().strip().splitlines()
    result = json.loads(lines[-1])
    assert code == 0
    assert any(line.startswith("part d: the compressed downlink") for line in lines)
    assert result["accept_us"] > 0 and result["classes"]  # part a's keys as they were
    d = result["downlink"]
    assert set(d["accept_us"]) == set(RECEIVERS)
    assert all(c["reason"] == c["expected"] and c["counted"] for c in d["classes"].values())


def test_the_fuzz_job_has_both_receivers_and_the_delta_body() -> None:
    from bench.fuzz_targets import build_targets

    names = set(build_targets())

    assert {"follow.on_delta", "follow.on_delta/signed", "follow.on_full",
            "follow.on_full/signed", "body.ModelDelta"} <= names  # fmt: skip


def _targets() -> dict[str, Target]:
    return {name: Target(name, tuple(seeds), prepare, errors, 8192)
            for name, seeds, prepare, errors in downlink_table(_resign)}  # fmt: skip


def test_the_fuzz_invariant_catches_a_follower_that_takes_a_model_unlike_the_signed_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A follower broken to adopt whatever its parent gateway seals (the hash check
    skipped): the fuzz job reports it as a crash."""

    def trusting(self: follow.ModelFollower, data: bytes) -> list[follow.Adopted]:
        try:
            return original(self, data)
        except TernError as exc:
            if exc.reason != "hash_mismatch":
                raise
        self.feed.rejected.clear()
        env = open_envelope(data, {self.parent: self.fleet.key_of(self.parent)},
                            fleet=self.fleet.fleet, kinds=(Kind.MODEL,))  # fmt: skip
        model = GlobalModel.from_body(env.body, max_params=self.fleet.max_params)
        digest = model_hash(model.spec, model.weights)
        return self._adopt(Stamp(env.run, env.model_version), model, digest, env)

    original = follow.ModelFollower.on_full
    monkeypatch.setattr(follow.ModelFollower, "on_full", trusting)

    result = sample(_targets()["follow.on_full/signed"], 120, 0)

    assert result.crashes > 0
    assert any("signed hash" in str(c) for c in result.first_crashes)


def test_the_fuzz_invariant_catches_a_refusal_that_changes_the_model_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def careless(self: follow.ModelFollower, data: bytes) -> object:
        try:
            return original(self, data)
        except TernError:
            latest = self.latest()
            if latest is not None:
                latest[1].weights[0] += 1.0
            raise

    original = follow.ModelFollower.on_delta
    monkeypatch.setattr(follow.ModelFollower, "on_delta", careless)

    result = sample(_targets()["follow.on_delta"], 60, 0)

    assert result.crashes > 0
    assert any("changed the models held" in str(c) for c in result.first_crashes)
