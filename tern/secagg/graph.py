"""Who masks with whom in a cohort, and how many share holders rebuild a secret.

Small cohorts use the complete graph (Bonawitz et al. 2017). Large ones use SecAgg+'s
sparse graph (Bell et al. 2020): a Harary graph over a seeded permutation of the
members, each linked to degree/2 successors and degree/2 predecessors. A member's
shares go to its neighbours and itself; `t(u) = ceil(threshold * (|N(u)| + 1))` of them
rebuild its secrets. The graph depends only on (seed, round, sorted members, degree),
so every member and the gateway compute it alone, without numpy's generators (whose
streams may change between versions).

Choosing the degree (`choose_degree`, when the schedule says 0): a round closes only
if every surviving member keeps t(u) live holders, and every member that dropped after
sharing keeps t(u) live holders too. With members dropping independently at rate
`DROPOUT`, the live holders of a neighbourhood of m = k + 1 are Binomial(m, 1 - DROPOUT);
we take the smallest even k with ``n * P[Binomial(k + 1, 0.7) < t] <= 2**-20`` (a union
bound over the n members, exact binomial tail). The degree grows with log(n) (SecAgg+),
but its constant is 1 / KL(threshold || 1 - DROPOUT): at 30 % dropouts, k = 218 for
n = 500 at threshold 0.51, 344 at 0.55, and the complete graph up to n ~ 800 at 0.6
(k = 792 at n = 1,000, 892 at n = 10,000). A threshold above one half (which keeps a
gateway from collecting both secrets of one member) and close to the survival rate
leaves little room: sparse graphs pay off only for thousands of members or with the
threshold near one half.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

from nacl.signing import VerifyKey

from tern.secagg.crypto import Context
from tern.secagg.terms import SecAggTerms
from tern.topics import validate_id

__all__ = [
    "COMPLETE_UP_TO",
    "DROPOUT",
    "FAILURE",
    "Cohort",
    "choose_degree",
    "needed",
    "neighbourhoods",
    "stall_probability",
]

COMPLETE_UP_TO = 50  # cohorts this small always use the complete graph
DROPOUT = 0.3  # the dropout rate a chosen degree tolerates
FAILURE = 2.0**-20  # ... with this probability, at most, of some neighbourhood too thin


def needed(threshold: float, holders: int) -> int:
    """t = ceil(threshold * holders), exactly (no float rounding up of 0.7 * 10)."""
    return max(1, math.ceil(Fraction(threshold) * holders))


def _below(m: int, p: float, need: int) -> float:
    """P[Binomial(m, p) < need], summed in log space."""
    lp, lq = math.log(p), math.log1p(-p)
    lm = math.lgamma(m + 1)
    return sum(
        math.exp(lm - math.lgamma(i + 1) - math.lgamma(m - i + 1) + i * lp + (m - i) * lq)
        for i in range(need)
    )


def stall_probability(n: int, degree: int, threshold: float, dropout: float = DROPOUT) -> float:
    """Union bound on the chance that some member of `n` keeps fewer than t live holders."""
    m = min(degree, n - 1) + 1
    return min(1.0, n * _below(m, 1.0 - dropout, needed(threshold, m)))


@lru_cache(maxsize=256)
def choose_degree(n: int, threshold: float) -> int:
    """The degree for a cohort of `n` when the schedule leaves it to us (see above);
    n - 1 is the complete graph."""
    if n <= COMPLETE_UP_TO:
        return max(0, n - 1)
    for k in range(2, n - 1, 2):
        if stall_probability(n, k, threshold) <= FAILURE:
            return k
    return n - 1


def _rank(seed: int, round: int, member: str) -> bytes:
    data = f"{seed}\0{round}\0{member}".encode()
    return hashlib.blake2b(data, digest_size=16, person=b"tern-secagg-grph").digest()


def neighbourhoods(
    members: tuple[str, ...], degree: int, seed: int, round: int
) -> Mapping[str, tuple[str, ...]]:
    """Each member's neighbours (sorted): complete when `degree` >= n - 1, else the
    Harary graph of ceil(degree / 2) links on each side over a seeded permutation."""
    n = len(members)
    half = (degree + 1) // 2
    if 2 * half >= n - 1:
        return {m: tuple(v for v in members if v != m) for m in members}
    order = sorted(members, key=lambda m: (_rank(seed, round, m), m))
    out: dict[str, tuple[str, ...]] = {}
    for i, m in enumerate(order):
        linked = {order[(i + d) % n] for d in range(1, half + 1)}
        linked |= {order[(i - d) % n] for d in range(1, half + 1)}
        out[m] = tuple(sorted(linked))
    return out


@dataclass(frozen=True, slots=True)
class Cohort:
    """One gateway's cohort in one round: everything both sides derive the protocol from.

    `degree` is the schedule's (0: `choose_degree`); `length` the vector's (spec.size + 2);
    `bits` the ring's (2^bits). Built by the gateway and by each member from the round's
    schedule and the fleet file's keys (`from_terms`).
    """

    fleet: str
    run: int
    round: int
    model_version: int
    server: str
    members: tuple[str, ...]
    keys: Mapping[str, VerifyKey]
    server_key: VerifyKey
    threshold: float
    degree: int
    seed: int
    length: int
    bits: int
    graph: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    context: Context = field(init=False, repr=False, compare=False)
    widest: int = field(init=False, repr=False, compare=False)  # the largest neighbourhood

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet")
        validate_id(self.server, "server")
        for m in self.members:
            validate_id(m, "member")
        if list(self.members) != sorted(set(self.members)) or not self.members:
            raise ValueError("cohort members must be sorted, distinct and at least one")
        if self.server in self.members:
            raise ValueError("the cohort's server is not one of its members")
        if any(m not in self.keys for m in self.members):
            raise ValueError("every member of the cohort needs its verify key")
        if not 0.5 < self.threshold <= 1.0:
            raise ValueError("the threshold must be in (0.5, 1]")
        if not 2 <= self.bits <= 32 or self.length < 1 or self.degree < 0:
            raise ValueError("ring bits must be in [2, 32], the length and degree positive")
        n = len(self.members)
        degree = self.degree if self.degree else choose_degree(n, self.threshold)
        graph = neighbourhoods(self.members, degree, self.seed, self.round)
        object.__setattr__(self, "graph", graph)
        object.__setattr__(self, "widest", max(len(v) for v in graph.values()))
        object.__setattr__(self, "context", Context(self.fleet, self.run, self.round, self.server))

    @classmethod
    def from_terms(
        cls,
        terms: SecAggTerms,
        *,
        fleet: str,
        run: int,
        round: int,
        model_version: int,
        server: str,
        members: Iterable[str],
        keys: Mapping[str, VerifyKey],
        server_key: VerifyKey,
        seed: int,
        length: int,
        bits: int,
    ) -> Cohort:
        return cls(
            fleet, run, round, model_version, server, tuple(sorted(set(members))), keys,
            server_key, terms.threshold, terms.degree, seed, length, bits,
        )  # fmt: skip

    def neighbours(self, member: str) -> tuple[str, ...]:
        return self.graph[member]

    def holders(self, member: str) -> tuple[str, ...]:
        """Who holds a share of `member`'s secrets: its neighbours and itself, sorted;
        a holder's Shamir point is its position here plus one."""
        return tuple(sorted((*self.graph[member], member)))

    def needed(self, member: str) -> int:
        """t(member): shares that rebuild its secrets, of its holders."""
        return needed(self.threshold, len(self.graph[member]) + 1)

    @property
    def minimum(self) -> int:
        """Fewest members a round may close with: ceil(threshold * cohort size)."""
        return needed(self.threshold, len(self.members))
