"""Secure aggregation through real gateways on real brokers (the embedded amqtt broker
and Mosquitto upstream, each gateway's own broker with the fleet's rights below): a
child gateway masks its cohort's sum into its parent's cohort, and the partial that
reaches the coordinator is exactly the sum of every device's contribution."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np

from device.agent import training_rng
from kernels.wasm import WasmTrainer
from tern.secagg.ring import decode_sum, encode_contribution
from tern.secagg.terms import SecAggTerms
from tests.fleet_fixtures import FleetRig, build_fleet, device_data, simple_layout
from tests.gateway_helpers import SEED, SPEC, TRAIN, WAIT, Coordinator, model_weights
from tests.mqtt_fixtures import MakeTransport, RunningBroker

TERMS = SecAggTerms((0.05,) * len(SPEC.tensors), keys_s=1.0, shares_s=1.0, unmask_s=1.0)


def contribution(device: str, version: int) -> np.ndarray:
    """A device's integer contribution, re-derived in-process (Wasm, its seeds)."""
    x, y = device_data(device)
    w = model_weights(version)
    delta = WasmTrainer().train(SPEC, w, x, y, TRAIN, training_rng(SEED, version, device)) - w
    ints, _ = encode_contribution(SPEC, delta, x.shape[0], None, TERMS, None, 1, None)
    return ints


def test_a_child_gateway_masks_its_cohort_sum_into_its_parent_s_over_real_brokers(
    any_broker: RunningBroker, make_transport: MakeTransport, stack: ExitStack
) -> None:
    layout = simple_layout(1, 2, depth=2)  # gw-1 (dev-1-01, dev-1-02) > gw-1-2 (2 more)
    kit = build_fleet(layout)
    coordinator = Coordinator(kit, make_transport(any_broker.url, "coord"))
    rig = FleetRig(kit, any_broker.url, stack)
    rig.gateway("gw-1")
    rig.gateway("gw-1-2")
    for dev in kit.fleet.devices:
        rig.device(dev)

    coordinator.open_round(1, 1, seconds=8.0, secagg=TERMS)
    parent = rig.gateways["gw-1"].wait_for_round(1, WAIT)
    child = rig.gateways["gw-1-2"].wait_for_round(1, WAIT)
    got = coordinator.partial_from("gw-1", 1)

    total = np.sum([contribution(d, 1) for d in kit.fleet.devices], axis=0)
    want = decode_sum(SPEC, total, TERMS)
    assert got.weighted_sum.tobytes() == want.weighted_sum.tobytes()
    assert (got.total_weight, got.count) == (want.total_weight, 4)
    assert (parent.contributors, parent.dropped, child.contributors) == (4, 0, 2)
    assert parent.rejected == {} and child.rejected == {}
