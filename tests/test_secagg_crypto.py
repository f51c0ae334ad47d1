"""The pieces of secure aggregation: Shamir sharing, masks, key agreement, share boxes,
the masking graph and its degree."""

from __future__ import annotations

import itertools

import nacl.encoding
import nacl.hash
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tern.errors import TernError
from tern.secagg.crypto import (
    Context,
    agree,
    derive,
    open_box,
    pair_seed,
    prg,
    public_key,
    seal_box,
    share_key,
)
from tern.secagg.graph import (
    FAILURE,
    choose_degree,
    needed,
    neighbourhoods,
    stall_probability,
)
from tern.secagg.shamir import PRIME, combine, from_bytes, lagrange, split, to_bytes
from tests.secagg_helpers import member_ids, randomness

CTX = Context("plant-7", 5, 12, "gw-1")


# -- Shamir ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    secret=st.integers(0, 2**128 - 1),
    n=st.integers(1, 40),
    data=st.data(),
)
def test_any_threshold_of_shares_rebuilds_the_secret(
    secret: int, n: int, data: st.DataObject
) -> None:
    t = data.draw(st.integers(1, n))
    xs = list(range(1, n + 1))
    shares = split(secret, t, xs, randomness(f"{secret}/{n}"))
    chosen = data.draw(st.permutations(range(n)))[:t]

    assert combine([(xs[i], shares[i]) for i in chosen], t) == secret


def test_every_subset_of_the_threshold_rebuilds_the_secret() -> None:
    secret, xs = 2**128 - 1, [1, 2, 3, 4, 5]
    shares = split(secret, 3, xs, randomness("all"))

    for subset in itertools.combinations(zip(xs, shares, strict=True), 3):
        assert combine(list(subset), 3) == secret


def test_fewer_shares_than_the_threshold_are_refused() -> None:
    shares = split(42, 3, [1, 2, 3], randomness("few"))

    with pytest.raises(ValueError):
        combine([(1, shares[0]), (2, shares[1])], 3)


def test_below_the_threshold_shares_rebuild_a_wrong_secret() -> None:
    secret = 123456789
    shares = split(secret, 4, [1, 2, 3, 4, 5], randomness("wrong"))

    assert combine(list(zip([1, 2, 3], shares[:3], strict=True)), 3) != secret


@pytest.mark.parametrize("t", [2, 3, 5])
def test_shares_below_the_threshold_fit_every_secret_equally(t: int) -> None:
    # t - 1 shares of one secret are exactly the shares another secret gets under other
    # coefficients: one set of coefficients per candidate, so they say nothing.
    xs = list(range(1, t))
    shares = split(7, t, [*xs, t], randomness(f"fit/{t}"))[: t - 1]
    for other in (0, 1, 2**127, PRIME - 1):
        # the coefficients a_1..a_{t-1} of the polynomial through (0, other) and the shares
        points = [(0, other), *zip(xs, shares, strict=True)]
        coefficients = _coefficients_through(points)
        assert coefficients[0] == other
        draws = b"".join(to_bytes(c) for c in coefficients[1:])
        assert split(other, t, [*xs, t], lambda n, d=draws: d[:n])[: t - 1] == shares


def _coefficients_through(points: list[tuple[int, int]]) -> list[int]:
    """The coefficients (constant first) of the polynomial through `points`, mod p."""
    out = [0] * len(points)
    for i, (xi, yi) in enumerate(points):
        basis, denominator = [1], 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                basis = [
                    (a - xj * b) % PRIME for a, b in zip([0, *basis], [*basis, 0], strict=True)
                ]
                denominator = denominator * (xi - xj) % PRIME
        scale = yi * pow(denominator, -1, PRIME) % PRIME
        out = [(o + scale * c) % PRIME for o, c in zip(out, basis, strict=True)]
    return out


def test_lagrange_coefficients_rebuild_a_polynomial_at_zero() -> None:
    xs = (2, 5, 9, 11)
    f = [17, 3, 2**100, 7]  # degree 3

    values = [sum(c * x**k for k, c in enumerate(f)) % PRIME for x in xs]

    assert sum(c * v for c, v in zip(lagrange(xs), values, strict=True)) % PRIME == 17


def test_share_bytes_are_field_elements_of_17_bytes() -> None:
    assert from_bytes(to_bytes(PRIME - 1)) == PRIME - 1
    assert from_bytes(to_bytes(PRIME)) is None
    assert from_bytes(bytes(16)) is None


@pytest.mark.parametrize(("secret", "t", "xs"), [(-1, 1, [1]), (PRIME, 1, [1]), (1, 3, [1, 2]),
                                                 (1, 1, [0]), (1, 2, [3, 3])])  # fmt: skip
def test_split_refuses_what_cannot_be_shared(secret: int, t: int, xs: list[int]) -> None:
    with pytest.raises(ValueError):
        split(secret, t, xs, randomness("bad"))


# -- masks, keys and boxes -------------------------------------------------------------


def test_masks_are_deterministic_per_seed_and_fit_the_ring() -> None:
    a, b = bytes(32), bytes(31) + b"\x01"

    assert np.array_equal(prg(a, 1000, 12), prg(a, 1000, 12))
    assert not np.array_equal(prg(a, 1000, 12), prg(b, 1000, 12))
    assert prg(a, 10, 16).dtype == np.uint16 and prg(a, 10, 17).dtype == np.uint32
    assert np.array_equal(prg(a, 10, 12), prg(a, 20, 12)[:10])


def test_key_agreement_is_symmetric_and_the_pair_seed_ignores_order() -> None:
    a, b = derive(b"a", bytes(32), b"t"), derive(b"b", bytes(32), b"t")

    shared = agree(a, public_key(b))

    assert shared == agree(b, public_key(a))
    assert pair_seed(shared, CTX, "dev-1", "dev-2") == pair_seed(shared, CTX, "dev-2", "dev-1")
    assert share_key(shared, CTX, "dev-1", "dev-2") != share_key(shared, CTX, "dev-2", "dev-1")


def test_a_key_of_small_order_is_refused() -> None:
    with pytest.raises(TernError) as info:
        agree(derive(b"a", bytes(32), b"t"), bytes(32))

    assert info.value.reason == "bad_key"


def test_keys_are_bound_to_the_round() -> None:
    other = Context("plant-7", 5, 13, "gw-1")

    assert CTX.key("dev-1") != other.key("dev-1") and CTX.key("a", "bc") != CTX.key("ab", "c")


def test_derive_is_blake2b_as_nacl_computes_it() -> None:
    expected = nacl.hash.blake2b(b"secret", digest_size=32, key=CTX.key("x"),
                                 person=b"purpose".ljust(16, b"\0"),
                                 encoder=nacl.encoding.RawEncoder)  # fmt: skip

    assert derive(b"secret", CTX.key("x"), b"purpose") == expected


@pytest.mark.parametrize("at", [0, 23, 30, 73])
def test_a_tampered_share_box_does_not_open(at: int) -> None:
    key = derive(b"k", bytes(32), b"t")
    box = bytearray(seal_box(key, bytes(34), randomness("box")))
    box[at] ^= 0x80

    with pytest.raises(TernError) as info:
        open_box(key, bytes(box))

    assert info.value.reason == "bad_share"
    assert open_box(key, seal_box(key, b"x" * 34, randomness("box"))) == b"x" * 34


# -- the graph -------------------------------------------------------------------------


def test_small_cohorts_use_the_complete_graph() -> None:
    members = member_ids(50)

    graph = neighbourhoods(members, choose_degree(50, 0.6), 1, 1)

    assert all(len(v) == 49 and m not in v for m, v in graph.items())


def test_the_chosen_degree_keeps_every_neighbourhood_above_its_threshold() -> None:
    k = choose_degree(500, 0.51)

    assert k == 218 and k % 2 == 0
    assert stall_probability(500, k, 0.51) <= FAILURE < stall_probability(500, k - 2, 0.51)
    assert choose_degree(500, 0.6) == 499  # too close to the 70 % who stay: complete


def test_the_sparse_graph_is_symmetric_regular_and_seeded() -> None:
    members = member_ids(60)

    graph = neighbourhoods(members, 8, 7, 3)

    assert all(len(v) == 8 for v in graph.values())
    assert all(m in graph[v] for m, vs in graph.items() for v in vs)
    assert graph == neighbourhoods(members, 8, 7, 3) != neighbourhoods(members, 8, 7, 4)


def test_thresholds_are_exact_fractions_of_the_holders() -> None:
    assert needed(0.7, 10) == 7 and needed(0.6, 10) == 6 and needed(0.51, 2) == 2
    assert needed(1.0, 1) == 1
