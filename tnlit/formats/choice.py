"""Which factorization of a weight keeps the most of it at one parameter budget: the maths of ``format: auto``.

The candidates for a ``(d_in, d_out)`` matrix (the ``x @ W`` layout) at a compression rate ``cr`` are low rank
(truncated SVD) and MPOs of two and three sites over a bounded set of site-dim splits and orderings, each at the
largest rank (or uniform bond cap) whose parameters fit ``(1 - cr) * d_in * d_out`` -- the closed forms of
:mod:`tnlit.formats.ranks`, so no candidate is ever over budget. The choice is the candidate of least relative
error: by default the weight's, ``||W - W_hat||_F / ||W||_F``; given the input covariance ``C`` (``in x in``), the
output's, ``sqrt(tr(D^T C D) / tr(W^T C W))`` with ``D = W - W_hat``: the error on the inputs the layer really sees.

The set is bounded so that a GPT-2-sized layer (768 x 3072) decides in seconds on a CPU:

- splits: the :data:`SPLITS` most balanced ways to factor each dimension into that many sites (most balanced as
  in :func:`~tnlit.formats.ranks.balanced_factors`: the smallest largest factor, then the smallest spread);
- orderings: every distinct permutation of the input site dims against the output site dims in ascending order
  (which input factor shares a core with which output factor); permuting both sides together would only re-pair
  the same factors.

The weight errors come from spectra alone: a two-site MPO or a low-rank matrix is one truncated SVD (Eckart-Young),
and TT-SVD's error is exactly the root of the squared singular values it drops at each step (each step's
remainder is orthogonal to what the earlier isometries keep). Each SVD is the eigendecomposition of the smaller
Gram matrix in float64, which is several times cheaper than an SVD and exact well below the errors that matter
(about 1e-7 relative). Output errors need the approximation itself, so they rebuild each candidate by the very
decompositions that :func:`~tnlit.tensorize.tensorize` runs (slower: an SVD with vectors per candidate).

Inference-aware choice: at equal parameters the candidates differ widely in what they cost to run. A two-site MPO
whose bond is large contracts an input through ``in x bond x out``-sized steps, several times the dense layer's FLOPs
at batch 1, while low rank or an MPO of more sites and smaller bonds costs a fraction of them. Given
``flops_weight > 0``, :func:`choose` minimises ``error + flops_weight * flops_ratio``, where ``flops_ratio`` is the
candidate's factor-by-factor FLOPs over the dense layer's at ``tokens`` input rows (:func:`apply_flops`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import opt_einsum as oe
import torch

from tnlit.formats.lowrank import lowrank_from_matrix
from tnlit.formats.mpo import mpo_equation, mpo_from_matrix, mpo_to_matrix
from tnlit.formats.ranks import (
    RankError,
    balanced_factors,
    lowrank_params,
    lowrank_rank_for_cr,
    mpo_bond_dims,
    mpo_params,
)
from tnlit.formats.whiten import output_error

__all__ = ["SPLITS", "Candidate", "Scored", "apply_flops", "candidates", "choose", "flops_ratio", "site_splits"]

SPLITS: dict[int, int] = {2: 2, 3: 2}
"""Sites of the MPO candidates -> how many of each dimension's most balanced factorizations are tried. Two each
keeps a 768 x 3072 layer at 8 two-site candidates (each a 1536 x 1536 SVD, most of the time spent) and 18
three-site ones (small unfoldings, cheap)."""


@dataclass(frozen=True)
class Candidate:
    """One factorization at its budget's rank: low rank, or an MPO with these site dims and bond dims."""

    format: str
    """``lowrank`` or ``mpo``."""
    in_dims: tuple[int, ...]
    """MPO input site dims (core k takes ``in_dims[k]``); empty for low rank."""
    out_dims: tuple[int, ...]
    """MPO output site dims; empty for low rank."""
    ranks: tuple[int, ...]
    """Low rank: ``(rank,)``; MPO: the inner bond dims."""
    params: int
    """Parameters of the factors."""

    @property
    def sites(self) -> int:
        """Number of MPO cores (0 for low rank)."""
        return len(self.in_dims)

    @property
    def site_dims(self) -> str:
        """``in_dims -> out_dims`` as the compression report writes them (empty for low rank)."""
        if not self.in_dims:
            return ""
        return f"{'x'.join(map(str, self.in_dims))} -> {'x'.join(map(str, self.out_dims))}"

    @property
    def label(self) -> str:
        """A short name, e.g. ``lowrank r19`` or ``mpo 8x8 -> 8x12 bond 20``."""
        if self.format == "lowrank":
            return f"lowrank r{self.ranks[0]}"
        return f"mpo {self.site_dims} bond {','.join(map(str, self.ranks))}"


@dataclass(frozen=True)
class Scored:
    """A candidate and its relative error (weight or output, as :func:`choose` was asked)."""

    candidate: Candidate
    rel_error: float
    flops_ratio: float = float("nan")
    """Factor-by-factor FLOPs over the dense layer's at the objective's tokens (:func:`flops_ratio`)."""


def site_splits(n: int, sites: int, limit: int) -> list[tuple[int, ...]]:
    """The ``limit`` most balanced ways to write ``n`` as a product of ``sites`` factors (ascending tuples).

    Most balanced first, by :func:`~tnlit.formats.ranks.balanced_factors`'s order (the smallest largest factor,
    then the smallest spread), so the first is ``balanced_factors(n, sites)``; e.g. 768 in two ->
    ``[(24, 32), (16, 48)]``, 1536 in two -> ``[(32, 48), (24, 64)]``.
    """
    if n < 1 or sites < 1 or limit < 1:
        raise ValueError(f"cannot split {n} into {sites} factors, {limit} ways: all must be positive")
    found: list[tuple[int, ...]] = []

    def search(rest: int, parts: int, lo: int, acc: tuple[int, ...]) -> None:
        if parts == 1:
            if rest >= lo:
                found.append((*acc, rest))
            return
        d = lo
        while d**parts <= rest:  # factors ascend, so the next is at most the parts-th root of what is left
            if rest % d == 0:
                search(rest // d, parts - 1, d, (*acc, d))
            d += 1

    search(n, sites, 1, ())
    found.sort(key=lambda f: (f[-1], f[-1] - f[0]))  # stable: ties keep the search order, as balanced_factors does
    return found[:limit]


def candidates(d_in: int, d_out: int, cr: float, splits: dict[int, int] | None = None) -> list[Candidate]:
    """Every candidate factorization of a ``(d_in, d_out)`` matrix that meets CR ``cr``, from closed forms only.

    The first is the default format (the two-site MPO on balanced site dims, what ``format: mpo`` builds), then low
    rank, then the other MPOs (see the module docstring for the set). Candidates no rank can fit into the budget
    are left out; :class:`RankError` when none fits.

    Args:
        d_in: The weight's input dimension.
        d_out: The weight's output dimension.
        cr: The compression rate whose budget every candidate keeps to, in (0, 1).
        splits: Sites -> how many balanced factorizations per dimension (default :data:`SPLITS`).
    """
    splits = SPLITS if splits is None else splits
    found: list[Candidate] = []
    missed: list[str] = []
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()

    def mpo(in_dims: tuple[int, ...], out_dims: tuple[int, ...]) -> None:
        if (in_dims, out_dims) in seen:
            return
        seen.add((in_dims, out_dims))
        try:
            bonds = mpo_bond_dims(in_dims, out_dims, cr=cr)
        except RankError as err:
            missed.append(str(err))
            return
        found.append(Candidate("mpo", in_dims, out_dims, tuple(bonds), mpo_params(in_dims, out_dims, bonds)))

    mpo(balanced_factors(d_in, 2), balanced_factors(d_out, 2))
    try:
        r = lowrank_rank_for_cr(d_in, d_out, cr=cr)
        found.append(Candidate("lowrank", (), (), (r,), lowrank_params(d_in, d_out, r)))
    except RankError as err:
        missed.append(str(err))
    for sites, limit in sorted(splits.items()):
        for out_dims in site_splits(d_out, sites, limit):
            for in_split in site_splits(d_in, sites, limit):
                for in_dims in dict.fromkeys(itertools.permutations(in_split)):  # distinct, ascending order first
                    mpo(in_dims, out_dims)
    if not found:
        raise RankError(f"no candidate of format auto reaches CR {cr} for a {d_in} x {d_out} weight: {missed[0]}")
    return found


def apply_flops(
    fmt: str,
    d_in: int,
    d_out: int,
    ranks: tuple[int, ...] | list[int],
    in_dims: tuple[int, ...] = (),
    out_dims: tuple[int, ...] = (),
    tokens: int = 1,
) -> float:
    """FLOPs of applying a factorized ``(d_in, d_out)`` weight factor by factor to ``tokens`` input rows.

    Low rank: ``2 n r (d_in + d_out)``; an MPO: the cheaper of the left-to-right and right-to-left sweeps that keep the
    input in every step (what :class:`~tnlit.layers.MPOLinear` runs). The dense layer costs ``2 n d_in d_out``.
    """
    if fmt == "lowrank":
        return 2.0 * tokens * ranks[0] * (d_in + d_out)
    if fmt != "mpo":
        raise ValueError(f"no FLOP count for format {fmt!r}")
    full = [1, *ranks, 1]
    shapes = [(tokens, *in_dims), *[(full[k], i, o, full[k + 1]) for k, (i, o) in enumerate(zip(in_dims, out_dims))]]
    m = len(in_dims)
    eq = mpo_equation(m, batched=True)
    left = [(0, 1)] + [(0, m - 1 - k) for k in range(m - 1)]
    right = [(0, m)] + [(m - 2 - k, m - 1 - k) for k in range(m - 1)]
    sweeps = (left, right)
    return float(min(oe.contract_path(eq, *shapes, shapes=True, optimize=list(p))[1].opt_cost for p in sweeps))


def flops_ratio(cand: Candidate, d_in: int, d_out: int, tokens: int = 1) -> float:
    """The candidate's factor-by-factor FLOPs over the dense layer's ``2 n d_in d_out``, at ``tokens`` rows."""
    flops = apply_flops(cand.format, d_in, d_out, cand.ranks, cand.in_dims, cand.out_dims, tokens)
    return flops / (2.0 * tokens * d_in * d_out)


def choose(
    matrix: torch.Tensor,
    cands: list[Candidate],
    covariance: torch.Tensor | None = None,
    flops_weight: float = 0.0,
    tokens: int = 1,
) -> tuple[list[Scored], int]:
    """Every candidate's relative error on ``matrix`` (``(d_in, d_out)``) and the index of the best.

    The best has the least error, or with ``flops_weight > 0`` the least ``error + flops_weight * flops_ratio``
    (FLOPs at ``tokens`` input rows, over the dense layer's). Ties go to the earlier candidate, so the default
    format wins unless another is strictly better.

    Args:
        matrix: The weight in the ``x @ W`` layout.
        cands: The candidates, from :func:`candidates`.
        covariance: The layer's input covariance ``(d_in, d_in)`` (e.g. ``X^T X / n`` over calibration inputs);
            when given, errors are output errors ``sqrt(tr(D^T C D) / tr(W^T C W))`` instead of weight errors.
    """
    if not cands:
        raise ValueError("no candidates to choose from")
    w = matrix.detach()
    if covariance is None:
        errors = [_weight_error(w.double(), c) for c in cands]
    else:
        if covariance.shape != (w.shape[0], w.shape[0]):
            raise ValueError(
                f"input covariance of shape {tuple(covariance.shape)} does not fit a weight with {w.shape[0]} inputs: "
                f"expected ({w.shape[0]}, {w.shape[0]})"
            )
        cov = covariance.detach().to(device=w.device, dtype=torch.float64)
        errors = [_output_error(w, c, cov) for c in cands]
    ratios = [flops_ratio(c, w.shape[0], w.shape[1], tokens) for c in cands]
    best = min(range(len(cands)), key=lambda i: errors[i] + flops_weight * ratios[i])
    return [Scored(c, e, f) for c, e, f in zip(cands, errors, ratios)], best


# ------------------------------------------------------------------------------------------ internals


def _weight_error(w: torch.Tensor, cand: Candidate) -> float:
    """Relative Frobenius error of the candidate's SVD / TT-SVD of ``w`` (float64), from spectra alone."""
    total = float((w * w).sum())
    if total == 0.0:
        return 0.0
    if cand.format == "lowrank":
        return math.sqrt(_lost(w, cand.ranks[0], carry=False)[0] / total)
    k = cand.sites
    site = [i * o for i, o in zip(cand.in_dims, cand.out_dims)]
    # Regroup W[i_1..i_k, o_1..o_k] site by site, (i_1 o_1, i_2 o_2, ...): the MPO is the tensor train of that.
    perm = [axis for s in range(k) for axis in (s, k + s)]
    carry = w.reshape(*cand.in_dims, *cand.out_dims).permute(perm).reshape(site[0], -1)
    lost = 0.0
    for s, r in enumerate(cand.ranks):
        mat = carry.reshape(-1, math.prod(site[s + 1 :]))  # (bond_{s-1} n_s, n_{s+1} ...)
        dropped, carry = _lost(mat, r, carry=s < k - 2)
        lost += dropped
    return math.sqrt(max(lost, 0.0) / total)


def _lost(mat: torch.Tensor, r: int, *, carry: bool) -> tuple[float, torch.Tensor | None]:
    """The squared singular values truncation to rank ``r`` drops, and (``carry``) ``S_r V_r^T``, TT-SVD's next input.

    ``S_r V_r^T = U_r^T M``: from the left Gram's eigenvectors directly, from the right's as ``sqrt(lam) V^T``.
    """
    left = mat.shape[0] <= mat.shape[1]
    gram = mat @ mat.T if left else mat.T @ mat
    if not carry:
        lam = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
        return float(lam[r:].sum()), None
    lam, vec = torch.linalg.eigh(gram)
    lam, top = lam.flip(0).clamp_min(0), vec.flip(1)[:, :r]
    rest = top.T @ mat if left else lam[:r].sqrt()[:, None] * top.T
    return float(lam[r:].sum()), rest


def _output_error(w: torch.Tensor, cand: Candidate, cov: torch.Tensor) -> float:
    """Relative output error of the layer ``tensorize`` would build from this candidate, under input covariance."""
    if cand.format == "lowrank":
        a, b = lowrank_from_matrix(w, rank=cand.ranks[0])
        approx = a @ b
    else:
        approx = mpo_to_matrix(mpo_from_matrix(w, cand.in_dims, cand.out_dims, bond_dim=list(cand.ranks)))
    return output_error(approx.T, w.T, cov)  # whiten's (out, in) layout: the transposes of x @ W
