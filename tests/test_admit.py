"""The trust boundary (tern.admit): what a sender's role lets it contribute, and no more."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tern.admit import Peer, Role, Terms, admit, peers_of
from tern.aggregate import Partial
from tern.caps import contribution_caps, largest_message
from tern.codecs import CodecName, Float32Codec, TernaryCodec, codec_for
from tern.envelope import Envelope, Kind, seal
from tern.errors import TernError
from tern.fleet import COORDINATOR
from tern.messages import Bounds, Failure, RoundSchedule, TrainConfig, Update, encode_update
from tern.spec import ModelSpec
from tern.topics import partial as partial_topic
from tern.topics import update as update_topic
from tests.fleet_fixtures import FleetKit, build_fleet

SPEC = ModelSpec.of({"w": (4, 3), "b": (3,)})
RUN, ROUND, MODEL = 1_764_000_000_000, 7, 6
LAYOUT = {
    "gw-1": (COORDINATOR, ["dev-1", "dev-2", "dev-3"]),
    "gw-1a": ("gw-1", ["dev-4", "dev-5"]),
}


@pytest.fixture(scope="module")
def kit() -> FleetKit:
    return build_fleet(LAYOUT, "plant-7", max_weight={"dev-2": 50.0})


def schedule(**changes: object) -> RoundSchedule:
    s = RoundSchedule(
        round=ROUND,
        model_version=MODEL,
        codec=CodecName.TERNARY,
        deadline=1.0,
        min_contributors=1,
        train=TrainConfig(),
        bounds=Bounds(max_weight=500.0, max_norm=4.0),
    )
    return replace(s, **changes)  # type: ignore[arg-type]


def terms(s: RoundSchedule | None = None) -> Terms:
    return Terms.of("plant-7", RUN, s or schedule(), SPEC)


def delta(scale: float = 1.0, seed: int = 0) -> np.ndarray:
    d = np.random.default_rng(seed).standard_normal(SPEC.size).astype(np.float32)
    return (d / np.linalg.norm(d) * scale).astype(np.float32)  # norm == scale


def sealed(
    kit: FleetKit,
    sender: str,
    body: object,
    *,
    kind: Kind = Kind.UPDATE,
    signer: str | None = None,
    **fields: object,
) -> bytes:
    env = Envelope(kind, "plant-7", ROUND, MODEL, sender, body, run=RUN)
    return seal(replace(env, **fields), kit.keys[signer or sender])  # type: ignore[arg-type]


def device_update(
    weight: float = 100.0, norm: float = 2.0, codec: CodecName = CodecName.TERNARY, count: int = 1
) -> dict[str, object]:
    p = Partial((delta(norm) * np.float32(weight)).astype(np.float32), weight, count)
    update, _ = encode_update(codec_for(codec), SPEC, p)
    return update.to_body()


def gateway_partial(weight: float = 200.0, count: int = 2, failed: dict[str, int] | None = None):
    p = Partial((delta(1.0) * np.float32(weight)).astype(np.float32), weight, count)
    update, _ = encode_update(Float32Codec(), SPEC, p)
    return replace(update, failed=failed or {}).to_body()


def peer(kit: FleetKit, sender: str, receiver: str = "gw-1") -> Peer:
    return peers_of(kit.fleet, receiver, schedule())[sender]


def admit_device(kit: FleetKit, data: bytes, sender: str = "dev-1", t: Terms | None = None):
    return admit(data, update_topic("plant-7", "gw-1", sender), peer(kit, sender), t or terms())


def admit_gateway(kit: FleetKit, data: bytes):
    return admit(data, partial_topic("plant-7", "gw-1", "gw-1a"), peer(kit, "gw-1a"), terms())


def refusal(fn: object, *args: object) -> str:
    with pytest.raises(TernError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.reason


# -- who a receiver expects ------------------------------------------------------------


def test_peers_are_the_participating_devices_and_child_gateways_with_their_bounds(
    kit: FleetKit,
) -> None:
    peers = peers_of(kit.fleet, "gw-1", schedule(participants=("dev-2", "dev-3", "dev-5")))

    assert sorted(peers) == ["dev-2", "dev-3", "gw-1a"]
    assert (peers["dev-2"].role, peers["dev-2"].devices, peers["dev-2"].max_weight) == (
        Role.DEVICE,
        1,
        50.0,  # the fleet file's own bound for dev-2
    )
    assert peers["dev-3"].max_weight == 500.0  # the schedule's default
    assert (peers["gw-1a"].role, peers["gw-1a"].devices, peers["gw-1a"].max_weight) == (
        Role.GATEWAY,
        1,
        500.0,
    )


def test_the_coordinator_expects_its_gateways_with_every_device_below_them(kit: FleetKit) -> None:
    peers = peers_of(kit.fleet, COORDINATOR, schedule())

    assert list(peers) == ["gw-1"]
    assert peers["gw-1"].devices == 5
    assert peers["gw-1"].max_weight == 4 * 500.0 + 50.0


# -- what is accepted -------------------------------------------------------------------


def test_a_device_update_within_every_bound_is_admitted(kit: FleetKit) -> None:
    c = admit_device(kit, sealed(kit, "dev-1", device_update()))

    assert c.update is not None and c.update.count == 1 and c.update.weight == 100.0


def test_a_device_failure_of_one_is_admitted(kit: FleetKit) -> None:
    body = Failure({"kernel_trap": 1}).to_body()

    c = admit_device(kit, sealed(kit, "dev-1", body, kind=Kind.FAILURE))

    assert c.failure is not None and c.failed == {"kernel_trap": 1}


def test_a_gateway_partial_within_its_subtree_is_admitted(kit: FleetKit) -> None:
    data = sealed(kit, "gw-1a", gateway_partial(), kind=Kind.PARTIAL)

    c = admit_gateway(kit, data)

    assert c.update is not None and c.update.count == 2


# -- what is refused, and why -----------------------------------------------------------


def test_a_device_may_not_sign_a_partial_with_a_large_count(kit: FleetKit) -> None:
    data = sealed(kit, "dev-1", device_update(count=1000), kind=Kind.PARTIAL)

    assert refusal(admit_device, kit, data) == "wrong_kind"


def test_a_device_update_must_count_one(kit: FleetKit) -> None:
    data = sealed(kit, "dev-1", device_update(weight=1000.0, count=2))

    assert refusal(admit_device, kit, data) == "count_bound"


def test_a_device_failure_must_tally_one(kit: FleetKit) -> None:
    data = sealed(kit, "dev-1", Failure({"late": 3}).to_body(), kind=Kind.FAILURE)

    assert refusal(admit_device, kit, data) == "count_bound"


@pytest.mark.parametrize("weight", [1e30, 501.0, 0.5, 5e-324])
def test_a_device_weight_outside_its_bound_is_refused(kit: FleetKit, weight: float) -> None:
    body = device_update()
    body["weight"] = weight

    assert refusal(admit_device, kit, sealed(kit, "dev-1", body)) == "weight_bound"


def test_the_fleet_files_own_device_bound_wins_over_the_schedules(kit: FleetKit) -> None:
    data = sealed(kit, "dev-2", device_update(weight=60.0))

    assert refusal(admit_device, kit, data, "dev-2") == "weight_bound"


def test_an_update_scaled_by_a_hundred_is_refused_by_its_norm(kit: FleetKit) -> None:
    data = sealed(kit, "dev-1", device_update(norm=2.0 * 100))

    assert refusal(admit_device, kit, data) == "norm_bound"


@pytest.mark.parametrize("codec", [CodecName.FLOAT32, CodecName.FLOAT16])
def test_a_device_must_use_the_schedules_codec(kit: FleetKit, codec: CodecName) -> None:
    data = sealed(kit, "dev-1", device_update(codec=codec))

    assert refusal(admit_device, kit, data) == "wrong_codec"


def test_an_update_made_from_another_model_version_is_refused(kit: FleetKit) -> None:
    data = sealed(kit, "dev-1", device_update(), model_version=MODEL - 1)

    assert refusal(admit_device, kit, data) == "wrong_model"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"round": ROUND - 1}, "stale_round"),
        ({"round": ROUND + 1}, "future_round"),
        ({"run": RUN - 1}, "stale_run"),
        ({"run": RUN + 1}, "future_run"),
        ({"fleet": "plant-8"}, "wrong_fleet"),
    ],
)
def test_an_update_of_another_round_run_or_fleet_is_refused(
    kit: FleetKit, fields: dict[str, object], reason: str
) -> None:
    data = sealed(kit, "dev-1", device_update(), **fields)

    assert refusal(admit_device, kit, data) == reason


def test_an_update_signed_by_another_device_on_this_ones_topic_is_refused(kit: FleetKit) -> None:
    data = sealed(kit, "dev-2", device_update())

    assert refusal(admit_device, kit, data, "dev-1") == "wrong_sender"


def test_an_update_signed_with_another_key_in_the_senders_name_is_refused(kit: FleetKit) -> None:
    data = sealed(kit, "dev-1", device_update(), signer="dev-2")

    assert refusal(admit_device, kit, data) == "bad_signature"


def test_a_device_update_on_a_partial_topic_is_refused(kit: FleetKit) -> None:
    data = sealed(kit, "dev-1", device_update())

    reason = refusal(admit, data, partial_topic("plant-7", "gw-1", "dev-1"), peer(kit, "dev-1"),
                     terms())  # fmt: skip
    assert reason == "wrong_topic"


def test_a_gateway_partial_may_not_count_more_than_its_subtree(kit: FleetKit) -> None:
    data = sealed(kit, "gw-1a", gateway_partial(count=3, weight=300.0), kind=Kind.PARTIAL)

    reason = refusal(admit_gateway, kit, data)
    assert reason == "count_bound"


def test_a_gateway_partial_may_not_count_failures_beyond_its_subtree(kit: FleetKit) -> None:
    body = gateway_partial(count=2, failed={"late": 1})

    reason = refusal(admit_gateway, kit, sealed(kit, "gw-1a", body, kind=Kind.PARTIAL))
    assert reason == "count_bound"


def test_a_gateway_partial_may_not_weigh_more_than_its_devices_bounds(kit: FleetKit) -> None:
    data = sealed(kit, "gw-1a", gateway_partial(weight=1001.0), kind=Kind.PARTIAL)

    reason = refusal(admit_gateway, kit, data)
    assert reason == "weight_bound"


def test_a_gateway_partial_must_be_float32(kit: FleetKit) -> None:
    p = Partial(delta(1.0) * np.float32(200), 200.0, 2)
    body = encode_update(TernaryCodec(), SPEC, p)[0].to_body()

    reason = refusal(admit_gateway, kit, sealed(kit, "gw-1a", body, kind=Kind.PARTIAL))
    assert reason == "wrong_codec"


def test_a_message_larger_than_a_valid_update_is_refused_before_decoding(kit: FleetKit) -> None:
    limit = contribution_caps(SPEC, CodecName.TERNARY, partial=False).max_bytes

    reason = refusal(admit_device, kit, b"\xa9" + b"\x00" * limit)

    assert reason == "oversize"


def test_caps_hold_the_largest_valid_contribution_of_each_role(kit: FleetKit) -> None:
    tally = {f"r{i:02d}" + "x" * 61: 1 for i in range(64)}
    spec = ModelSpec.of({"w" * 128: (3, 4, 5, 6, 7, 2, 2, 2), "b": (1,)})
    for codec in CodecName:
        density = 1.0 if codec is CodecName.SPARSE else None  # a sparse codec at its largest
        p = Partial(np.full(spec.size, 3.0, np.float32), 1e6, 10**6)
        encoded = encode_update(codec_for(codec, density=density), spec, p)[0]
        body = replace(encoded, failed=tally).to_body()
        env = Envelope(Kind.PARTIAL, "f" * 64, 2**32 - 1, 2**32 - 1, "g" * 64, body, run=2**64 - 1)
        data = seal(env, kit.keys["gw-1"])

        caps = contribution_caps(spec, codec, partial=True, density=density)
        assert len(data) <= caps.max_bytes, codec
    failure = seal(
        Envelope(Kind.FAILURE, "f" * 64, 1, 1, "d" * 64, Failure(tally).to_body(), run=2**64 - 1),
        kit.keys["dev-1"],
    )
    assert len(failure) <= contribution_caps(spec, CodecName.TERNARY, partial=False).max_bytes


@pytest.mark.parametrize(
    "shape",
    [
        {"w" * 128: (3, 4, 5, 6, 7, 2, 2, 2)},
        {f"t{i:03d}" + "x" * 124: (1,) * 8 for i in range(256)},
    ],
    ids=["one-large-tensor", "256-tensors-of-8-dims"],
)
def test_no_contribution_is_larger_than_the_largest_message_of_its_fleet(
    kit: FleetKit, shape: dict[str, tuple[int, ...]]
) -> None:
    spec = ModelSpec.of(shape)  # the fleet's max_params is exactly this model's size
    tally = {f"r{i:02d}" + "x" * 61: 1 for i in range(64)}
    largest = largest_message(spec.size, 1)
    for codec in CodecName:
        density = 1.0 if codec is CodecName.SPARSE else None  # a sparse codec at its largest
        caps = contribution_caps(spec, codec, partial=True, density=density)
        p = Partial(np.full(spec.size, 3.0, np.float32), 1e6, 10**6)
        encoded = encode_update(codec_for(codec, density=density), spec, p)[0]
        body = replace(encoded, failed=tally).to_body()
        env = Envelope(Kind.PARTIAL, "f" * 64, 2**32 - 1, 2**32 - 1, "g" * 64, body, run=2**64 - 1)

        assert len(seal(env, kit.keys["gw-1"])) <= caps.max_bytes <= largest, codec


def test_an_update_body_from_update_from_body_survives_admission_unchanged(kit: FleetKit) -> None:
    body = device_update()

    c = admit_device(kit, sealed(kit, "dev-1", body))

    assert c.update is not None
    assert c.update.to_partial().weighted_sum.tobytes() == (
        Update.from_body(body).check(SPEC).to_partial().weighted_sum.tobytes()
    )
