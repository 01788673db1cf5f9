"""Closed-form parameter counts and the rank / bond dimension that meets a target compression rate.

CR (compression rate) is the fraction of parameters removed: ``1 - factor_params / dense_params``
(the papers' definition). Every rank chosen for a CR is the *largest* one whose factors keep at most
``(1 - cr)`` of the dense parameters, so the achieved CR is never below the one asked for. A request no
rank can meet raises :class:`RankError`, whose message says what is possible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "RankError",
    "balanced_factors",
    "check_cr",
    "lowrank_params",
    "lowrank_rank_for_cr",
    "mpo_bond_dims",
    "mpo_max_bond_dims",
    "mpo_params",
    "tucker2_params",
    "tucker2_ranks",
]

# Relative slack when comparing a parameter count with a budget, so that CR 0.48 of 10_240_000 (a budget
# of 5_324_800.000000001 or 5_324_799.999999999 in floating point) admits the bond dimension 832.
_SLACK = 1e-9


class RankError(ValueError):
    """A rank, bond dimension or compression rate that no factorization of the given shape can meet."""


def check_cr(cr: float) -> float:
    """Validate a compression rate: the fraction of parameters removed, strictly between 0 and 1."""
    if not isinstance(cr, (int, float)) or isinstance(cr, bool) or not 0.0 < float(cr) < 1.0:
        raise RankError(f"CR must be a number strictly between 0 and 1 (the fraction of parameters removed): {cr!r}")
    return float(cr)


def _budget(dense_params: int, cr: float) -> float:
    return (1.0 - check_cr(cr)) * dense_params * (1.0 + _SLACK)


def balanced_factors(n: int, k: int) -> tuple[int, ...]:
    """Split ``n`` into ``k`` integer factors as equal as possible, in ascending order.

    "As equal as possible" minimises the largest factor, then the spread; e.g. 1600 -> (40, 40),
    6400 -> (80, 80), 768 -> (24, 32), 1000 with k=3 -> (10, 10, 10). A prime ``n`` gives ``(1, ..., n)``.
    """
    if n < 1 or k < 1:
        raise ValueError(f"cannot split {n} into {k} factors: both must be positive")
    best: tuple[int, ...] | None = None

    def search(rest: int, parts: int, lo: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if parts == 1:
            if rest >= lo:
                cand = (*acc, rest)
                if best is None or (cand[-1], cand[-1] - cand[0]) < (best[-1], best[-1] - best[0]):
                    best = cand
            return
        d = lo
        # The next factor is at most the parts-th root of what is left (factors are ascending).
        while d**parts <= rest:
            if rest % d == 0:
                search(rest // d, parts - 1, d, (*acc, d))
            d += 1

    search(n, k, 1, ())
    assert best is not None
    return best


# ----------------------------------------------------------------------------------------------- MPO


def mpo_max_bond_dims(in_dims: Sequence[int], out_dims: Sequence[int]) -> list[int]:
    """The exact (full) bond dimension at each inner bond: the smaller side of the matrix unfolded there."""
    site = [i * o for i, o in zip(in_dims, out_dims, strict=True)]
    return [min(math.prod(site[: k + 1]), math.prod(site[k + 1 :])) for k in range(len(site) - 1)]


def mpo_params(in_dims: Sequence[int], out_dims: Sequence[int], bond_dims: Sequence[int]) -> int:
    """Parameters of an MPO whose core k has shape (bond_{k-1}, in_k, out_k, bond_k), bond_0 = bond_n = 1."""
    bonds = [1, *bond_dims, 1]
    return sum(bonds[k] * i * o * bonds[k + 1] for k, (i, o) in enumerate(zip(in_dims, out_dims, strict=True)))


def mpo_bond_dims(
    in_dims: Sequence[int],
    out_dims: Sequence[int],
    *,
    bond_dim: int | Sequence[int] | None = None,
    cr: float | None = None,
) -> list[int]:
    """Inner bond dimensions of an MPO: given, chosen for a target CR, or exact (neither given).

    An int ``bond_dim`` caps every bond (a bond whose exact dimension is smaller keeps the exact one); a list
    gives each inner bond. For a CR, one cap is applied to every bond and the largest cap within the budget
    is taken.
    """
    if bond_dim is not None and cr is not None:
        raise RankError("give either bond_dim or cr, not both")
    exact = mpo_max_bond_dims(in_dims, out_dims)
    dense = math.prod(in_dims) * math.prod(out_dims)
    shape = f"in dims {tuple(in_dims)} x out dims {tuple(out_dims)}"
    if bond_dim is None and cr is None:
        return exact
    if bond_dim is not None:
        if isinstance(bond_dim, int):
            if bond_dim < 1 or (exact and bond_dim > max(exact)):
                raise RankError(
                    f"bond dimension {bond_dim} is impossible for an MPO with {shape}: "
                    f"use 1 to {max(exact, default=1)} (the exact bond dimensions are {exact})"
                )
            return [min(bond_dim, e) for e in exact]
        dims = list(bond_dim)
        if len(dims) != len(exact):
            raise RankError(f"an MPO of {len(exact) + 1} sites has {len(exact)} inner bonds, got {len(dims)} bond dims")
        bad = [(k, d, e) for k, (d, e) in enumerate(zip(dims, exact)) if not 1 <= d <= e]
        if bad:
            k, d, e = bad[0]
            raise RankError(f"bond dimension {d} at inner bond {k} is impossible for an MPO with {shape}: use 1 to {e}")
        return dims
    budget = _budget(dense, cr)
    smallest = mpo_params(in_dims, out_dims, [1] * len(exact))
    if smallest > budget:
        raise RankError(
            f"CR {cr} is out of reach for a {len(in_dims)}-site MPO with {shape}: even bond dimension 1 keeps "
            f"{smallest} of {dense} parameters (CR {1 - smallest / dense:.4f} at most)"
        )
    # Parameters grow monotonically with the cap, so bisect on it.
    lo, hi = 1, max(exact, default=1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mpo_params(in_dims, out_dims, [min(mid, e) for e in exact]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return [min(lo, e) for e in exact]


# -------------------------------------------------------------------------------------------- Tucker-2


def tucker2_params(c_out: int, c_in: int, kernel: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of a Tucker-2 conv kernel: U_out (c_out, r_out) + core (r_out, r_in, *kernel) + U_in (c_in, r_in)."""
    r_out, r_in = ranks
    return c_out * r_out + r_out * r_in * math.prod(kernel) + c_in * r_in


def tucker2_ranks(
    c_out: int,
    c_in: int,
    kernel: Sequence[int],
    *,
    ranks: Sequence[int] | None = None,
    cr: float | None = None,
) -> tuple[int, int]:
    """Tucker-2 ranks ``(r_out, r_in)``: given, chosen for a target CR, or full (neither given).

    The CR rule: ranks proportional to the channel counts, ``r_out / c_out == r_in / c_in`` (rounded, at
    least 1), the largest such pair whose parameters fit the budget. For a square 64->64 3x3 conv at CR 0.5
    that is (38, 38).
    """
    if ranks is not None and cr is not None:
        raise RankError("give either ranks or cr, not both")
    shape = f"a conv kernel of {c_out} output x {c_in} input channels, kernel {tuple(kernel)}"
    if ranks is None and cr is None:
        return c_out, c_in
    if ranks is not None:
        if isinstance(ranks, int) or len(ranks) != 2:
            raise RankError(f"Tucker-2 ranks are a pair (r_out, r_in), got {ranks!r}")
        r_out, r_in = (int(r) for r in ranks)
        if not (1 <= r_out <= c_out and 1 <= r_in <= c_in):
            raise RankError(
                f"ranks {(r_out, r_in)} are impossible for {shape}: use r_out in 1..{c_out}, r_in in 1..{c_in}"
            )
        return r_out, r_in
    dense = c_out * c_in * math.prod(kernel)
    budget = _budget(dense, cr)
    big, small = max(c_out, c_in), min(c_out, c_in)
    best: tuple[int, int] | None = None
    for r_small in range(1, small + 1):
        r_big = max(1, min(big, round(r_small * big / small)))
        pair = (r_big, r_small) if c_out >= c_in else (r_small, r_big)
        if tucker2_params(c_out, c_in, kernel, pair) > budget:
            break
        best = pair
    if best is None:
        least = tucker2_params(c_out, c_in, kernel, (1, 1))
        raise RankError(
            f"CR {cr} is out of reach for Tucker-2 of {shape}: even ranks (1, 1) keep {least} of {dense} "
            f"parameters (CR {1 - least / dense:.4f} at most)"
        )
    return best


# ------------------------------------------------------------------------------------------- low rank


def lowrank_params(d_in: int, d_out: int, rank: int) -> int:
    """Parameters of a two-factor low-rank matrix: A (d_in, rank) + B (rank, d_out)."""
    return rank * (d_in + d_out)


def lowrank_rank_for_cr(d_in: int, d_out: int, *, rank: int | None = None, cr: float | None = None) -> int:
    """Rank of a two-factor low-rank matrix: given, chosen for a target CR, or full (neither given)."""
    if rank is not None and cr is not None:
        raise RankError("give either rank or cr, not both")
    full = min(d_in, d_out)
    if rank is None and cr is None:
        return full
    if rank is not None:
        if not 1 <= rank <= full:
            raise RankError(f"rank {rank} is impossible for a {d_in} x {d_out} matrix: use 1 to {full}")
        return int(rank)
    dense = d_in * d_out
    r = min(full, math.floor(_budget(dense, cr) / (d_in + d_out)))
    if r < 1:
        least = lowrank_params(d_in, d_out, 1)
        raise RankError(
            f"CR {cr} is out of reach for low rank of a {d_in} x {d_out} matrix: even rank 1 keeps {least} of "
            f"{dense} parameters (CR {1 - least / dense:.4f} at most)"
        )
    return r
